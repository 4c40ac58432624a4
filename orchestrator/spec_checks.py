"""Checks across the sections of a pipeline spec, each failure a `SpecError` with its YAML path and line.

The strategy and its parameters (`branchwise.orchestrator.spec_strategy`), the engine roles and the references to
them, the planner's options, and the tools.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping

from ..errors import ConfigError
from ..executors.tools import default_tools
from ..planners import get_planner
from ..search.registry import MAX_TOKENS
from .spec_models import (
    DRAFT_FIELDS,
    BudgetSpec,
    EngineSpec,
    PlannerSpec,
    Role,
    ThoughtSpec,
    ToolSpec,
    VerifiersSpec,
    did_you_mean,
)
from .spec_strategy import Where, assemble_strategy, check_fan_out

__all__ = ["check_planner", "check_roles", "check_thought", "check_tools"]


def check_thought(
    thought: ThoughtSpec, verifiers: VerifiersSpec, budget: BudgetSpec, where: Where, roles: Collection[str] = ()
) -> None:
    """The strategy exists, its parameters fit their declarations and its constructor (with the components it
    needs declared), and its fan-out fits the budget."""
    strategy = assemble_strategy(thought, ("thought",), verifiers, where, roles=roles)
    check_fan_out(strategy, budget, ("thought",), where)


def check_tools(tools: list[ToolSpec], planner: PlannerSpec | None, where: Where) -> None:
    """Tool names must be built-in tools; ``retrieve`` needs a corpus; tools need a planner."""
    if not tools:
        return
    if planner is None:
        raise where.error("tools are listed but there is no planner to call them: add a 'planner' section", ("tools",))
    known = sorted({*default_tools(enable_http=True).names(), "retrieve"})
    for i, tool in enumerate(tools):
        loc = ("tools", str(i))
        if tool.name not in known:
            raise where.error(did_you_mean("tool", tool.name, known), loc)
        allowed = ["corpus"] if tool.name == "retrieve" else []
        for key in tool.options:
            if key not in allowed:
                message = (
                    did_you_mean(f"{tool.name} tool option", key, allowed)
                    if allowed
                    else f"tool {tool.name!r} takes no options"
                )
                raise where.error(message, (*loc, key), line_of=(*loc, tool.name, key))
        if tool.name == "retrieve" and "corpus" not in tool.options:
            raise where.error("tool 'retrieve' needs a corpus: tools: [retrieve: {corpus: path/to/docs/}]", loc)


def check_planner(planner: PlannerSpec | None, lines: Mapping[tuple[str, ...], int], where: Where) -> None:
    """Planner options must be arguments of the planner class, integers at most `MAX_TOKENS`, and accepted by
    its constructor (planners are cheap to build)."""
    if planner is None:
        return
    cls = type(get_planner(planner.kind))
    accepted = sorted(p for p in inspect.signature(cls.__init__).parameters if p != "self")
    for key, value in planner.options.items():
        loc = ("planner", key) if ("planner", key) in lines else ("planner", "options", key)
        if key not in accepted:
            allowed = [*accepted, "kind", "max_replans"]
            raise where.error(did_you_mean(f"{planner.kind} planner option", key, allowed), loc)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            raise where.error(f"must be at most {MAX_TOKENS} (the documented upper bound), got {value}", loc)
    try:
        cls(**planner.options)
    except (ConfigError, TypeError, ValueError) as err:
        raise where.error(str(err), ("planner",)) from None


def check_roles(engines: Mapping[Role, EngineSpec], verifiers: VerifiersSpec, where: Where) -> None:
    """Each role's engine fits the role; what names a role (step scorer, verifier) names a declared one."""
    for role, engine in engines.items():
        _check_role(role, engine, engines, where)
    redundancy = verifiers.redundancy
    if "embedder" in engines and (redundancy is None or redundancy.kind != "embedding"):
        raise where.error(
            "an embedder is declared but nothing uses it: set 'verifiers.redundancy.kind: embedding'",
            ("engines", "embedder"),
        )
    refs: list[tuple[tuple[str, ...], str | None]] = []
    if verifiers.step_scorer is not None:
        refs.append((("verifiers", "step_scorer", "engine"), verifiers.step_scorer.engine))
    if verifiers.verifier is not None:
        refs.append((("verifiers", "verifier", "engine"), verifiers.verifier.engine))
    for loc, ref in refs:
        if ref is not None and ref not in engines:
            declared = ", ".join(sorted(engines))
            raise where.error(f"engine role {ref!r} is not declared under 'engines' (declared: {declared})", loc)


def _check_role(role: Role, engine: EngineSpec, engines: Mapping[Role, EngineSpec], where: Where) -> None:
    here = ("engines", role)
    used = [f for f in DRAFT_FIELDS if f in engine.model_fields_set]
    if role == "draft":
        _check_draft(engine, engines["policy"], where)
    elif used:
        raise where.error(f"{used[0]} only applies to the draft role", (*here, used[0]))
    if role == "embedder" and engine.backend != "transformers":
        message = "the embedder role needs 'backend: transformers' (in-process sentence embeddings)"
        raise where.error(message, (*here, "backend"))
    if role != "embedder" and engine.backend == "transformers":
        message = f"the 'transformers' backend only serves the embedder role, not {role!r}"
        raise where.error(message, (*here, "backend"))


def _check_draft(draft: EngineSpec, policy: EngineSpec, where: Where) -> None:
    here = ("engines", "draft")
    if draft.backend != "vllm":
        raise where.error("the draft role runs inside the vllm policy engine: its backend must be 'vllm'", here)
    if (draft.method or "draft_model") == "draft_model" and not draft.model:
        message = "a draft model needs 'model' (a small model with the policy's tokenizer), or write 'method: ngram'"
        raise where.error(message, here)
    if draft.method == "ngram" and draft.model:
        raise where.error("'method: ngram' proposes tokens by prompt lookup and takes no model", (*here, "model"))
    if draft.options:
        message = (
            f"the draft role takes no engine options ({', '.join(sorted(draft.options))}); allowed: model, "
            f"{', '.join(DRAFT_FIELDS)}"
        )
        raise where.error(message, here)
    if policy.backend != "vllm":
        raise where.error(f"speculative decoding with a draft needs a vllm policy engine, not {policy.backend!r}", here)
    if "speculative_config" in policy.options:
        message = "give speculative decoding once: the policy's speculative_config or a draft role, not both"
        raise where.error(message, here)
