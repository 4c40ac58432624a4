"""The sequential ReAct baseline: structured and text turns, errors as observations, the forced final turn."""

from __future__ import annotations

import json

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.engine.types import Capabilities
from branchwise.errors import ConfigError
from branchwise.events import use_sink
from branchwise.executors.react import react_schema, run_react
from branchwise.executors.tools import ToolRegistry

pytestmark = pytest.mark.timeout(30)


def retrieve(query: str) -> str:
    """Look a fact up."""
    return {"ann lee": "born 1950", "bo ray": "born 1961"}.get(query.lower(), "nothing")


TOOLS = ToolRegistry([retrieve])


def call(tool: str, **args: str) -> str:
    return json.dumps({"thought": "look it up", "tool": tool, "args": args})


async def test_structured_react_makes_one_tool_call_per_turn() -> None:
    engine = ScriptedEngine(
        [
            call("retrieve", query="Ann Lee"),
            call("retrieve", query="Bo Ray"),
            json.dumps({"thought": "1950 < 1961", "answer": "Ann Lee"}),
        ]
    )
    events: list[str] = []
    budget = Budget()
    with use_sink(lambda k, d: events.append(k)):
        result = await run_react("Who is older?", tools=TOOLS, engine=engine, budget=budget)
    assert result.answer == "Ann Lee" and result.agent == "react"
    assert result.llm_calls == 3 and budget.usage.calls == 3 and result.plans == []
    assert [r.output for r in result.nodes[0].values()] == ["born 1950", "born 1961"]
    steps = [k for k in events if k.startswith(("node_", "agent_"))]
    assert steps == ["node_start", "node_end", "node_start", "node_end", "agent_end"]
    assert "budget_charge" in events  # the budget reports on the same channel
    third = engine.calls[2].messages
    assert third is not None and "Observation: born 1961" in third[-1].content
    assert engine.calls[0].structured is not None
    engine.assert_complete()


async def test_errors_become_observations_and_the_last_turn_must_answer() -> None:
    engine = ScriptedEngine(
        [
            call("retreive", query="x"),
            "garbage",
            call("retrieve", query="Ann Lee"),
            json.dumps({"thought": "done", "answer": "1950"}),
        ]
    )
    result = await run_react("q", tools=TOOLS, engine=engine, max_steps=3)
    assert result.answer == "1950"
    steps = result.nodes[0]
    assert steps[1].status == "error" and "retrieve" in (steps[1].error or "")  # did-you-mean suggestion
    assert len(result.errors) == 1 and steps[3].output == "born 1950"
    final = engine.calls[3].structured
    assert final is not None and "anyOf" not in final.json_schema  # only the answer is allowed at the end


async def test_text_format() -> None:
    engine = ScriptedEngine(
        [
            'Thought: search\nAction: retrieve("Bo Ray")\nObservation: (hallucinated)',
            "Thought: I know\nFinal Answer: 1961\nmore",
        ]
    )
    result = await run_react("q", tools=TOOLS, engine=engine, structured=False)
    assert result.answer == "1961" and result.nodes[0][1].output == "born 1961"
    assert engine.calls[0].stop == ("Observation:",)


async def test_schema_and_config() -> None:
    schema = react_schema(TOOLS)
    assert len(schema["anyOf"]) == 2
    assert schema["anyOf"][0]["properties"]["tool"] == {"const": "retrieve"}
    with pytest.raises(ConfigError):
        await run_react("q", tools=TOOLS, engine=ScriptedEngine(), max_steps=0)


async def test_text_turns_when_the_engine_cannot_constrain_and_a_forced_last_turn() -> None:
    class Plain(ScriptedEngine):
        @property
        def capabilities(self) -> Capabilities:
            return Capabilities(structured_output=False)

    engine = Plain(
        [
            'Thought: look\nAction: retrieve("Ann Lee")',
            "I am not sure what to do",  # neither an action nor an answer: an error observation, then go on
            'Action: retrieve("Bo Ray")',
            "Final Answer: Ann Lee\nbecause 1950 < 1961",
        ]
    )
    result = await run_react("Who is older?", tools=TOOLS, engine=engine, max_steps=3)  # structured asked for
    assert result.answer == "Ann Lee"  # only the first line of the final answer
    assert all(c.structured is None for c in engine.calls)  # the engine cannot constrain: the text format
    assert [r.output for r in result.nodes[0].values()] == ["born 1950", "born 1961"]
    assert len(result.errors) == 1 and "neither an Action nor a Final Answer" in result.errors[0]
    last = engine.calls[-1].messages
    assert last is not None and "No more tool calls" in last[-1].content
    engine.assert_complete()


async def test_a_failing_tool_is_an_observation_and_an_error_event() -> None:
    def lookup(query: str) -> str:
        """Fails."""
        raise RuntimeError("index offline")

    engine = ScriptedEngine([call("lookup", query="x"), json.dumps({"thought": "give up", "answer": "unknown"})])
    events: list[tuple[str, dict[str, object]]] = []
    with use_sink(lambda kind, data: events.append((kind, data))):
        result = await run_react("q", tools=ToolRegistry([lookup]), engine=engine)
    step = result.nodes[0][1]
    assert step.status == "error" and step.error_type == "ToolError" and "index offline" in (step.error or "")
    observation = engine.calls[1].messages
    assert observation is not None and "index offline" in observation[-1].content
    (error,) = [d for k, d in events if k == "node_error"]
    assert error["node"] == 1 and error["error_type"] == "ToolError"
    assert result.answer == "unknown" and result.usage is not None and result.usage.calls == 2
