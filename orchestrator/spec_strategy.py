"""A spec's ``thought`` section turned into a strategy, from what the strategy declared when it registered.

Nothing here knows one strategy from another: plain parameters are checked against their type hints and upper
bounds, `Component` parameters receive the objects the pipeline built from its ``verifiers`` section, and a
`NestedStrategy` parameter is a thought of its own. Checking a spec (`components=None`) and building a pipeline
run the same code, so a spec that validates builds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError, SpecError, UnknownNameError
from ..search.base import Strategy
from ..search.registry import Component, NestedStrategy, StrategyInfo, available_strategies, strategy_info
from .spec_models import BudgetSpec, ThoughtSpec, VerifiersSpec, did_you_mean
from .spec_yaml import Lines, line_at

__all__ = ["COMPONENT_SECTIONS", "Where", "assemble_strategy", "check_fan_out"]

COMPONENT_SECTIONS: dict[str, str] = {
    "step_scorer": "verifiers.step_scorer",
    "redundancy_judge": "verifiers.redundancy",
    "verifier": "verifiers.verifier",
    "speculator": "engines.speculator",
}
"""The spec section each kind of component is built from."""


@dataclass(frozen=True)
class Where:
    """Where a spec came from, to turn a problem at a YAML path into a `SpecError` with its line."""

    lines: Lines
    source: str

    def error(self, message: str, loc: tuple[str, ...], *, line_of: tuple[str, ...] | None = None) -> SpecError:
        """A `SpecError` at ``loc``, with the line of ``line_of`` (default ``loc``) or of its closest ancestor."""
        line = line_at(self.lines, loc if line_of is None else line_of)
        return SpecError(message, path=".".join(loc), line=line, source=self.source)


def assemble_strategy(
    thought: ThoughtSpec,
    loc: tuple[str, ...],
    verifiers: VerifiersSpec,
    where: Where,
    components: Mapping[str, Any] | None = None,
    *,
    roles: Collection[str] = (),
) -> Strategy:
    """The strategy a thought section describes.

    Args:
        thought: the section.
        loc: its YAML path (``("thought",)``, or deeper for a nested thought).
        verifiers: the spec's verifiers section (which components exist).
        where: for error locations.
        components: the built components by kind (`COMPONENT_SECTIONS`); None while only checking the spec, when
            a parameter asking for a component keeps the constructor's default.
        roles: the engine roles the spec declares (a component built from an engine needs its role).

    Raises:
        SpecError: an unknown strategy or parameter, a wrong type, a count above its bound, a component asked
            for without its section (or required without it), or a value the constructor rejects (each with its
            YAML path and line).
    """
    return _Assembler(verifiers, where, components, frozenset(roles)).strategy(thought, loc)


def check_fan_out(
    strategy: Strategy, budget: BudgetSpec | Mapping[str, Any], loc: tuple[str, ...], where: Where
) -> None:
    """Refuse a strategy that starts more traces than the budget has tokens (each trace costs at least one).

    Raises:
        SpecError: the fan-out cannot fit.
    """
    try:
        info = strategy_info(strategy.name)
    except UnknownNameError:
        return  # a strategy object that was never registered declares no fan-out
    if info.cls is not type(strategy) or info.fan_out is None:
        return
    traces = info.fan_out(strategy)
    caps = budget.model_dump() if isinstance(budget, BudgetSpec) else dict(budget)
    for cap in ("max_completion_tokens", "max_tokens"):
        limit = caps.get(cap)
        if limit is not None and traces > limit:
            raise where.error(
                f"{info.name} starts {traces} traces, each generating at least one token, but budget.{cap} is "
                f"{limit}: the fan-out cannot fit the budget",
                loc,
            )


def _first_error(err: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    """A pydantic error as (YAML path, message): union member tags dropped from the path."""
    loc = tuple(
        str(part)
        for part in err.get("loc", ())
        if str(part) not in ("str", "list[str]", "ReplySpec", "float", "list[list[float]]", "int", "bool")
        and "[" not in str(part)
    )
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return loc, message


_DEFAULT = object()


@dataclass(frozen=True)
class _Assembler:
    verifiers: VerifiersSpec
    where: Where
    components: Mapping[str, Any] | None
    roles: frozenset[str]

    def strategy(self, thought: ThoughtSpec, loc: tuple[str, ...]) -> Strategy:
        try:
            info = strategy_info(thought.strategy)
        except UnknownNameError:
            message = did_you_mean("strategy", thought.strategy, available_strategies())
            raise self.where.error(message, (*loc, "strategy")) from None
        kwargs: dict[str, Any] = {}
        for key, value in thought.params.items():
            sub = (*loc, key)
            param = info.params.get(key)
            if param is None:
                allowed = sorted([*info.params, *ThoughtSpec.model_fields])
                raise self.where.error(did_you_mean(f"{info.name} parameter", key, allowed), sub)
            if isinstance(param.source, NestedStrategy):
                kwargs[key] = self.nested(value, sub)
            elif isinstance(param.source, Component):
                chosen = self.component(info, param.source, value, sub)
                if chosen is not _DEFAULT:
                    kwargs[key] = chosen
            else:
                try:
                    kwargs[key] = param.check(value)
                except ConfigError as err:
                    raise self.where.error(str(err), sub) from None
        kwargs.update(self.supplied(info, kwargs))
        self.check_required(info, kwargs, loc)
        try:
            return info.cls(**kwargs)
        except (ConfigError, TypeError, ValueError) as err:
            message = str(err) if isinstance(err, ConfigError) else f"{info.name}: {err}"
            raise self.where.error(message, loc) from None

    def supplied(self, info: StrategyInfo, given: Mapping[str, Any]) -> dict[str, Any]:
        """The components filling parameters never written in YAML, for those the spec has a section for."""
        out: dict[str, Any] = {}
        if self.components is None:
            return out
        for key, param in info.params.items():
            source = param.source
            if isinstance(source, Component) and source.selector is None and key not in given:
                built = self.components.get(source.kind)
                if built is not None:
                    out[key] = built
        return out

    def present(self, section: str) -> bool:
        """Whether the spec has the section a component is built from."""
        group, name = section.split(".")
        if group == "engines":
            return name in self.roles
        return getattr(self.verifiers, name) is not None

    def check_required(self, info: StrategyInfo, given: Mapping[str, Any], loc: tuple[str, ...]) -> None:
        """A strategy that cannot run without a component (`Component.required`) needs its section."""
        for key, param in info.params.items():
            source = param.source
            if isinstance(source, Component) and source.required and key not in given:
                section = COMPONENT_SECTIONS[source.kind]
                if not self.present(section):
                    what = source.kind.replace("_", " ")
                    raise self.where.error(f"{info.name} needs a {what}: declare {section!r}", loc)

    def component(self, info: StrategyInfo, source: Component, value: Any, sub: tuple[str, ...]) -> Any:
        section = COMPONENT_SECTIONS[source.kind]
        key = sub[-1]
        if source.selector is None:
            what = source.kind.replace("_", " ")
            raise self.where.error(f"{info.name} takes its {what} from {section!r}, not from 'thought.{key}'", sub)
        allowed = [source.selector, *source.values]
        if not isinstance(value, str) or value not in allowed:
            raise self.where.error(did_you_mean(f"{info.name} {key}", str(value), allowed), sub)
        if value != source.selector:
            return value
        if not self.present(section):
            raise self.where.error(f"{key} {value!r} needs a {section!r} section", sub)
        return _DEFAULT if self.components is None else self.components[source.kind]

    def nested(self, value: Any, sub: tuple[str, ...]) -> Strategy:
        if not isinstance(value, Mapping):
            raise self.where.error("expected a thought mapping, e.g. {strategy: deepconf, n: 16}", sub)
        try:
            nested = ThoughtSpec.model_validate(dict(value))
        except ValidationError as exc:
            loc, message = _first_error(exc.errors()[0])
            raise self.where.error(message, (*sub, *loc)) from None
        return self.strategy(nested, sub)
