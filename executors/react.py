"""The sequential ReAct baseline: one tool call per LLM turn, on the same tools and engine as the DAG agent.

Each turn the model writes a thought and either an action (a tool call) or the final answer; the tool's result
comes back as an observation and the next turn starts. With ``structured=True`` (the default) every turn is
JSON constrained by a schema (``{"thought", "tool", "args"}`` for each tool, or ``{"thought", "answer"}``), so
small models always produce a parseable action; with ``structured=False`` it is the classic text format
(``Action: tool(args)`` / ``Final Answer: ...``). The result is an `AgentResult` like `run_agent`'s (no plans;
one round whose nodes are the steps), so the two can be compared directly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from ..budget import Budget, BudgetedEngine
from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, StructuredOutput
from ..errors import ConfigError, PlanError
from ..events import emit
from ..planners.base import describe_tools
from ..planners.llmcompiler import parse_call
from ..planners.plan import ToolsLike
from ..planners.structured import bounded_schema
from .agent import AgentResult
from .nodes import NodeResult, summarize

__all__ = ["react_schema", "run_react"]

_SYSTEM_JSON = """Answer the question using tools, one call per turn. Tools:
{tools}
Each turn reply with JSON: {{"thought": ..., "tool": <name>, "args": {{...}}}} to call a tool, or
{{"thought": ..., "answer": <short final answer>}} when you know the answer."""

_SYSTEM_TEXT = """Answer the question using tools, one call per turn. Tools:
{tools}
Each turn write:
Thought: <reasoning>
Action: tool(arguments)
and wait for the Observation. When you know the answer write:
Final Answer: <short answer>"""

_ACTION = re.compile(r"Action\s*:\s*(.+)", re.IGNORECASE)
_FINAL = re.compile(r"Final Answer\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


def react_schema(tools: ToolsLike, *, allow_tools: bool = True, max_string: int = 160) -> dict[str, Any]:
    """The JSON schema of one structured ReAct turn (a tool call per tool, or the answer)."""
    thought = {"type": "string", "maxLength": max_string}
    answer = {
        "type": "object",
        "properties": {"thought": thought, "answer": {"type": "string", "maxLength": max_string}},
        "required": ["thought", "answer"],
        "additionalProperties": False,
    }
    variants: list[dict[str, Any]] = []
    if allow_tools:
        for name in tools.names():
            variants.append(
                {
                    "type": "object",
                    "properties": {
                        "thought": thought,
                        "tool": {"const": name},
                        "args": bounded_schema(tools.get(name).parameters_schema(), max_string),
                    },
                    "required": ["thought", "tool", "args"],
                    "additionalProperties": False,
                }
            )
    variants.append(answer)
    return {"anyOf": variants} if len(variants) > 1 else answer


def _parse_turn(text: str, structured: bool) -> tuple[str | None, list[Any], dict[str, Any], str | None]:
    """(tool, args, kwargs, answer) from one turn; raises PlanError when the turn is unusable."""
    if structured:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"the turn is not JSON: {text[:200]!r}") from err
        if not isinstance(data, Mapping):
            raise PlanError(f"the turn is not a JSON object: {text[:200]!r}")
        if "answer" in data:
            return None, [], {}, str(data["answer"])
        args = data.get("args", {})
        if not isinstance(data.get("tool"), str) or not isinstance(args, Mapping):
            raise PlanError(f"the turn names no tool: {text[:200]!r}", field="tool")
        return data["tool"], [], dict(args), None
    final = _FINAL.search(text)
    action = _ACTION.search(text)
    if action is not None and (final is None or action.start() < final.start()):
        name, args, kwargs, _ = parse_call(action.group(1))
        return name, args, kwargs, None
    if final is not None:
        return None, [], {}, final.group(1).strip().splitlines()[0].strip()
    raise PlanError(f"the turn has neither an Action nor a Final Answer: {text[:200]!r}")


def _turn_request(
    messages: list[ChatMessage], tools: ToolsLike, *, structured: bool, last: bool, max_tokens: int
) -> GenerationRequest:
    """The request of one turn; on the last turn no tool may be called (the answer must come)."""
    fields: dict[str, Any] = {"temperature": 0.0, "max_tokens": max_tokens}
    if structured:
        fields["structured"] = StructuredOutput(json_schema=react_schema(tools, allow_tools=not last))
    else:
        fields["stop"] = ("Observation:",)
        if last:
            messages.append(ChatMessage("user", "No more tool calls. Write: Final Answer: <answer>"))
    return GenerationRequest(messages=tuple(messages), **fields)


async def _act(step: int, tools: ToolsLike, name: str, args: list[Any], kwargs: dict[str, Any]) -> NodeResult:
    """Run one tool call as step ``step``; a failure is recorded (it becomes the model's observation)."""
    record = NodeResult(step, "tool", name, status="running")
    record.started_at = time.perf_counter()
    emit("node_start", {"node": step, "kind": "tool", "name": name})
    try:
        tool = tools.get(name)  # an unknown name raises UnknownNameError with a suggestion
        record.attempts = 1
        record.output = await tool.call(tool.bind(args, kwargs))
        record.status = "ok"
    except Exception as err:  # a failed step is an observation for the model, as in ReAct
        record.status = "error"
        record.error = str(err)
        record.error_type = type(err).__name__
    record.ended_at = time.perf_counter()
    timing = {"node": step, "name": name, "duration_s": record.duration_s, "attempts": 1}
    if record.ok:
        emit("node_end", {**timing, "output": summarize(record.output)})
    else:
        emit("node_error", {**timing, "error": record.error, "error_type": record.error_type})
    return record


async def run_react(
    query: str,
    *,
    tools: ToolsLike,
    engine: Engine,
    budget: Budget | None = None,
    max_steps: int = 8,
    structured: bool = True,
    max_tokens: int = 160,
    observation_chars: int = 400,
) -> AgentResult:
    """Answer ``query`` with a sequential ReAct loop (one tool call per LLM turn).

    Events (``node_start``, ``node_end``, ``node_error``, ``agent_end``) go to the current event sink
    (`branchwise.events.use_sink`).

    Args:
        query: the question.
        tools: the tool registry.
        engine: the engine (every call is charged to a child of ``budget``).
        budget: the run's `Budget`; metering only when None.
        max_steps: the most tool calls; after them one more turn must give the answer.
        structured: constrain each turn to JSON (see module docs); the classic text format when False.
        max_tokens: cap on each turn's tokens.
        observation_chars: observations are cut to this many characters in the prompt.

    Returns:
        An `AgentResult` with ``agent="react"``: ``nodes[0]`` holds one result per step (its ``detail`` keeps the
        model's turn), ``plans`` is empty.
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    run_budget = budget.child("react") if budget is not None else Budget(name="react")
    structured = structured and bool(engine.capabilities.structured_output)
    system = (_SYSTEM_JSON if structured else _SYSTEM_TEXT).format(tools=describe_tools(tools, thought=False))
    messages = [ChatMessage("system", system), ChatMessage("user", f"Question: {query}")]
    started = time.perf_counter()
    result = AgentResult(answer=None, agent="react")
    steps = await _loop(
        run_budget.bind(engine),
        tools,
        messages,
        result,
        structured=structured,
        max_steps=max_steps,
        max_tokens=max_tokens,
        observation_chars=observation_chars,
    )
    result.nodes.append(steps)
    return result.finish(run_budget, started, steps=len(steps))


async def _loop(
    llm: BudgetedEngine,
    tools: ToolsLike,
    messages: list[ChatMessage],
    result: AgentResult,
    *,
    structured: bool,
    max_steps: int,
    max_tokens: int,
    observation_chars: int,
) -> dict[int, NodeResult]:
    """The turns: ask, parse, act, observe; sets ``result.answer`` (and ``errors``); returns the steps."""
    steps: dict[int, NodeResult] = {}
    for step in range(1, max_steps + 2):
        last = step > max_steps
        request = _turn_request(messages, tools, structured=structured, last=last, max_tokens=max_tokens)
        text = (await llm.generate(request)).completions[0].text.strip()
        messages.append(ChatMessage("assistant", text))
        try:
            name, args, kwargs, answer = _parse_turn(text, structured)
        except PlanError as err:
            result.errors.append(str(err))
            if last:
                result.answer = text or None
                break
            messages.append(ChatMessage("user", f"Observation: ERROR: {err}. Reply in the required format."))
            continue
        if answer is not None or last:
            result.answer = answer
            break
        assert name is not None
        record = steps[step] = await _act(step, tools, name, args, kwargs)
        record.detail["turn"] = text
        messages.append(ChatMessage("user", f"Observation: {record.observation(observation_chars)}"))
    return steps
