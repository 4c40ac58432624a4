"""Planning on the real default model: the structured planner makes a valid plan that runs (accuracy not asked
of a 135M model), and the ReAct baseline completes on the same tools."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.events import use_sink
from branchwise.executors.agent import run_agent
from branchwise.executors.react import run_react
from branchwise.executors.retrieval import Document
from branchwise.executors.tools import ToolRegistry, default_tools
from branchwise.planners import StructuredPlanner

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

CORPUS = [
    Document("ann", "Ann Lee", "Ann Lee is a painter. Ann Lee was born in 1950 in Dover."),
    Document("bo", "Bo Ray", "Bo Ray is a chemist. Bo Ray was born in 1961 in Leeds."),
    Document("cy", "Cy Moss", "Cy Moss is a pilot. Cy Moss was born in 1944 in York."),
]
QUESTION = "How many years older is Ann Lee than Bo Ray?"


def tools() -> ToolRegistry:
    registry = default_tools(corpus=CORPUS)
    return ToolRegistry([registry.get("retrieve"), registry.get("calculator")])


async def test_structured_planner_plans_and_runs_over_a_local_corpus(vllm_engine: VLLMEngine) -> None:
    events: list[str] = []
    budget = Budget(max_calls=12, max_tokens=20_000)
    with use_sink(lambda kind, data: events.append(kind)):
        result = await run_agent(
            QUESTION,
            planner=StructuredPlanner(max_steps=4, max_tokens=320),
            tools=tools(),
            engine=vllm_engine,
            budget=budget,
            thought_context={"max_tokens": 64},
            max_replans=0,
        )
    plan = result.plans[0]
    assert 2 <= len(plan) <= 5 and plan.nodes[-1].kind == "join"
    assert {n.tool for n in plan.work_nodes() if n.kind == "tool"} <= {"retrieve", "calculator"}
    ran = result.nodes[0]
    assert all(r.status in ("ok", "error", "skipped") for i, r in ran.items() if i != plan.join.id)
    assert any(r.ok for r in ran.values())  # at least one node ran to completion on real output
    assert events.count("node_start") >= 1 and "join" in events
    assert result.llm_calls == budget.usage.calls >= 2
    assert vllm_engine.capabilities.structured_output


async def test_react_baseline_runs_on_the_same_tools(vllm_engine: VLLMEngine) -> None:
    result = await run_react(QUESTION, tools=tools(), engine=vllm_engine, max_steps=2, max_tokens=96)
    assert result.agent == "react" and 1 <= result.llm_calls <= 3
    assert result.answer is not None or result.nodes[0]
