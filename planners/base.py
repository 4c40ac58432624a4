"""What every planner shares: the `Planner` interface, the replanning context, and prompt helpers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..engine.base import Engine
from .plan import Plan, PlanNode, Repair, ToolsLike

__all__ = ["NodeCallback", "Planner", "ReplanContext", "describe_tools"]

NodeCallback = Callable[[PlanNode, Sequence[Repair]], None]
"""Called with each node (and the repairs that touched it) as soon as the planner has it: eager dispatch."""


@dataclass
class ReplanContext:
    """What a planner sees when asked to plan again.

    Attributes:
        plans: the earlier plans, oldest first.
        observations: for each earlier plan, its nodes' results as text (node id -> observation).
        reason: why the joiner asked for a new plan.
    """

    plans: list[Plan] = field(default_factory=list)
    observations: list[Mapping[int, str]] = field(default_factory=list)
    reason: str = ""

    def render(self) -> str:
        """The earlier attempts as prompt text."""
        parts = []
        for i, (plan, obs) in enumerate(zip(self.plans, self.observations, strict=False), start=1):
            lines = [f"Attempt {i}:"]
            for node in plan.nodes:
                line = node.describe()
                if node.id in obs:
                    line += f"\n   Observation: {obs[node.id]}"
                lines.append(line)
            parts.append("\n".join(lines))
        if self.reason:
            parts.append(f"Why a new plan is needed: {self.reason}")
        return "\n\n".join(parts)


def describe_tools(tools: ToolsLike, *, thought: bool = True) -> str:
    """The tool list for a planner prompt: the registry's own description when it has one, else signatures."""
    describe = getattr(tools, "prompt_description", None)
    if callable(describe):
        text = str(describe())
    else:
        lines = []
        for name in tools.names():
            tool = tools.get(name)
            sig = tool.signature() if hasattr(tool, "signature") else f"{name}(...)"
            desc = getattr(tool, "description", "") or ""
            lines.append(f"- {sig}: {desc}".rstrip(": "))
        text = "\n".join(lines)
    if thought:
        text += "\n- think(question: str): reason step by step about a question (use $N to include results)"
    return text


class Planner(ABC):
    """Turns a query into a `Plan`.

    Attributes:
        kind: the registry name ("llmcompiler", "structured", "decompose", "static").
        replannable: whether asking again can give a different plan.
    """

    kind: ClassVar[str]
    replannable: ClassVar[bool] = True
    """Whether asking again can give a different plan (False for static plans: no replanning)."""

    @abstractmethod
    async def plan(
        self,
        query: str,
        *,
        engine: Engine,
        tools: ToolsLike,
        context: ReplanContext | None = None,
        on_node: NodeCallback | None = None,
    ) -> Plan:
        """Plan ``query``; calls ``on_node`` for each node as soon as it is known (before returning).

        Args:
            query: the user's question.
            engine: the engine to plan with (already bound to the run's budget by the agent).
            tools: the tool registry nodes may call.
            context: earlier plans and their observations when replanning.
            on_node: eager-dispatch callback; an exception from it stops planning and propagates.

        Returns:
            The validated plan, with the repairs applied to the model's output.

        Raises:
            PlanError: the output could not be turned into a valid plan.
        """

    def describe(self) -> dict[str, Any]:
        """The planner's parameters, for records."""
        out = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        out["kind"] = self.kind
        return out
