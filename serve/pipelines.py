"""The pipelines a server runs: loaded once, sharing engines, and their variants for requests that override them.

Every pipeline is loaded and checked against the server's limits when the server starts; the engines of all of
them are built once per distinct engine section (the same backend, model and options, the same runtime
settings, and for a policy the same draft) and started together before the port opens. A request that changes
nothing runs the pipeline as loaded; one that sets sampling fields, a system prompt or ``branchwise`` overrides
runs a variant built from the spec with those overrides, on the same engines. Variants are kept for reuse (the
most recent `VARIANT_CACHE` of them) and closed once no run uses them.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.base import Engine
from ..errors import ConfigError, SpecError, UnknownNameError
from ..orchestrator.build import ENGINE_ROLES, build_engines
from ..orchestrator.pipeline import Pipeline
from ..orchestrator.spec import EngineSpec, PipelineSpec, load_spec_file
from ..orchestrator.spec_env import ENV_REF
from .limits import ServerLimits, spec_over_limits
from .protocol import APIError, ChatRequest, Query

__all__ = ["OVERRIDABLE", "VARIANT_CACHE", "Lease", "PipelineSet", "Served", "pipeline_files"]

logger = logging.getLogger(__name__)

OVERRIDABLE = ("thought", "budget", "verifiers.grader", "verifiers.extractor", "planner.max_replans")
"""Spec paths a request may override. Engines, runtime, tools and outputs are the server's: they are fixed when it
starts (a request cannot load a model, read a corpus or write a file)."""
VARIANT_CACHE = 32
"""Variants kept for reuse, most recently used first."""


def pipeline_files(paths: Sequence[Path]) -> list[Path]:
    """The spec files named: files as given, folders as their ``*.yaml`` / ``*.yml`` files (sorted).

    Raises:
        ConfigError: a path does not exist, or a folder holds no spec.
    """
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                raise ConfigError(f"folder {str(path)!r} holds no pipeline (*.yaml, *.yml)")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise ConfigError(f"pipeline {str(path)!r} does not exist")
    return out


@dataclass
class Served:
    """One pipeline as the server runs it.

    Attributes:
        name: the model name clients ask for (the spec's ``name``, else its file's stem).
        source: the spec file.
        spec: the spec as loaded, with the server's defaults (no progress, no trace of its own, budget caps).
        pipeline: the pipeline as loaded (requests without overrides run it).
        engines: its engines by role (shared with other pipelines naming the same engine section).
    """

    name: str
    source: str
    spec: PipelineSpec
    pipeline: Pipeline
    engines: dict[str, Engine]

    @property
    def strategy(self) -> str:
        return self.pipeline.strategy.name


@dataclass
class _Variant:
    pipeline: Pipeline
    users: int = 0
    evicted: bool = False


@dataclass
class Lease:
    """A pipeline held for one run; `release` it when the run is over."""

    pipeline: Pipeline
    _variant: _Variant | None = None
    _released: bool = field(default=False, repr=False)

    async def release(self) -> None:
        if self._released or self._variant is None:
            return
        self._released = True
        variant = self._variant
        variant.users -= 1
        if variant.evicted and variant.users == 0:
            await variant.pipeline.aclose()


class PipelineSet:
    """The loaded pipelines by name, their shared engines, and request variants.

    Args:
        served: the pipelines by name.
        engines: every distinct engine (started by `start`, closed by `aclose`).
        limits: the server's limits, which every variant must fit.
    """

    def __init__(self, served: Mapping[str, Served], engines: Sequence[Engine], limits: ServerLimits) -> None:
        self.served = dict(served)
        self.engines = list(engines)
        self.limits = limits
        self._variants: OrderedDict[str, _Variant] = OrderedDict()

    @classmethod
    def load(cls, paths: Sequence[Path], limits: ServerLimits) -> PipelineSet:
        """Load, check and build every pipeline (engines built, not started).

        Raises:
            ConfigError: a spec is invalid or exceeds the limits, two pipelines have one name, a path is missing.
        """
        served: dict[str, Served] = {}
        shared: dict[str, Engine] = {}
        for path in pipeline_files(paths):
            spec = _server_spec(load_spec_file(path), limits)
            name = spec.name or path.stem
            if name in served:
                raise ConfigError(f"two pipelines are named {name!r}: {served[name].source} and {path}")
            engines = _engines_for(spec, shared)
            pipeline = Pipeline.from_spec(spec, engines=engines)
            over = spec_over_limits(spec, pipeline.strategy, limits)
            if over is not None:
                raise SpecError(over[1], path=over[0], line=spec.line_of(over[0]), source=str(path))
            served[name] = Served(name, str(path), spec, pipeline, engines)
        if not served:
            raise ConfigError("no pipeline to serve")
        return cls(served, list(shared.values()), limits)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every engine (load the models), one after another."""
        for engine in self.engines:
            await engine.start()

    async def aclose(self) -> None:
        """Close every variant, pipeline and engine; a failure to close one is logged and the rest still close."""
        for item in [v.pipeline for v in self._variants.values()] + [s.pipeline for s in self.served.values()]:
            await item.aclose()
        self._variants.clear()
        for engine in self.engines:
            try:
                await engine.aclose()
            except Exception:
                logger.exception("closing %r failed", engine)

    # -- lookups ----------------------------------------------------------------------------------------------------
    def get(self, name: str) -> Served:
        """The pipeline a request's ``model`` names.

        Raises:
            APIError: 404 ``model_not_found``, with the closest names.
        """
        served = self.served.get(name)
        if served is None:
            known = UnknownNameError("model", name, list(self.served))
            raise APIError(404, str(known), param="model", code="model_not_found")
        return served

    async def lease(self, served: Served, request: ChatRequest, query: Query) -> Lease:
        """The pipeline to run ``request`` on: the one loaded, or a variant with the request's overrides.

        Raises:
            APIError: 400 naming the field: an override outside `OVERRIDABLE`, an invalid value (the spec loader's
                message), or a value beyond the server's limits.
        """
        overrides, params = self.overrides(served, request, query)
        if not overrides:
            return Lease(served.pipeline)
        key = json.dumps([served.name, overrides], sort_keys=True, default=str)
        variant = self._variants.get(key)
        if variant is None:
            variant = _Variant(self._build(served, overrides, params))
            self._variants[key] = variant
            await self._evict()
        self._variants.move_to_end(key)
        variant.users += 1
        return Lease(variant.pipeline, variant)

    def overrides(self, served: Served, request: ChatRequest, query: Query) -> tuple[dict[str, Any], dict[str, str]]:
        """The spec overrides a request makes, and the request field each one came from."""
        out: dict[str, Any] = {}
        params: dict[str, str] = {}

        def put(path: str, value: Any, param: str) -> None:
            out[path] = value
            params[path] = param

        if request.temperature is not None:
            put("thought.temperature", request.temperature, "temperature")
        if request.top_p is not None:
            put("thought.top_p", request.top_p, "top_p")
        for param in ("max_tokens", "max_completion_tokens"):
            value = getattr(request, param)
            if value is not None:
                put("thought.max_tokens", min(value, self.limits.max_tokens), param)
        if query.system is not None:
            prompt = served.spec.thought.prompt
            system = "\n\n".join(s for s in (prompt.system, query.system) if s)
            put("thought.prompt", {"user": prompt.user, "system": system}, "messages")
        for key, value in request.branchwise.budget.items():
            put(f"budget.{key}", value, f"branchwise.budget.{key}")
        for key, value in request.branchwise.overrides.items():
            param = f"branchwise.overrides.{key}"
            if not any(key == p or key.startswith(p + ".") for p in OVERRIDABLE):
                raise APIError(
                    400,
                    f"{key!r} cannot be set per request: the server's engines, runtime, tools and outputs are fixed "
                    f"when it starts. A request may override: {', '.join(p + '.*' for p in OVERRIDABLE[:-1])}, "
                    f"{OVERRIDABLE[-1]}",
                    param=param,
                    code="override_not_allowed",
                )
            put(key, value, param)
        for path, value in out.items():
            if _has_env_ref(value):
                raise APIError(400, "environment references (${NAME}) are not allowed in requests", param=params[path])
        return out, params

    def _build(self, served: Served, overrides: dict[str, Any], params: dict[str, str]) -> Pipeline:
        try:
            spec = served.spec.with_overrides(overrides, parse_strings=False)
            pipeline = Pipeline.from_spec(spec, engines=served.engines)
        except SpecError as err:
            param = _param_for(err.path, params)
            raise APIError(400, f"{param}: {err.detail}", param=param, code="invalid_override") from None
        except ConfigError as err:
            raise APIError(400, str(err), param="branchwise.overrides", code="invalid_override") from None
        over = spec_over_limits(spec, pipeline.strategy, self.limits)
        if over is not None:
            param = _param_for(over[0], params)
            raise APIError(400, f"{over[0]}: {over[1]}", param=param, code="over_limit")
        return pipeline

    async def _evict(self) -> None:
        while len(self._variants) > VARIANT_CACHE:
            _, oldest = self._variants.popitem(last=False)
            oldest.evicted = True
            if oldest.users == 0:
                await oldest.pipeline.aclose()


def _server_spec(spec: PipelineSpec, limits: ServerLimits) -> PipelineSpec:
    """The spec as the server runs it: its runs write no trace of their own (the server records each run) and
    show no progress; budget caps it leaves unset are the server's."""
    fills: dict[str, Any] = {"outputs.progress": "off", "outputs.trace": None}
    if spec.budget.max_tokens is None:
        fills["budget.max_tokens"] = limits.max_run_tokens
    if spec.budget.wall_clock_s is None:
        fills["budget.wall_clock_s"] = limits.max_run_seconds
    return spec.with_overrides(fills, parse_strings=False)


def _engine_key(spec: PipelineSpec, role: str, engine: EngineSpec) -> str:
    """What makes two pipelines' engines for ``role`` the same engine: the resolved engine section, the runtime
    settings vLLM engines take, and for the policy its draft."""
    section: dict[str, Any] = {"engine": engine.model_dump(mode="json")}
    section["runtime"] = spec.runtime.model_dump(mode="json")
    draft = spec.engines.get("draft")
    if role == "policy" and draft is not None:
        section["draft"] = draft.model_dump(mode="json")
    return json.dumps(section, sort_keys=True, default=str)


def _engines_for(spec: PipelineSpec, shared: dict[str, Engine]) -> dict[str, Engine]:
    """The engines of ``spec`` by role: those already built for an identical section, the others built now (and
    added to ``shared``)."""
    resolved = spec.resolved()
    keys: dict[str, str] = {
        role: _engine_key(resolved, role, engine) for role, engine in resolved.engines.items() if role in ENGINE_ROLES
    }
    have = {role: shared[key] for role, key in keys.items() if key in shared}
    built = build_engines(resolved, skip=have)
    for role, engine in built.items():
        shared[keys[role]] = engine
    return {**have, **built}


def _param_for(path: str, params: Mapping[str, str]) -> str:
    """The request field behind a spec path an error names (the override at, above or below it)."""
    for spec_path, param in params.items():
        if path == spec_path or path.startswith(spec_path + "."):
            return param + path[len(spec_path) :] if param.startswith("branchwise.") else param
    for spec_path, param in params.items():
        if spec_path.startswith(path + "."):
            return param
    return path


def _has_env_ref(value: Any) -> bool:
    if isinstance(value, str):
        return ENV_REF.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_env_ref(k) or _has_env_ref(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_env_ref(v) for v in value)
    return False
