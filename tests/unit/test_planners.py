"""The structured, decompose and static planners and the joiner, called directly (run_agent is tested elsewhere)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from tool_fakes import FakeRegistry

from branchwise.engine.testing import ScriptedEngine
from branchwise.engine.types import Capabilities, GenerationRequest
from branchwise.errors import PlanError
from branchwise.executors.registry import ToolRegistry
from branchwise.planners import DecomposePlanner, Joiner, Plan, ReplanContext, StaticPlanner, StructuredPlanner
from branchwise.planners.plan import PlanNode, Repair

pytestmark = pytest.mark.timeout(30)


def retrieve(query: str, k: int = 1) -> str:
    return f"doc:{query}"


def add(a: float, b: float) -> float:
    return a + b


TOOLS = FakeRegistry(retrieve, add)
REGISTRY = ToolRegistry([retrieve, add])  # the structured planner renders the tools' JSON schemas


class PlainEngine(ScriptedEngine):
    """A scripted engine without structured output (a server that cannot constrain JSON)."""

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(structured_output=False)


def prompt_of(request: GenerationRequest) -> str:
    assert request.messages is not None
    return "\n".join(m.content for m in request.messages)


class Dispatched:
    """Records what a planner hands over for eager dispatch."""

    def __init__(self) -> None:
        self.nodes: list[tuple[int, list[str]]] = []

    def __call__(self, node: PlanNode, repairs: Sequence[Repair]) -> None:
        self.nodes.append((node.id, [r.kind for r in repairs]))


# -- structured ----------------------------------------------------------------------------------------------------
async def test_structured_planner_constrains_its_output_and_dispatches_every_node() -> None:
    text = json.dumps(
        {"steps": [{"tool": "retrieve", "args": {"query": "Ann"}}, {"tool": "add", "args": {"a": 1, "b": 2}}]}
    )
    engine = ScriptedEngine([f"```json\n{text}\n```"])
    dispatched = Dispatched()
    plan = await StructuredPlanner(max_steps=3).plan("q", engine=engine, tools=REGISTRY, on_node=dispatched)
    assert [n.kind for n in plan] == ["tool", "tool", "join"] and plan.width() == 2
    assert dispatched.nodes == [(1, []), (2, []), (3, [])]
    assert [r.kind for r in plan.repairs] == ["code_fence"] and plan.source is not None
    request = engine.calls[0]
    assert request.structured is not None and request.structured.json_schema is not None
    assert request.max_tokens == StructuredPlanner().max_tokens and request.temperature == 0.0


async def test_structured_planner_without_structured_output_asks_unconstrained() -> None:
    engine = PlainEngine([json.dumps({"steps": [{"tool": "retrieve", "args": {"query": "x"}}]})])
    plan = await StructuredPlanner().plan("q", engine=engine, tools=REGISTRY)
    assert engine.calls[0].structured is None and len(plan) == 2


async def test_structured_planner_says_when_the_plan_hit_its_token_cap() -> None:
    long = json.dumps({"steps": [{"tool": "retrieve", "args": {"query": "word " * 50}}]})
    engine = ScriptedEngine([long])  # cut at 12 tokens, in the middle of the JSON
    with pytest.raises(PlanError, match="max_tokens=12"):
        await StructuredPlanner(max_tokens=12).plan("q", engine=engine, tools=REGISTRY)


async def test_structured_planner_shows_earlier_attempts_when_replanning() -> None:
    engine = ScriptedEngine([json.dumps({"steps": [{"tool": "retrieve", "args": {"query": "y"}}]})])
    earlier = Plan(nodes=[PlanNode(1, tool="retrieve", kwargs={"query": "x"}), PlanNode(2, kind="join")])
    context = ReplanContext(plans=[earlier], observations=[{1: "nothing found"}], reason="no birth year")
    await StructuredPlanner().plan("q", engine=engine, tools=REGISTRY, context=context)
    prompt = prompt_of(engine.calls[0])
    assert "Attempt 1:" in prompt and "Observation: nothing found" in prompt and "no birth year" in prompt


async def test_structured_planner_rejects_unknown_tools_naming_the_step() -> None:
    engine = ScriptedEngine([json.dumps({"steps": [{"tool": "search", "args": {"query": "x"}}]})])
    with pytest.raises(PlanError) as info:
        await StructuredPlanner().plan("q", engine=engine, tools=REGISTRY)
    assert info.value.node == "1" and info.value.field == "tool"


# -- decompose -----------------------------------------------------------------------------------------------------
async def test_decompose_records_what_it_repaired() -> None:
    reply = {"independent": ["Ann", "Bo", "Ann ", "Cy", "Di"], "dependent": ["Who is oldest?", "and why?", "extra"]}
    engine = ScriptedEngine([json.dumps(reply)])
    dispatched = Dispatched()
    planner = DecomposePlanner(max_independent=3, max_dependent=2)
    plan = await planner.plan("Who is oldest?", engine=engine, tools=TOOLS, on_node=dispatched)
    assert [r.kind for r in plan.repairs] == ["duplicate_subquery", "truncated"]
    searches = [n for n in plan if n.kind == "tool"]
    assert [n.kwargs["query"] for n in searches] == ["Ann", "Bo", "Cy"]
    thoughts = [n for n in plan if n.kind == "thought"]
    assert len(thoughts) == 2 and "$1" in (thoughts[0].question or "") and "$4" in (thoughts[1].question or "")
    assert plan.join.question == f"${thoughts[-1].id}"
    assert [i for i, _ in dispatched.nodes] == [n.id for n in plan]


async def test_decompose_without_the_search_tool_thinks_instead() -> None:
    engine = ScriptedEngine([json.dumps({"independent": ["Ann"], "dependent": []})])
    plan = await DecomposePlanner(search_tool="lookup").plan("q", engine=engine, tools=TOOLS)
    assert [n.kind for n in plan] == ["thought", "thought", "join"]


@pytest.mark.parametrize(
    "reply",
    ["not json", json.dumps({"dependent": ["x"]}), json.dumps({"independent": ["  "], "dependent": []})],
)
async def test_decompose_refuses_an_unusable_decomposition(reply: str) -> None:
    with pytest.raises(PlanError):
        await DecomposePlanner().plan("q", engine=ScriptedEngine([reply]), tools=TOOLS)


async def test_decompose_asks_unconstrained_when_the_engine_cannot_constrain() -> None:
    engine = PlainEngine([json.dumps({"independent": ["Ann"], "dependent": []})])
    await DecomposePlanner().plan("q", engine=engine, tools=TOOLS)
    assert engine.calls[0].structured is None


# -- static --------------------------------------------------------------------------------------------------------
async def test_static_plans_from_yaml_text_and_files_are_copied_per_use(tmp_path: Any) -> None:
    text = "nodes:\n  - {id: 1, tool: retrieve, args: [x]}\n  - {id: 2, kind: join, question: $1}\n"
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    for source in (text, str(path)):
        planner = StaticPlanner(source)
        first = await planner.plan("q", engine=ScriptedEngine(), tools=TOOLS)
        first.nodes[0].args.append("mutated")
        second = await planner.plan("q", engine=ScriptedEngine(), tools=TOOLS)
        assert second.nodes[0].args == ["x"] and not planner.replannable
    with pytest.raises(PlanError, match="does not exist"):
        StaticPlanner("missing.yaml")


# -- joiner --------------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str
    output: Any = None

    def observation(self) -> str:
        return str(self.output) if self.status == "ok" else f"ERROR ({self.status})"


PLAN = Plan(nodes=[PlanNode(1, tool="retrieve", args=["x"]), PlanNode(2, tool="add", args=[1, 2]),
                   PlanNode(3, kind="join")])  # fmt: skip
TEMPLATED = Plan(nodes=[PlanNode(1, tool="retrieve", args=["x"]), PlanNode(2, kind="join", question="It is $1.")])


async def test_a_join_template_whose_references_succeeded_needs_no_model() -> None:
    engine = ScriptedEngine()  # any call would fail: its script is empty
    decision = await Joiner().decide("q", TEMPLATED, {1: Outcome("ok", "doc:x")}, engine=engine, can_replan=True)
    assert (decision.action, decision.answer, decision.llm) == ("finish", "It is doc:x.", False)
    assert engine.calls == []


async def test_a_join_template_with_a_failed_reference_asks_the_model() -> None:
    engine = ScriptedEngine([json.dumps({"action": "replan", "answer": "x was not found"})])
    decision = await Joiner().decide("q", TEMPLATED, {1: Outcome("error")}, engine=engine, can_replan=True)
    assert (decision.action, decision.reason, decision.llm) == ("replan", "x was not found", True)
    assert "ERROR (error)" in prompt_of(engine.calls[0])


async def test_without_the_model_the_last_successful_node_answers() -> None:
    joiner = Joiner(use_llm=False)
    results = {1: Outcome("ok", "doc:x"), 2: Outcome("ok", {"sum": 3})}
    decision = await joiner.decide("q", PLAN, results, engine=ScriptedEngine(), can_replan=True)
    assert decision.answer == '{"sum": 3}' and decision.reason == "output of node 2"
    failed = {1: Outcome("error"), 2: Outcome("skipped")}
    assert (await joiner.decide("q", PLAN, failed, engine=ScriptedEngine(), can_replan=True)).action == "replan"
    last = await joiner.decide("q", PLAN, failed, engine=ScriptedEngine(), can_replan=False)
    assert (last.action, last.answer) == ("finish", None)


async def test_the_model_may_only_finish_when_no_replan_is_left() -> None:
    engine = ScriptedEngine([json.dumps({"action": "replan", "answer": "more"}), "plain words, no JSON"])
    results = {1: Outcome("ok", "a"), 2: Outcome("ok", 3)}
    forced = await Joiner().decide("q", PLAN, results, engine=engine, can_replan=False)
    assert forced.action == "finish" and forced.answer == "more"
    schema = engine.calls[0].structured
    assert schema is not None and schema.json_schema is not None
    assert schema.json_schema["properties"]["action"] == {"enum": ["finish"]}
    loose = await Joiner().decide("q", PLAN, results, engine=engine, can_replan=True)
    assert (loose.action, loose.answer, loose.reason) == (
        "finish",
        "plain words, no JSON",
        "unstructured joiner output",
    )
