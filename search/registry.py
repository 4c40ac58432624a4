"""Strategies by name, and the parameters each one declares.

A strategy registers itself with `register_strategy`; its constructor's signature and type hints give its
parameters, and the decorator adds what a signature cannot say: an upper bound for every count (so a YAML spec
cannot ask for a hundred million samples), parameters filled with objects built from other parts of a pipeline
(a step scorer, a redundancy judge, a verifier, a nested strategy), and how many traces a run starts (so a
fan-out that cannot fit a budget is refused before anything runs). The YAML spec, its JSON schema and its
"did you mean" errors are all derived from these declarations.

```python
@register_strategy(maxima={"n": MAX_SAMPLES}, sources={"judge": Component("redundancy_judge")}, fan_out=lambda s: s.n)
class Vote(Strategy):
    name = "vote"

    def __init__(self, n: int = 4, *, judge: RedundancyJudge | None = None) -> None: ...
```
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import TypeAdapter, ValidationError

from ..errors import ConfigError, UnknownNameError
from .base import Strategy

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_DEPTH",
    "MAX_ROUNDS",
    "MAX_SAMPLES",
    "MAX_TOKENS",
    "MAX_TOP_LOGPROBS",
    "MAX_WIDTH",
    "Component",
    "ComponentKind",
    "NestedStrategy",
    "ParamSource",
    "StrategyInfo",
    "StrategyParam",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_info",
]

MAX_SAMPLES = 1024
"""Upper bound of every sample count: n, warm-up, probe and stage sizes, drafts per round, traces started."""
MAX_TOKENS = 131_072
"""Upper bound of every token count: max_tokens, step and workspace sizes, confidence windows, intervals."""
MAX_WIDTH = 64
"""Upper bound of beam widths, expansions per beam, subtree widths, kept drafts and kept traces per cluster."""
MAX_DEPTH = 256
"""Upper bound of step-search depth (steps per solution)."""
MAX_ROUNDS = 32
"""Upper bound of refinement rounds and patience."""
MAX_CONCURRENCY = 256
"""Upper bound of anything running at once (traces streamed, DAG nodes)."""
MAX_TOP_LOGPROBS = 20
"""Upper bound of alternatives per token (what vLLM and OpenAI-compatible servers return at most)."""

ComponentKind = Literal["step_scorer", "redundancy_judge", "verifier", "speculator"]
"""Objects a pipeline builds from other sections and hands to strategies that declare a parameter for them:
``step_scorer`` (``verifiers.step_scorer``), ``redundancy_judge`` (``verifiers.redundancy``), ``verifier``
(``verifiers.verifier``, an async ``score(problem, candidate) -> float``) and ``speculator`` (the engine of the
``speculator`` role, ``engines.speculator``: the draft model of step-level speculation)."""


@dataclass(frozen=True)
class Component:
    """A parameter that takes an object the pipeline builds from another section of its spec.

    Attributes:
        kind: which object.
        selector: None: the parameter is never written under ``thought``; it receives the object when the spec
            has that section (otherwise the constructor's default applies). A string: the YAML value that asks
            for the object (``scorer: verifier``); the section must then exist.
        values: other YAML values the parameter accepts, passed to the constructor as they are.
        required: the strategy cannot run without the object: a spec without its section is refused.
    """

    kind: ComponentKind
    selector: str | None = None
    values: tuple[str, ...] = ()
    required: bool = False


@dataclass(frozen=True)
class NestedStrategy:
    """A parameter whose YAML value is itself a thought mapping (``{strategy: deepconf, n: 16}``), built into a
    strategy with the same components as its parent."""


ParamSource = Component | NestedStrategy

_S = TypeVar("_S", bound=Strategy)


@dataclass
class StrategyParam:
    """One constructor parameter of a registered strategy.

    Attributes:
        name: the keyword.
        annotation: its resolved type hint (None when unannotated).
        default: its default (`inspect.Parameter.empty` when required).
        maximum: the upper bound of every integer in its value, for counts.
        source: where an object parameter's value comes from (None: a plain YAML value).
        description: its line from the class docstring's ``Args:``.
    """

    name: str
    annotation: Any
    default: Any
    maximum: int | None
    source: ParamSource | None
    description: str = ""
    _adapter: TypeAdapter[Any] | None = field(default=None, init=False, repr=False)

    @property
    def adapter(self) -> TypeAdapter[Any]:
        """The pydantic validator of the type hint (built on first use)."""
        if self._adapter is None:
            self._adapter = TypeAdapter(self.annotation if self.annotation is not None else Any)
        return self._adapter

    def check(self, value: Any) -> Any:
        """``value`` validated against the type hint and the upper bound, converted (a YAML list becomes the
        tuple a ``tuple[int, ...]`` hint asks for).

        Raises:
            ConfigError: a wrong type or a count above the bound (the message says which).
        """
        if isinstance(value, bool) and not _accepts_bool(self.annotation):
            raise ConfigError(f"expected {_type_name(self.annotation)}, got a boolean ({value})")
        try:
            converted = self.adapter.validate_python(value, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigError(str(first.get("msg", "invalid value"))) from None
        if self.maximum is not None:
            for number in _integers(converted):
                if number > self.maximum:
                    raise ConfigError(f"must be at most {self.maximum} (the documented upper bound), got {number}")
        return converted

    def json_schema(self) -> dict[str, Any]:
        """The JSON schema of a plain parameter: its type with every integer bounded, its default, its doc."""
        schema: dict[str, Any] = self.adapter.json_schema()
        if "$defs" in schema or "$ref" in str(schema):
            schema = {}  # a type with no plain JSON form: the spec loader still checks it
        if self.maximum is not None:
            _bound_integers(schema, self.maximum)
        if self.default is not inspect.Parameter.empty and _plain(self.default):
            schema["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: its class, its parameters and its declared fan-out.

    Attributes:
        name: the registry name.
        cls: the strategy class.
        params: its constructor parameters by name, in signature order.
        fan_out: the number of traces a run of an instance starts when nothing stops it early (None: unknown).
    """

    name: str
    cls: type[Strategy]
    params: Mapping[str, StrategyParam]
    fan_out: Callable[[Any], int] | None = None

    def build(self, params: Mapping[str, Any]) -> Strategy:
        """An instance from plain Python values, each checked against its declaration first.

        Raises:
            ConfigError: an unknown parameter, a wrong type, a count above its bound, or the constructor's own
                checks.
        """
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            param = self.params.get(key)
            if param is None:
                raise UnknownNameError(f"{self.name} parameter", key, list(self.params))
            kwargs[key] = value if param.source is not None else _checked(self.name, param, value)
        try:
            return self.cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"{self.name}: {err}") from None

    def check_bounds(self, strategy: Strategy) -> None:
        """Check an instance's plain parameters (as `Strategy.describe` reports them) against their bounds.

        Raises:
            ConfigError: a count above its bound.
        """
        for key, value in strategy.describe().items():
            param = self.params.get(key)
            if param is not None and param.maximum is not None:
                for number in _integers(value):
                    if number > param.maximum:
                        raise ConfigError(
                            f"{self.name}: {key} must be at most {param.maximum} (the documented upper bound), "
                            f"got {number}"
                        )


_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(
    name: str | None = None,
    *,
    maxima: Mapping[str, int] | None = None,
    sources: Mapping[str, ParamSource] | None = None,
    fan_out: Callable[[Any], int] | None = None,
    replace: bool = False,
) -> Callable[[type[_S]], type[_S]]:
    """Register a strategy class under ``name`` (default: its ``name`` attribute); a class decorator.

    Args:
        name: the registry name (sets the class's ``name`` when it has none).
        maxima: upper bounds of the parameters that are counts. Every parameter whose type admits an integer must
            have one: a spec cannot then ask for a size that exhausts the machine.
        sources: the object parameters (`Component`, `NestedStrategy`); never written as plain YAML values.
        fan_out: traces a run of an instance starts when nothing stops it early (e.g. ``lambda s: s.n``); a
            pipeline refuses up front a fan-out larger than its budget's token caps (each trace costs a token).
        replace: allow replacing a strategy registered under the same name by another class.

    Raises:
        ConfigError: a declared parameter is not in the constructor, a count has no bound, a type hint cannot be
            resolved, or the name is taken.
    """

    def decorate(cls: type[_S]) -> type[_S]:
        key = name or getattr(cls, "name", None)
        if not key:
            raise ConfigError(f"register_strategy: {cls.__name__} has no name; pass one")
        if getattr(cls, "name", key) != key:
            raise ConfigError(f"register_strategy: {cls.__name__}.name is {cls.name!r}, registered as {key!r}")
        old = _REGISTRY.get(key)
        if old is not None and old.cls is not cls and not replace and _qualname(old.cls) != _qualname(cls):
            raise ConfigError(f"strategy {key!r} is already registered by {_qualname(old.cls)}")
        params = _declared_params(cls, key, dict(maxima or {}), dict(sources or {}))
        cls.name = key
        _REGISTRY[key] = StrategyInfo(key, cls, params, fan_out)
        return cls

    return decorate


def strategy_info(name: str) -> StrategyInfo:
    """The registration of strategy ``name``.

    Raises:
        UnknownNameError: no strategy has that name (with "did you mean" suggestions).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("strategy", name, list(_REGISTRY)) from None


def available_strategies() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name with plain parameters, e.g. ``get_strategy("self_consistency", n=16)``.

    Raises:
        UnknownNameError: no strategy has that name.
        ConfigError: a parameter is unknown, of the wrong type, above its bound, or rejected by the constructor.
    """
    return strategy_info(name).build(params)


# -- declarations -----------------------------------------------------------------------------------------------
def _declared_params(
    cls: type[Strategy], name: str, maxima: dict[str, int], sources: dict[str, ParamSource]
) -> dict[str, StrategyParam]:
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except NameError as err:
        raise ConfigError(f"strategy {name!r}: a constructor type hint cannot be resolved ({err})") from None
    accepted = [
        p for p in signature.parameters.values() if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = {p.name for p in accepted}
    for declared in (*maxima, *sources):
        if declared not in names:
            raise ConfigError(f"strategy {name!r}: {declared!r} is not a constructor parameter ({', '.join(names)})")
    docs = _arg_docs(cls.__doc__ or "")
    out: dict[str, StrategyParam] = {}
    for p in accepted:
        hint = hints.get(p.name)
        source = sources.get(p.name)
        if source is None and p.name not in maxima and _admits_int(hint):
            raise ConfigError(f"strategy {name!r}: parameter {p.name!r} is a count and needs an upper bound (maxima)")
        out[p.name] = StrategyParam(p.name, hint, p.default, maxima.get(p.name), source, docs.get(p.name, ""))
    return out


def _checked(strategy: str, param: StrategyParam, value: Any) -> Any:
    try:
        return param.check(value)
    except ConfigError as err:
        raise ConfigError(f"{strategy}: {param.name}: {err}") from None


def _arg_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section, continuation lines joined."""
    out: dict[str, str] = {}
    lines = doc.expandtabs().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    indent: int | None = None
    current: str | None = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s*\([^)]*\))?:\s*(.*)", line)
        if depth == indent and match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}"
    return out


def _type_args(hint: Any) -> Iterator[Any]:
    yield hint
    for arg in typing.get_args(hint):
        yield from _type_args(arg)


def _admits_int(hint: Any) -> bool:
    return any(t is int for t in _type_args(hint))


def _accepts_bool(hint: Any) -> bool:
    return hint is None or any(t is bool or t is Any for t in _type_args(hint))


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _integers(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _integers(item)


def _bound_integers(schema: Any, maximum: int) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["maximum"] = maximum
        for value in schema.values():
            _bound_integers(value, maximum)
    elif isinstance(schema, list):
        for item in schema:
            _bound_integers(item, maximum)


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (int, float, str)) for v in value)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
