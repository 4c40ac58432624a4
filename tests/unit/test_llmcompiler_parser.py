"""LLMCompiler plan parsing: a corpus of malformed plans (repaired and recorded, or rejected) and eager dispatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tool_fakes import FakeRegistry

from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import PlanError
from branchwise.executors.executor import Executor
from branchwise.planners.llmcompiler import END_OF_PLAN, LLMCompilerPlanner, PlanParser, parse_call, parse_plan

pytestmark = pytest.mark.timeout(30)


def retrieve(query: str, k: int = 3) -> str:
    return f"doc:{query}"


def calculator(expression: str) -> str:
    return expression


TOOLS = FakeRegistry(retrieve, calculator)


def test_parse_call_literals_and_bare_references() -> None:
    assert parse_call('retrieve("a, b", k=2)') == ("retrieve", ["a, b"], {"k": 2}, True)
    assert parse_call("calculator($1.value)") == ("calculator", ["$1.value"], {}, True)
    assert parse_call('calculator("$1 - $2")')[1] == ["$1 - $2"]
    assert parse_call("f(x=true, y=null, z=[1, 'a'])")[2] == {"x": True, "y": None, "z": [1, "a"]}
    assert parse_call('retrieve("open"')[3] is False
    with pytest.raises(PlanError, match="literals") as info:
        parse_call("retrieve(os.system('rm'))", node=3)
    assert info.value.node == "3" and info.value.field == "args"


CLEAN = (
    'Thought: look both up\n1. retrieve("Paris")\n2. retrieve(query="Berlin", k=2)\n'
    '3. calculator("$1 + $2")\n4. join()\n<END_OF_PLAN>'
)


def test_clean_plan_has_no_repairs() -> None:
    plan = parse_plan(CLEAN, TOOLS)
    assert [n.describe() for n in plan] == [
        '1. retrieve("Paris")',
        '2. retrieve(query="Berlin", k=2)',
        '3. calculator("$1 + $2")',
        "4. join()",
    ]
    assert plan.repairs == [] and plan.node(2).kwargs == {"query": "Berlin", "k": 2}
    assert plan.source == CLEAN


# (text, expected repair kinds, check on the result)
REPAIRABLE: list[tuple[str, list[str], Callable[[Any], bool]]] = [
    ('1. retrieve("a")\n2. calculator($1)', ["missing_join"], lambda p: p.join.id == 3),
    ('1. retrieve("a")\n2. join()\n3. join()', ["duplicate_join"], lambda p: len(p) == 2),
    ('1. retrieve("a")\n2. calculator("${1} * 2")\n3. join()', ["ref_braces"], lambda p: p.node(2).args == ["$1 * 2"]),
    (
        '1. retrieve("a")\n2. join()\nThis plan looks up a and then joins.\nHope it helps!',
        ["trailing_prose"],
        lambda p: len(p) == 2,
    ),
    ('1. retrieve("a")\n2. join()\n<END_OF_PLAN>\nmore words', ["trailing_prose"], lambda p: len(p) == 2),
    ('```\n1. retrieve("a")\n2. join()\n```', ["code_fence", "code_fence"], lambda p: len(p) == 2),
    ('Here is my plan:\n1. retrieve("a")\n2. join()', ["ignored_line"], lambda p: len(p) == 2),
    (
        'retrieve("a")\nretrieve("b")\njoin()',
        ["numbered", "numbered", "numbered"],
        lambda p: [n.id for n in p] == [1, 2, 3],
    ),
    ('1. retrieve("a"\n2. join()', ["unclosed_call"], lambda p: p.node(1).args == ["a"]),
    ('1. retreive("a")\n2. join()', ["tool_name"], lambda p: p.node(1).tool == "retrieve"),
    (
        '1. retrieve("a")\n2. join()\n3. retrieve("b")',
        ["join_moved"],
        lambda p: [n.id for n in p] == [1, 3, 4] and p.join.id == 4,
    ),
    (
        "1) retrieve('a')\nStep 2: think('why $1?')\n3: join($2)",
        [],
        lambda p: p.node(2).kind == "thought" and p.join.question == "$2",
    ),
    ('- 1. retrieve("a");\n2. join()', [], lambda p: p.node(1).args == ["a"]),
]


@pytest.mark.parametrize(("text", "kinds", "check"), REPAIRABLE)
def test_repairs_are_applied_and_recorded(text: str, kinds: list[str], check: Callable[[Any], bool]) -> None:
    plan = parse_plan(text, TOOLS)
    assert [r.kind for r in plan.repairs] == kinds
    assert all(r.detail for r in plan.repairs)
    assert check(plan)


UNREPAIRABLE: list[tuple[str, str | None, str | None]] = [
    ('1. retrieve("a")\n1. retrieve("b")\n2. join()', "1", "id"),
    ('1. calculator($2)\n2. retrieve("b")\n3. join()', "1", "args[0]"),
    ('1. search_web("a")\n2. join()', "1", "tool"),
    ('1. retrieve("a" + x)\n2. join()', "1", "args"),
    ("1. retrieve(query=)\n2. join()", "1", "args"),
    ('1. retrieve("a", k="many")\n2. join()', "1", "k"),
    ('1. retrieve("a", depth=3)\n2. join()', "1", "depth"),
    ('1. think("a", "b")\n2. join()', "1", "question"),
    ("just some prose and no plan", None, None),
    ('1. retrieve("a")\n2. join($5)', None, None),
]


@pytest.mark.parametrize(("text", "node", "field"), UNREPAIRABLE)
def test_unrepairable_output_raises_plan_error(text: str, node: str | None, field: str | None) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(text, TOOLS)
    if node is not None:
        assert info.value.node == node and info.value.field == field


def test_task_on_the_end_marker_line_is_kept() -> None:
    plan = parse_plan('1. retrieve("a")\n2. join()<END_OF_PLAN>', TOOLS)
    assert [n.describe() for n in plan] == ['1. retrieve("a")', "2. join()"]
    assert plan.repairs == []  # the join was read, not added back as a repair
    plan = parse_plan('1. retrieve("a")\n2. calculator("$1")<END_OF_PLAN>', TOOLS)
    assert [n.id for n in plan.work_nodes()] == [1, 2]
    assert [r.kind for r in plan.repairs] == ["missing_join"]
    plan = parse_plan('1. retrieve("a")\n2. join("$1") <END_OF_PLAN> thanks!', TOOLS)
    assert plan.join.question == "$1"
    assert [r.kind for r in plan.repairs] == ["trailing_prose"]


def test_task_on_the_end_marker_line_is_kept_when_streamed() -> None:
    parser = PlanParser(TOOLS)
    emitted = []
    for piece in ('1. retrieve("a")\n2. retr', 'ieve("b")<END_OF', "_PLAN>\n", "after the end\n"):
        emitted += parser.feed(piece)
    emitted += parser.finish()
    assert [n.id for n in emitted] == [1, 2]
    plan = parser.plan().validate(TOOLS)
    assert [n.id for n in plan] == [1, 2, 3]
    assert [r.kind for r in plan.repairs] == ["trailing_prose", "missing_join"]


@pytest.mark.parametrize(
    ("text", "answer"),
    [("1. join()<END_OF_PLAN>", None), ('1. join("Paris")\n<END_OF_PLAN>', "Paris"), ("join()", None)],
)
def test_a_plan_of_only_a_join_is_accepted(text: str, answer: str | None) -> None:
    """The planner may decide no tool is needed (LLMCompiler allows it): the joiner answers directly."""
    plan = parse_plan(text, TOOLS)
    assert len(plan) == 1 and plan.join.id == 1 and plan.work_nodes() == []
    assert plan.join.question == answer


async def test_planner_returns_a_join_only_plan() -> None:
    engine = ScriptedEngine([ScriptedResponse(["1. join()"])])
    plan = await LLMCompilerPlanner().plan("What is 2 + 2?", engine=engine, tools=TOOLS)
    assert [n.kind for n in plan] == ["join"]


def test_numbering_gaps_are_recorded_as_repairs() -> None:
    plan = parse_plan('1. retrieve("a")\n2. retrieve("b")\n4. calculator("$1 $2")\n5. join($4)', TOOLS)
    assert [n.id for n in plan] == [1, 2, 4, 5]  # numbers kept: references use them
    (gap,) = plan.repairs
    assert (gap.kind, gap.node) == ("numbering_gap", 4)
    assert "3 missing" in gap.detail
    plan = parse_plan('2. retrieve("a")\n5. join()', TOOLS)
    assert [(r.kind, r.node) for r in plan.repairs] == [("numbering_gap", 2), ("numbering_gap", 5)]
    assert "3-4 missing" in plan.repairs[1].detail


def test_plan_with_ten_or_more_nodes_reads_multi_digit_references() -> None:
    lines = [f'{i}. retrieve("q{i}")' for i in range(1, 13)]
    lines += ["13. calculator($12)", '14. calculator("${11} + $10 + $1")', "15. join($13)", END_OF_PLAN]
    plan = parse_plan("\n".join(lines), TOOLS)
    assert plan.repairs[0].kind == "ref_braces" and len(plan.repairs) == 1
    assert plan.node(13).args == ["$12"] and plan.node(13).dependencies() == [12]
    assert plan.node(14).dependencies() == [11, 10, 1]
    assert plan.join.dependencies() == [13]


def test_parser_emits_nodes_as_lines_complete() -> None:
    parser = PlanParser(TOOLS)
    assert parser.feed('1. retrieve("a') == []
    assert [n.id for n in parser.feed('")\n2. retr')] == [1]
    assert [n.id for n in parser.feed('ieve("b")\n3. join()')] == [2]
    assert parser.finish() == []
    assert parser.plan().join.id == 3


async def test_eager_dispatch_starts_node_1_before_the_plan_text_is_finished() -> None:
    """A slow-streaming planner: node 1's tool must start while the planner is still writing."""
    plan_text = '1. retrieve("Paris")\n2. retrieve("Berlin")\n3. calculator("$1 + $2")\n4. join()\n<END_OF_PLAN>'
    engine = ScriptedEngine([ScriptedResponse([plan_text], token_delay=0.005)])
    log: list[str] = []

    async def retrieve(query: str) -> str:
        log.append(f"start {query}")
        return query

    def calculator(expression: str) -> str:
        return expression

    engine.add_usage_hook(lambda *_: log.append("plan finished"))  # called when the plan's stream ends
    tools = FakeRegistry(retrieve, calculator)
    ex = Executor(tools=tools)
    plan = await LLMCompilerPlanner().plan(
        "Paris or Berlin?", engine=engine, tools=tools, on_node=lambda node, repairs: ex.add(node, repairs=repairs)
    )
    ex.close()
    results = await ex.wait()
    assert log.index("start Paris") < log.index("start Berlin") < log.index("plan finished")
    assert results[3].output == "Paris + Berlin"
    assert len(plan) == 4 and plan.repairs == []


async def test_planner_error_mid_stream_aborts_the_stream() -> None:
    engine = ScriptedEngine(
        [ScriptedResponse(['1. retrieve("a")\n2. nosuch_tool_at_all(1)\n' + "x " * 200], token_delay=0.001)]
    )
    with pytest.raises(PlanError, match="unknown tool"):
        await LLMCompilerPlanner().plan("q", engine=engine, tools=TOOLS)
    assert engine.aborted == 1 and engine.active == 0


async def test_fail_fast_during_streaming_aborts_the_planner_stream() -> None:
    from branchwise.errors import NodeFailedError, ToolError

    def retrieve(query: str) -> str:
        raise ToolError("retrieve", "index offline")

    plan_text = '1. retrieve("a")\n' + "".join(f'{i}. retrieve("x{i}")\n' for i in range(2, 40)) + "40. join()"
    engine = ScriptedEngine([ScriptedResponse([plan_text], token_delay=0.002)])
    tools = FakeRegistry(retrieve)
    ex = Executor(tools=tools, failure="fail_fast")
    with pytest.raises(NodeFailedError):
        async with ex:
            await LLMCompilerPlanner().plan("q", engine=engine, tools=tools, on_node=lambda n, r: ex.add(n))
    assert engine.aborted == 1 and engine.active == 0 and not ex._tasks
