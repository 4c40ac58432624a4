"""Planning: the `Plan` DAG model and planners that write one (LLMCompiler-style, structured, decomposition,
static), plus the joiner that finishes or replans. Planners are resolved by name with `get_planner`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, UnknownNameError
from .base import NodeCallback, Planner, ReplanContext, describe_tools
from .decompose import DecomposePlanner, StaticPlanner, decomposition_plan
from .joiner import JoinDecision, Joiner
from .llmcompiler import LLMCompilerPlanner, PlanParser, parse_plan
from .plan import Plan, PlanNode, Reference, Repair, find_references, resolve_value
from .structured import StructuredPlanner, parse_structured_plan, plan_schema

__all__ = [
    "DecomposePlanner",
    "JoinDecision",
    "Joiner",
    "LLMCompilerPlanner",
    "NodeCallback",
    "Plan",
    "PlanNode",
    "PlanParser",
    "Planner",
    "Reference",
    "Repair",
    "ReplanContext",
    "StaticPlanner",
    "StructuredPlanner",
    "available_planners",
    "decomposition_plan",
    "describe_tools",
    "find_references",
    "get_planner",
    "parse_plan",
    "parse_structured_plan",
    "plan_schema",
    "resolve_value",
]

_PLANNERS: dict[str, type[Planner]] = {
    cls.kind: cls for cls in (LLMCompilerPlanner, StructuredPlanner, DecomposePlanner, StaticPlanner)
}


def available_planners() -> list[str]:
    """Names accepted by `get_planner`."""
    return sorted(_PLANNERS)


def get_planner(kind: str | Planner | Plan | Mapping[str, Any], **params: Any) -> Planner:
    """A planner by name, e.g. ``get_planner("structured", max_steps=6)`` or ``get_planner("static", plan=...)``.

    Also accepts a `Planner` (returned as is), a `Plan` (a static planner) or a mapping
    ``{"kind": name, **params}`` (as in a YAML spec).

    Raises:
        UnknownNameError: no planner of that name ("did you mean" included).
        ConfigError: invalid parameters.
    """
    if isinstance(kind, Planner):
        if params:
            raise ConfigError("parameters cannot be applied to a planner instance")
        return kind
    if isinstance(kind, Plan):
        return StaticPlanner(kind)
    if isinstance(kind, Mapping):
        spec = dict(kind)
        name = spec.pop("kind", None)
        if not isinstance(name, str):
            raise ConfigError(f"a planner spec needs a 'kind' ({', '.join(available_planners())}), got {kind!r}")
        spec.pop("max_replans", None)  # a run setting that YAML specs keep next to the planner
        return get_planner(name, **{**spec, **params})
    if not isinstance(kind, str):
        raise ConfigError(f"planner must be a name, a Planner or a Plan, got {type(kind).__name__}")
    try:
        cls = _PLANNERS[kind]
    except KeyError:
        raise UnknownNameError("planner", kind, list(_PLANNERS)) from None
    if cls is StaticPlanner:
        plan = params.pop("plan", None)
        if plan is None or params:
            raise ConfigError("the static planner takes exactly one parameter, plan=<Plan | dict | YAML | path>")
        if isinstance(plan, str) and not plan.strip():
            raise ConfigError("plan must not be empty")
        return StaticPlanner(plan)
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"invalid parameters for planner {kind!r}: {err}") from err
