"""run_agent: planners (structured, decompose, static, LLMCompiler), joiner decisions, replanning, events."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError, NodeFailedError, PlanError, ToolError, UnknownNameError
from branchwise.events import use_sink
from branchwise.executors.agent import AgentResult, run_agent
from branchwise.executors.tools import ToolRegistry
from branchwise.planners import (
    DecomposePlanner,
    Joiner,
    Plan,
    StaticPlanner,
    StructuredPlanner,
    available_planners,
    get_planner,
    parse_structured_plan,
    plan_schema,
)

pytestmark = pytest.mark.timeout(30)

FACTS = {"ann lee": "Ann Lee was born in 1950.", "bo ray": "Bo Ray was born in 1961."}


def retrieve(query: str, k: int = 1) -> str:
    """Look a fact up."""
    return FACTS.get(query.lower(), "nothing found")


def calculator(expression: str) -> float:
    """Arithmetic."""
    a, op, b = expression.split()
    return float(a) - float(b) if op == "-" else float(a) + float(b)


def broken(x: str) -> str:
    """Always fails."""
    raise ToolError("broken", "down")


def tools() -> ToolRegistry:
    return ToolRegistry([retrieve, calculator, broken])


def steps(*items: tuple[str, dict[str, Any]]) -> str:
    return json.dumps({"steps": [{"tool": t, "args": a} for t, a in items]})


PLAN = steps(
    ("retrieve", {"query": "Ann Lee"}),
    ("retrieve", {"query": "Bo Ray"}),
    ("think", {"question": "Who is older? $1 $2"}),
)


def test_plan_schema_allows_exactly_the_tools_with_bounded_strings() -> None:
    schema = plan_schema(tools(), max_steps=4)
    items = schema["properties"]["steps"]
    assert items["maxItems"] == 4 and items["items"] is False and len(items["prefixItems"]) == 4
    variants = items["prefixItems"][2]["anyOf"]
    assert [v["properties"]["tool"]["const"] for v in variants] == ["retrieve", "calculator", "broken", "think"]
    query = variants[0]["properties"]["args"]["properties"]["query"]
    assert query["type"] == "string" and query["maxLength"] > 0
    assert variants[0]["properties"]["args"]["additionalProperties"] is False
    # step 3 may refer to steps 1 and 2 only; step 1 to none
    assert re.match(query["pattern"], "a $1 b $2") and not re.match(query["pattern"], "$3")
    first = items["prefixItems"][0]["anyOf"][3]["properties"]["args"]["properties"]["question"]["pattern"]
    assert not re.match(first, "why $1")
    long = plan_schema(tools(), max_steps=12)["properties"]["steps"]
    assert "prefixItems" not in long and len(long["items"]["anyOf"]) == 4


def test_parse_structured_plan() -> None:
    plan = parse_structured_plan(PLAN, tools())
    assert [n.kind for n in plan] == ["tool", "tool", "thought", "join"]
    assert plan.node(2).kwargs == {"query": "Bo Ray"}
    fenced = parse_structured_plan(f"```json\n{PLAN}\n```", tools())
    assert [r.kind for r in fenced.repairs] == ["code_fence"]
    with pytest.raises(PlanError, match="not valid JSON"):
        parse_structured_plan('{"steps": [', tools())
    with pytest.raises(PlanError) as info:
        parse_structured_plan(steps(("retrieve", {"query": "$2"}), ("retrieve", {"query": "x"})), tools())
    assert info.value.node == "1" and info.value.field == "kwargs.query"


async def test_structured_plan_runs_and_joiner_finishes() -> None:
    engine = ScriptedEngine(
        [PLAN, "Ann Lee, born 1950. The answer is Ann Lee.", json.dumps({"action": "finish", "answer": "Ann Lee"})]
    )
    events: list[tuple[str, dict[str, Any]]] = []
    budget = Budget(max_calls=10)
    with use_sink(lambda k, d: events.append((k, d))):
        result = await run_agent(
            "Who is older, Ann Lee or Bo Ray?", planner="structured", tools=tools(), engine=engine, budget=budget
        )
    assert isinstance(result, AgentResult) and result.answer == "Ann Lee"
    assert result.llm_calls == 3 and budget.usage.calls == 3
    assert result.nodes[0][1].output == FACTS["ann lee"] and result.nodes[0][3].output == "Ann Lee"
    planner_request = engine.calls[0]
    assert planner_request.structured is not None and planner_request.structured.json_schema is not None
    thought_prompt = engine.calls[1].messages[-1].content  # type: ignore[index]
    assert "1950" in thought_prompt and "1961" in thought_prompt
    kinds = [k for k, _ in events]
    for kind in ("plan_node", "node_start", "node_end", "plan", "join", "agent_end"):
        assert kind in kinds
    assert result.decisions[0].llm and result.replans == 0
    assert json.dumps(result.to_dict())
    engine.assert_complete()


async def test_joiner_replans_with_earlier_plan_and_observations() -> None:
    first = steps(("retrieve", {"query": "Ann"}))
    second = steps(("retrieve", {"query": "Ann Lee"}))
    engine = ScriptedEngine(
        [
            first,
            json.dumps({"action": "replan", "answer": "search the full name"}),
            second,
            json.dumps({"action": "finish", "answer": "1950"}),
        ]
    )
    result = await run_agent(
        "When was Ann Lee born?", planner=StructuredPlanner(), tools=tools(), engine=engine, max_replans=1
    )
    assert result.answer == "1950" and result.replans == 1 and len(result.plans) == 2
    replan_prompt = engine.calls[2].messages[-1].content  # type: ignore[index]
    assert "Attempt 1" in replan_prompt and "nothing found" in replan_prompt and "full name" in replan_prompt
    last_join = engine.calls[3].structured
    assert last_join is not None and last_join.json_schema["properties"]["action"]["enum"] == ["finish"]


async def test_invalid_plan_uses_a_replan_then_raises_when_none_is_left() -> None:
    engine = ScriptedEngine(['{"steps": [{"tool": "retrieve", "args": {"query": "$3"}}]}', PLAN.replace("think", "x")])
    with pytest.raises(PlanError):
        await run_agent("q", planner="structured", tools=tools(), engine=engine, max_replans=1)
    engine = ScriptedEngine(
        ["not json", steps(("retrieve", {"query": "Bo Ray"})), json.dumps({"action": "finish", "answer": "1961"})]
    )
    result = await run_agent("q", planner="structured", tools=tools(), engine=engine, max_replans=1)
    assert result.answer == "1961" and len(result.errors) == 1 and "JSON" in result.errors[0]
    assert "invalid" in engine.calls[1].messages[-1].content  # type: ignore[index]


async def test_static_plan_with_answer_template_needs_no_llm() -> None:
    plan = Plan.from_yaml("""
nodes:
  - {id: 1, tool: retrieve, args: [Ann Lee]}
  - {id: 2, tool: retrieve, args: [Bo Ray]}
  - {id: 3, tool: calculator, args: ["1961 - 1950"]}
  - {id: 4, kind: join, question: "gap $3 from $1"}
""")
    engine = ScriptedEngine([])
    result = await run_agent("gap?", planner=plan, tools=tools(), engine=engine, max_replans=3)
    assert result.answer == f"gap 11.0 from {FACTS['ann lee']}"
    assert result.llm_calls == 0 and result.decisions[0].reason == "join answer template"
    assert len(result.plans) == 1


async def test_failure_policies_reach_the_joiner_or_raise() -> None:
    plan = {"nodes": [{"tool": "broken", "args": ["x"]}, {"tool": "retrieve", "args": ["Bo Ray"]}, {"kind": "join"}]}
    joiner = Joiner(use_llm=False)
    result = await run_agent(
        "q", planner={"kind": "static", "plan": plan}, tools=tools(), engine=ScriptedEngine(), joiner=joiner
    )
    assert result.answer == FACTS["bo ray"]
    assert [r.id for r in result.node_errors()] == [1]
    with pytest.raises(NodeFailedError) as info:
        await run_agent(
            "q",
            planner=Plan.from_dict(plan),
            tools=tools(),
            engine=ScriptedEngine(),
            joiner=joiner,
            failure="fail_fast",
        )
    assert info.value.node == 1


async def test_llmcompiler_planner_through_the_agent_records_repairs() -> None:
    text = 'Plan:\n1. retrieve("Ann Lee")\n2. retrieve(${1})\nThat is all.'
    engine = ScriptedEngine([text, json.dumps({"action": "finish", "answer": "1950"})])
    events: list[tuple[str, dict[str, Any]]] = []
    with use_sink(lambda k, d: events.append((k, d))):
        result = await run_agent("q", planner="llmcompiler", tools=tools(), engine=engine)
    assert result.answer == "1950"
    assert [r.kind for r in result.repairs] == ["ignored_line", "ref_braces", "ignored_line", "missing_join"]
    node2 = next(d for k, d in events if k == "plan_node" and d["node"] == 2)
    assert [r["kind"] for r in node2["repairs"]] == ["ref_braces"]


async def test_decompose_planner_runs_searches_in_parallel_then_a_chained_thought() -> None:
    decomposition = json.dumps({"independent": ["Ann Lee", "Bo Ray"], "dependent": ["Who is older?"]})
    engine = ScriptedEngine([decomposition, "The answer is Ann Lee."])
    result = await run_agent(
        "Who is older, Ann Lee or Bo Ray?", planner="decompose", tools=tools(), engine=engine, concurrency=4
    )
    plan = result.plans[0]
    assert [n.kind for n in plan] == ["tool", "tool", "thought", "join"] and plan.width() == 2
    assert result.answer == "Ann Lee" and result.llm_calls == 2  # the join template needs no joiner call
    assert "1961" in engine.calls[1].messages[-1].content  # type: ignore[index]
    engine = ScriptedEngine([json.dumps({"independent": ["Ann Lee", "Ann Lee", "Bo Ray"], "dependent": []})])
    plan = await DecomposePlanner().plan("q", engine=engine, tools=tools())
    assert [r.kind for r in plan.repairs] == ["duplicate_subquery"] and len(plan.work_nodes()) == 3
    no_search = DecomposePlanner(search_tool=None)
    engine = ScriptedEngine([decomposition])
    plan = await no_search.plan("q", engine=engine, tools=tools())
    assert [n.kind for n in plan] == ["thought", "thought", "thought", "join"]


async def test_cancelling_run_agent_leaves_no_running_tasks() -> None:
    started = asyncio.Event()

    async def slow(x: str) -> str:
        """Never finishes."""
        started.set()
        await asyncio.Event().wait()
        return x

    registry = ToolRegistry([slow])
    engine = ScriptedEngine([json.dumps({"steps": [{"tool": "slow", "args": {"x": "a"}}] * 3})])
    task = asyncio.create_task(run_agent("q", planner="structured", tools=registry, engine=engine))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("branchwise-node")]


def test_get_planner_registry() -> None:
    assert available_planners() == ["decompose", "llmcompiler", "static", "structured"]
    assert isinstance(get_planner("structured", max_steps=3), StructuredPlanner)
    assert isinstance(get_planner({"kind": "structured", "max_steps": 3, "max_replans": 1}), StructuredPlanner)
    assert isinstance(get_planner("static", plan={"nodes": [{"kind": "join"}]}), StaticPlanner)
    with pytest.raises(UnknownNameError, match="structured"):
        get_planner("structred")
    with pytest.raises(ConfigError):
        get_planner("structured", bogus=1)
    with pytest.raises(ConfigError):
        get_planner("static")


def test_requests_are_valid() -> None:
    request = StructuredPlanner().request("q", tools(), None)
    assert isinstance(request, GenerationRequest) and request.temperature == 0.0
