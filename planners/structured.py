"""Structured planning: the plan as JSON, constrained by a JSON schema through the engine's structured output.

The schema (`plan_schema`) allows exactly the registered tools, each with its own argument object (from the
tool's pydantic model), plus the ``think`` reasoning thread, in a bounded list of steps; constrained decoding
therefore makes even a 135M model emit a plan that parses. Steps are numbered from 1 in order and may refer to
earlier steps with ``$N`` inside string arguments. The final join is implicit in this format: the planner adds it
after the steps (so it is not a repair).

```json
{"steps": [{"tool": "retrieve", "args": {"query": "Ann Lee birth year"}},
           {"tool": "retrieve", "args": {"query": "Bo Ray birth year"}},
           {"tool": "think", "args": {"question": "Who is older? $1 / $2"}}]}
```
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, StructuredOutput
from ..errors import PlanError
from .base import NodeCallback, Planner, ReplanContext, describe_tools
from .plan import Plan, PlanNode, Repair, ToolsLike

__all__ = ["StructuredPlanner", "bounded_schema", "parse_structured_plan", "plan_schema", "reference_pattern"]

logger = logging.getLogger(__name__)

THINK = "think"


def reference_pattern(position: int) -> str:
    """A regex for a string at step ``position`` that may only hold references to earlier steps (``$1`` ..
    ``$position-1``); only for positions up to 10 (one-digit step numbers)."""
    if position <= 1:
        return r"^[^$]*$"
    return rf"^([^$]|\$[1-{min(position - 1, 9)}])*$"


def bounded_schema(schema: dict[str, Any], max_string: int, *, pattern: str | None = None) -> dict[str, Any]:
    """Copy of a tool's argument schema, closed (no extra keys) and with bounded strings (constrained decoding
    of a small model must terminate); ``pattern`` is added to every free string."""
    out = copy.deepcopy(schema)
    out.pop("title", None)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            node.pop("title", None)
            if node.get("type") == "string" and "enum" not in node:
                node.setdefault("maxLength", max_string)
                if pattern is not None:
                    node.setdefault("pattern", pattern)
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    out.setdefault("type", "object")
    out.setdefault("properties", {})
    return out


def _step_variants(tools: ToolsLike, *, thought: bool, max_string: int, pattern: str | None) -> list[dict[str, Any]]:
    variants = []
    for name in tools.names():
        args = bounded_schema(tools.get(name).parameters_schema(), max_string, pattern=pattern)
        variants.append(
            {
                "type": "object",
                "properties": {"tool": {"const": name}, "args": args},
                "required": ["tool", "args"],
                "additionalProperties": False,
            }
        )
    if thought:
        question: dict[str, Any] = {"type": "string", "maxLength": max_string * 2}
        if pattern is not None:
            question["pattern"] = pattern
        variants.append(
            {
                "type": "object",
                "properties": {
                    "tool": {"const": THINK},
                    "args": {
                        "type": "object",
                        "properties": {"question": question},
                        "required": ["question"],
                        "additionalProperties": False,
                    },
                },
                "required": ["tool", "args"],
                "additionalProperties": False,
            }
        )
    return variants


def plan_schema(tools: ToolsLike, *, max_steps: int = 8, thought: bool = True, max_string: int = 160) -> dict[str, Any]:
    """The JSON schema of a structured plan over ``tools``.

    Up to 10 steps, each position has its own schema (``prefixItems``) whose strings may only refer to earlier
    steps, so constrained decoding cannot produce a reference to the step itself or a later one; longer plans
    use one schema for every step (such references are then caught by validation).

    Args:
        tools: the registry (each tool's ``parameters_schema()`` gives its argument object).
        max_steps: the most steps a plan may have.
        thought: allow ``think`` steps (reasoning threads).
        max_string: the longest string value (keeps constrained decoding finite).
    """
    steps: dict[str, Any] = {"type": "array", "minItems": 1, "maxItems": max_steps}
    if max_steps <= 10:
        steps["prefixItems"] = [
            {"anyOf": _step_variants(tools, thought=thought, max_string=max_string, pattern=reference_pattern(i))}
            for i in range(1, max_steps + 1)
        ]
        steps["items"] = False
    else:
        steps["items"] = {"anyOf": _step_variants(tools, thought=thought, max_string=max_string, pattern=None)}
    return {
        "type": "object",
        "properties": {"steps": steps},
        "required": ["steps"],
        "additionalProperties": False,
    }


_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$")


def parse_structured_plan(text: str, tools: ToolsLike | None = None) -> Plan:
    """Turn structured-plan JSON into a validated `Plan` (steps numbered from 1, then the join).

    Markdown fences around the JSON (from engines without constrained decoding) are removed and recorded.

    Raises:
        PlanError: not JSON, not the plan shape, or an invalid plan (naming the step and field).
    """
    repairs: list[Repair] = []
    body = text
    if "```" in text:
        body = _FENCE.sub("", text)
        repairs.append(Repair("code_fence", "removed a markdown code fence around the JSON"))
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise PlanError(f"the plan is not valid JSON ({err.msg} at character {err.pos}): {text[:200]!r}") from err
    if not isinstance(data, Mapping) or not isinstance(data.get("steps"), list):
        raise PlanError('the plan must be a JSON object {"steps": [...]}', field="steps")
    nodes: list[PlanNode] = []
    for i, step in enumerate(data["steps"], start=1):
        if not isinstance(step, Mapping) or not isinstance(step.get("tool"), str):
            raise PlanError("each step must be an object with a 'tool' name", node=str(i), field="tool")
        args = step.get("args", {})
        if not isinstance(args, Mapping):
            raise PlanError("'args' must be an object", node=str(i), field="args")
        if step["tool"] == THINK:
            question = args.get("question")
            if not isinstance(question, str):
                raise PlanError("think needs a 'question' string", node=str(i), field="question")
            nodes.append(PlanNode(i, kind="thought", question=question))
        else:
            nodes.append(PlanNode(i, tool=step["tool"], kwargs=dict(args)))
    if not nodes:
        raise PlanError("the plan has no steps", field="steps")
    nodes.append(PlanNode(len(nodes) + 1, kind="join"))
    plan = Plan(nodes=nodes, repairs=repairs, source=text)
    return plan.validate(tools)


_SYSTEM = """You are a planner. Answer the question by planning tool calls. Reply with JSON only:
{{"steps": [{{"tool": <name>, "args": {{...}}}}, ...]}}
Tools:
{tools}
Steps that do not depend on each other run in parallel. In a string argument, $N stands for the result of
step N (steps count from 1). Use think to reason over earlier results.
Example for "Who is older, Ann Lee or Bo Ray?":
{{"steps": [{{"tool": "retrieve", "args": {{"query": "Ann Lee"}}}},
{{"tool": "retrieve", "args": {{"query": "Bo Ray"}}}},
{{"tool": "think", "args": {{"question": "Who is older? Ann Lee: $1 Bo Ray: $2"}}}}]}}"""


class StructuredPlanner(Planner):
    """Plans with one structured-output call: JSON constrained by `plan_schema`.

    Args:
        max_steps: the most steps in a plan.
        max_tokens: cap on the plan's tokens.
        temperature: sampling temperature (0: greedy).
        thought: allow ``think`` steps.
        max_string: the longest string value in a plan.
    """

    kind = "structured"

    def __init__(
        self,
        *,
        max_steps: int = 6,
        max_tokens: int = 384,
        temperature: float = 0.0,
        thought: bool = True,
        max_string: int = 120,
    ) -> None:
        if max_steps < 1:
            raise PlanError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps = max_steps
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.thought = thought
        self.max_string = max_string

    def request(
        self, query: str, tools: ToolsLike, context: ReplanContext | None, *, constrained: bool = True
    ) -> GenerationRequest:
        system = _SYSTEM.format(tools=describe_tools(tools, thought=self.thought))
        user = f"Question: {query}"
        if context is not None and context.plans:
            user = f"{context.render()}\n\nMake a new plan.\n{user}"
        schema = plan_schema(tools, max_steps=self.max_steps, thought=self.thought, max_string=self.max_string)
        return GenerationRequest(
            messages=(ChatMessage("system", system), ChatMessage("user", user)),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            structured=StructuredOutput(json_schema=schema) if constrained else None,
        )

    async def plan(
        self,
        query: str,
        *,
        engine: Engine,
        tools: ToolsLike,
        context: ReplanContext | None = None,
        on_node: NodeCallback | None = None,
    ) -> Plan:
        constrained = bool(engine.capabilities.structured_output)
        if not constrained:
            logger.warning("engine %r has no structured output; the plan JSON is not constrained", engine)
        generation = await engine.generate(self.request(query, tools, context, constrained=constrained))
        completion = generation.completions[0]
        try:
            plan = parse_structured_plan(completion.text, tools)
        except PlanError as err:
            if completion.finish_reason == "length":
                raise PlanError(f"{err} (the plan hit max_tokens={self.max_tokens}; raise it)") from err
            raise
        if on_node is not None:
            for node in plan.nodes:
                on_node(node, [r for r in plan.repairs if r.node == node.id])
        return plan
