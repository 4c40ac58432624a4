"""The `Pipeline` facade: one object that runs a query through a planner and/or a test-time-scaling strategy.

Two doors lead to the same objects:

```python
pipeline = Pipeline.from_yaml("examples/sc-math.yaml")            # a YAML spec
pipeline = Pipeline(engine=engine, strategy=SelfConsistency(n=8),  # or Python objects
                    budget=Budget(max_tokens=20_000))
result = await pipeline.run("A train goes 60 mph for 3 hours. How far?")
async for event in pipeline.stream("..."):                          # or watch it work
    ...
```

Without a planner the query is one reasoning thread: the strategy runs on it directly. With a planner the
query becomes a DAG (`branchwise.executors.agent.run_agent`) whose reasoning nodes run the strategy. Each run
gets a fresh `Budget` with the pipeline's caps, records its events (JSONL trace, OpenTelemetry spans, live
progress, the `stream` queue) and returns a `RunResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, get_args

from ..budget import Budget, UsageSnapshot
from ..engine.base import Engine
from ..engine.types import CallUsage, GenerationRequest
from ..errors import ConfigError, EngineRequestError
from ..events import use_sink
from .spec import EngineRole, EngineSpec, PipelineSpec, build_strategy, load_spec
from .tracing import Event, EventListener, OTelSink, Recorder, TraceWriter, now_iso, otel_available

__all__ = ["Pipeline", "RunResult", "run", "run_sync"]

logger = logging.getLogger(__name__)

ProgressMode = Literal["auto", "on", "off"]
_RUN_BUDGET: ContextVar[Budget | None] = ContextVar("branchwise_run_budget", default=None)


@dataclass
class RunResult:
    """What one pipeline run produced.

    Attributes:
        query: the query.
        answer: the final answer (None if none was found).
        result: the strategy's `Result` (no planner) or the agent's `AgentResult` (with a planner).
        usage: what the run cost (tokens, calls, aborted tokens, wall time...).
        trace_path: the JSONL trace written, if any.
        pruned: traces aborted by a strategy rule.
        budget_exhausted: a budget cap stopped the run early or clipped a sample short (the answer is the best
            one so far).
        seconds: wall time of the run.
        run_id: the run's id (also in the trace header).
    """

    query: str
    answer: str | None
    result: Any
    usage: UsageSnapshot
    trace_path: Path | None
    pruned: int
    budget_exhausted: bool
    seconds: float
    run_id: str
    events: int = 0

    @property
    def llm_calls(self) -> int:
        return self.usage.calls

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of the run."""
        return {
            "answer": self.answer,
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "total_tokens": self.usage.total_tokens,
            "llm_calls": self.usage.calls,
            "seconds": round(self.seconds, 3),
            "pruned": self.pruned,
            "budget_exhausted": self.budget_exhausted,
            "trace": str(self.trace_path) if self.trace_path else None,
            "run_id": self.run_id,
        }


_CAPS = ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s", "max_cost")


@dataclass
class _Settings:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    concurrency: int = 8
    max_replans: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Pipeline:
    """A reusable runner: engines, an optional planner and tools, a strategy, verifiers, a budget and outputs.

    Args:
        engine: the policy engine (every reasoning trace samples from it).
        strategy: the test-time-scaling strategy of every reasoning thread (default `Single`).
        planner: a planner (see `branchwise.planners.get_planner`); None runs the query as one thread.
        tools: the tools a planner may call (a `ToolRegistry`).
        budget: caps for each run: a `Budget` (its caps are copied into a fresh budget per run) or a mapping of
            caps (``{"max_tokens": 20000}``); None meters without limits.
        engines: other engines by role ("judge"), recorded in events.
        extractor: the `AnswerExtractor` (default rules when None).
        grader: the grader that clusters answers (`NumericGrader` when None).
        prompt: the `PromptTemplate` turning the query into messages.
        temperature: sampling temperature of the strategy's traces.
        top_p: nucleus sampling mass.
        max_tokens: token cap per trace.
        concurrency: DAG nodes running at once (with a planner).
        max_replans: re-planning rounds allowed (with a planner).
        trace: path of the JSONL trace of each run (``{run_id}`` and ``{time}`` are filled in); None for none.
        progress: live progress: "on", "off" or "auto" (on when ``progress_file`` is a terminal).
        progress_file: where progress goes (default ``sys.stderr``).
        otel: emit OpenTelemetry spans when opentelemetry is installed.
        tracer_provider: the OpenTelemetry ``TracerProvider`` for those spans (default: the global one).
        owns_engines: `aclose` closes the engines (pipelines built from YAML own theirs).
        spec: the spec this pipeline was built from, recorded in trace headers (secrets masked).
        secrets: strings that must never appear in traces (resolved environment values).

    Raises:
        ConfigError: bad arguments.
    """

    def __init__(
        self,
        engine: Engine,
        strategy: Any = None,
        *,
        planner: Any = None,
        tools: Any = None,
        budget: Budget | Mapping[str, Any] | None = None,
        engines: Mapping[str, Engine] | None = None,
        extractor: Any = None,
        grader: Any = None,
        prompt: Any = None,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 512,
        concurrency: int = 8,
        max_replans: int = 1,
        trace: str | Path | None = None,
        progress: ProgressMode | bool = "off",
        progress_file: IO[str] | None = None,
        otel: bool = True,
        tracer_provider: Any = None,
        owns_engines: bool = False,
        spec: PipelineSpec | None = None,
        secrets: list[str] | None = None,
        closeables: list[Any] | None = None,
    ) -> None:
        from ..search.base import PromptTemplate, Strategy
        from ..search.single import Single

        if not isinstance(engine, Engine):
            raise ConfigError(f"Pipeline: engine must be an Engine, got {type(engine).__name__}")
        if strategy is None:
            strategy = Single()
        if not isinstance(strategy, Strategy):
            raise ConfigError(f"Pipeline: strategy must be a search Strategy, got {type(strategy).__name__}")
        if tools is not None and planner is None:
            raise ConfigError("Pipeline: tools need a planner (without one the query is a single reasoning thread)")
        if concurrency < 1 or max_replans < 0 or max_tokens < 1:
            raise ConfigError("Pipeline: concurrency and max_tokens must be >= 1, max_replans >= 0")
        if isinstance(progress, bool):
            progress = "on" if progress else "off"
        if progress not in ("auto", "on", "off"):
            raise ConfigError(f"Pipeline: progress must be 'auto', 'on' or 'off', got {progress!r}")
        self.engine = engine
        self.engines: dict[str, Engine] = {"policy": engine, **dict(engines or {})}
        self.strategy = strategy
        self.planner = planner
        self.tools = tools
        self.caps = _caps_of(budget)
        self.extractor = extractor
        self.grader = grader
        self.prompt = prompt if prompt is not None else PromptTemplate()
        self.settings = _Settings(temperature, top_p, max_tokens, concurrency, max_replans)
        self.trace = trace
        self.progress: ProgressMode = progress
        self.progress_file = progress_file
        self.otel = otel
        self.tracer_provider = tracer_provider
        self.owns_engines = owns_engines
        self.spec = spec
        self.secrets = [s for s in (secrets or []) if s]
        self._closeables = list(closeables or [])
        self._closed = False
        for e in self.engines.values():
            _install_hook(e)

    # -- construction from YAML --------------------------------------------------------------------------------
    @classmethod
    def from_yaml(
        cls,
        source: str | Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        engines: Mapping[str, Engine] | None = None,
    ) -> Pipeline:
        """Build a pipeline from a YAML file path or YAML text (see `branchwise.orchestrator.spec`).

        Args:
            source: a ``.yaml`` path or the YAML text.
            overrides: dotted-path overrides, e.g. ``{"thought.n": 8}``.
            engines: ready engines by role, used instead of building those roles' engines from the spec (the
                pipeline does not close them), e.g. one vLLM engine shared by many pipelines.

        Raises:
            ConfigError: the spec is invalid (the message names the YAML path and line).
        """
        return cls.from_spec(load_spec(source, overrides=overrides), engines=engines)

    @classmethod
    def from_spec(cls, spec: PipelineSpec, *, engines: Mapping[str, Engine] | None = None) -> Pipeline:
        """Build a pipeline from a validated spec; ``${ENV}`` references are resolved now.

        Args:
            spec: the spec.
            engines: ready engines by role, used instead of building them (see `from_yaml`).
        """
        given = dict(engines or {})
        unknown = sorted(set(given) - (set(spec.engines) & set(ENGINE_ROLES)))
        if unknown:
            raise ConfigError(
                f"engines given for roles the spec does not declare as engine roles ({', '.join(ENGINE_ROLES)}): "
                f"{', '.join(unknown)}"
            )
        resolved = spec.resolved()
        secrets = _secret_values(spec)
        base = Path(spec.source).parent if spec.source not in ("<string>",) and Path(spec.source).exists() else None
        closeables: list[Any] = []
        built_engines = build_engines(resolved, skip=given)
        engines = {**built_engines, **given}
        try:
            policy = engines["policy"]
            built = _build_components(resolved, engines, base)
            closeables.extend(built.closeables)
            strategy = build_strategy(
                resolved.thought, resolved, scorer=built.step_scorer, judge=built.judge, verifier=built.verifier
            )
        except BaseException:
            for engine in built_engines.values():
                with contextlib.suppress(Exception):
                    _close_soon(engine)
            raise
        from ..search.base import PromptTemplate

        thought = resolved.thought
        return cls(
            policy,
            strategy,
            planner=built.planner,
            tools=built.tools,
            budget=resolved.budget.model_dump(),
            engines={r: e for r, e in engines.items() if r != "policy"},
            extractor=built.extractor,
            grader=built.grader,
            prompt=PromptTemplate(user=thought.prompt.user, system=thought.prompt.system),
            temperature=thought.temperature,
            top_p=thought.top_p,
            max_tokens=thought.max_tokens,
            concurrency=resolved.runtime.concurrency,
            max_replans=resolved.planner.max_replans if resolved.planner else 1,
            trace=resolved.outputs.trace,
            progress=resolved.outputs.progress,
            otel=resolved.outputs.otel,
            owns_engines=False,
            spec=spec,
            secrets=secrets,
            closeables=[*closeables, *built_engines.values()],  # the engines it built, not those it was given
        )

    # -- running -----------------------------------------------------------------------------------------------
    def new_budget(self) -> Budget:
        """A fresh budget with this pipeline's caps."""
        return Budget(**self.caps)

    async def run(
        self,
        query: str,
        *,
        budget: Budget | None = None,
        trace: str | Path | None = None,
        listeners: list[EventListener] | None = None,
    ) -> RunResult:
        """Answer ``query``.

        Args:
            query: the question or task.
            budget: the budget for this run (default: a fresh one with the pipeline's caps).
            trace: a trace path for this run instead of the pipeline's.
            listeners: extra event listeners for this run.

        Returns:
            The `RunResult`. A budget cap reached mid-run is not an error: the result is marked.

        Raises:
            ConfigError: the pipeline is closed or the query is empty.
            BranchwiseError: a runtime failure (also recorded in the trace as an "error" event).
        """
        if self._closed:
            raise ConfigError("Pipeline is closed")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("Pipeline.run: the query must be a non-empty string")
        await self.start()  # load models before the run's clock (and its wall-clock budget) starts
        run_id = uuid.uuid4().hex[:12]
        owned = budget is None
        budget = budget if budget is not None else self.new_budget()
        path = _trace_path(trace if trace is not None else self.trace, run_id)
        recorder = Recorder(listeners or [], secrets=self.secrets, budget_path=budget.path)
        writer: TraceWriter | None = None
        live: Any = None
        if path is not None:
            header = {
                "run_id": run_id,
                "created": now_iso(),
                "branchwise": _version(),
                "query": query,
                "spec": self.spec.redacted() if self.spec is not None else None,
            }
            writer = TraceWriter(path, recorder.redact(header))
            recorder.listeners.insert(0, writer)
        if self.otel and otel_available():
            recorder.add(OTelSink(self.tracer_provider))
        live = self._progress_listener()
        if live is not None:
            recorder.add(live)
            live.start()
        counts = _Counts()
        recorder.add(counts)
        started = time.perf_counter()
        status, error = "ok", None
        outcome: Any = None
        try:
            with use_sink(recorder.emit):
                token = _RUN_BUDGET.set(budget)
                roles = _ROLES.set({id(e): role for role, e in reversed(self.engines.items())})
                try:
                    recorder("run_start", self._describe(query, budget))
                    budget.start()
                    outcome = await self._execute(query, budget, recorder)
                finally:
                    _ROLES.reset(roles)
                    _RUN_BUDGET.reset(token)
        except (asyncio.CancelledError, KeyboardInterrupt):
            status, error = "cancelled", "interrupted"
            raise
        except BaseException as err:
            status, error = "error", f"{type(err).__name__}: {err}"
            recorder("error", {"type": type(err).__name__, "message": str(err)})
            raise
        finally:
            if owned:
                budget.stop()  # the run it meters is over (a budget passed in belongs to the caller)
            if status != "ok":
                counts.close_open(recorder, status)
            usage = budget.usage.snapshot()
            answer = getattr(outcome, "answer", None)
            pruned = outcome.pruned if hasattr(outcome, "pruned") and isinstance(outcome.pruned, int) else counts.pruned
            # The strategy knows whether a cap cut its work; a cap merely reached (max_calls hit by the last
            # call) is not a cut.
            flag = getattr(outcome, "budget_exhausted", None)
            exhausted = bool(flag) if isinstance(flag, bool) else budget.exhausted
            seconds = time.perf_counter() - started
            recorder(
                "run_end",
                {
                    "status": status,
                    "error": error,
                    "answer": answer,
                    "usage": usage.to_dict(),
                    "pruned": pruned,
                    "budget_exhausted": exhausted,
                    "seconds": seconds,
                },
            )
            if live is not None:
                live.stop()
            if writer is not None:
                writer.close()
        return RunResult(query, answer, outcome, usage, path, pruned, exhausted, seconds, run_id, recorder.count)

    async def _execute(self, query: str, budget: Budget, recorder: Recorder) -> Any:
        from ..search.base import SearchContext

        s = self.settings
        context: dict[str, Any] = {
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "prompt": self.prompt,
        }
        if self.extractor is not None:
            context["extractor"] = self.extractor
        if self.grader is not None:
            context["grader"] = self.grader
        if self.planner is None:
            ctx = SearchContext(engine=self.engine, budget=budget, **context)
            recorder("strategy_start", {"strategy": self.strategy.name, "params": _params(self.strategy)})
            result = await self.strategy.run(query, ctx)
            recorder(
                "strategy_end",
                {
                    "strategy": result.strategy,
                    "answer": result.answer,
                    "votes": result.votes,
                    "pruned": result.pruned,
                    "budget_exhausted": result.budget_exhausted,
                    "usage": result.usage.to_dict(),
                    "decisions": result.decisions,
                    "tree": result.trace.uid,
                    "traces": [_node_record(n) for n in result.trace.nodes],
                },
            )
            for decision in result.decisions:
                recorder("decision", {"strategy": result.strategy, **dict(decision)})
            return result
        from ..executors.agent import run_agent

        kwargs: dict[str, Any] = {
            "planner": self.planner,
            "tools": self.tools,
            "engine": self.engine,
            "budget": budget,
            "thought": self.strategy,
            "max_replans": s.max_replans,
            "concurrency": s.concurrency,
            "events": recorder.emit,
        }
        accepted = inspect.signature(run_agent).parameters
        if "thought_context" in accepted:
            kwargs["thought_context"] = context
        return await run_agent(query, **{k: v for k, v in kwargs.items() if k in accepted})

    async def start(self) -> None:
        """Start every engine (load models); `run` does it first, so a run's time excludes model loading."""
        if self._closed:
            raise ConfigError("Pipeline is closed")
        seen: set[int] = set()
        for engine in self.engines.values():
            if id(engine) not in seen:
                seen.add(id(engine))
                await engine.start()

    def run_sync(self, query: str, *, budget: Budget | None = None) -> RunResult:
        """`run` from synchronous code (starts an event loop; not from inside a running loop)."""
        return asyncio.run(self.run(query, budget=budget))

    async def stream(self, query: str, *, budget: Budget | None = None) -> AsyncIterator[Event]:
        """Run ``query`` and yield its events as they happen (the last one is "run_end").

        Leaving the loop early cancels the run (its engine requests are aborted). A run failure is raised after
        the events that led to it.
        """
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self.run(query, budget=budget, listeners=[queue.put_nowait]), name="branchwise-pipeline-stream"
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while True:
                event = await queue.get()
                if event is None:
                    break
                yield event
            await task  # raise the run's failure, if any
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Release what the pipeline owns: its engines (when it built them), scorers; idempotent."""
        if self._closed:
            return
        self._closed = True
        for item in self._closeables:
            close = getattr(item, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    logger.exception("closing %r failed", item)
        if self.owns_engines:
            seen: set[int] = set()
            for engine in self.engines.values():
                if id(engine) in seen:
                    continue
                seen.add(id(engine))
                try:
                    await engine.aclose()
                except Exception:
                    logger.exception("closing engine %r failed", engine)

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _describe(self, query: str, budget: Budget) -> dict[str, Any]:
        return {
            "query": query,
            "strategy": self.strategy.name,
            "params": _params(self.strategy),
            "planner": _planner_name(self.planner),
            "tools": _tool_names(self.tools),
            "engines": {role: {"backend": e.backend, "model": e.model} for role, e in self.engines.items()},
            "budget": {k: getattr(budget, k) for k in _CAPS if getattr(budget, k) is not None},
            "budget_path": budget.path,
        }

    def _progress_listener(self) -> Any:
        import sys

        from .progress import make_progress

        if self.progress == "off":
            return None
        out = self.progress_file if self.progress_file is not None else sys.stderr
        return make_progress(out, live=None if self.progress == "auto" else True, caps=self.caps)


# -- module-level helpers -------------------------------------------------------------------------------------
class _Counts:
    """Counts prune events (the agent path reports pruning only through events) and tracks open traces."""

    def __init__(self) -> None:
        self.pruned = 0
        self.open: dict[tuple[Any, Any], str] = {}

    def __call__(self, event: Event) -> None:
        d = event.data
        if event.kind == "trace_start":
            self.open[(d.get("tree"), d.get("trace"))] = str(d.get("kind", ""))
        elif event.kind == "trace_end":
            self.open.pop((d.get("tree"), d.get("trace")), None)
            if d.get("status") == "pruned":
                self.pruned += 1

    def close_open(self, recorder: Recorder, status: str) -> None:
        """Record an end for every trace the run left open (it was cancelled or failed under them)."""
        for (tree, trace), kind in list(self.open.items()):
            recorder(
                "trace_end",
                {"tree": tree, "trace": trace, "kind": kind, "status": status, "detail": f"the run ended ({status})"},
            )


_HOOKED: weakref.WeakSet[Engine] = weakref.WeakSet()
_ROLES: ContextVar[dict[int, str]] = ContextVar("branchwise_engine_roles", default={})  # noqa: B039 - never mutated


def _install_hook(engine: Engine) -> None:
    """One usage hook per engine, however many pipelines share it: it reports each call to the run it belongs to
    (the event sink of the calling context), under the role that run gave the engine."""
    if engine not in _HOOKED:
        engine.add_usage_hook(_call_hook(engine))
        _HOOKED.add(engine)


def _call_hook(engine: Engine) -> Callable[[GenerationRequest, CallUsage], None]:
    from ..events import emit

    def hook(request: GenerationRequest, usage: CallUsage) -> None:
        emit(
            "engine_call",
            {
                "role": _ROLES.get().get(id(engine), "other"),
                "model": engine.model,
                "backend": engine.backend,
                "n": request.n,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "latency_s": usage.latency_s,
                "ttft_s": usage.ttft_s,
                "aborted": usage.aborted,
                "error": usage.error,
            },
        )

    return hook


def _params(strategy: Any) -> dict[str, Any]:
    try:
        described = dict(strategy.describe())
    except Exception:
        return {}
    out: dict[str, Any] = {}
    for key, value in described.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = getattr(value, "name", None) or type(value).__name__
    return out


def _node_record(node: Any) -> dict[str, Any]:
    return {
        "trace": node.id,
        "parent": node.parent,
        "kind": node.kind,
        "status": node.status,
        "tokens": node.tokens,
        "answer": node.answer,
        "scores": dict(node.scores),
        "rule": node.pruned_by,
        "detail": node.detail,
    }


def _planner_name(planner: Any) -> str | None:
    if planner is None or isinstance(planner, str):
        return planner
    if isinstance(planner, Mapping):
        return str(planner.get("kind"))
    return str(getattr(planner, "kind", None) or type(planner).__name__)


def _tool_names(tools: Any) -> list[str]:
    if tools is None:
        return []
    names = getattr(tools, "names", None)
    if callable(names):
        return list(names())
    return [getattr(t, "name", str(t)) for t in tools]


def _caps_of(budget: Budget | Mapping[str, Any] | None) -> dict[str, Any]:
    if budget is None:
        return {}
    if isinstance(budget, Budget):
        caps = {k: getattr(budget, k) for k in _CAPS if getattr(budget, k) is not None}
        if budget.cost_model is not None:
            caps["cost_model"] = budget.cost_model
        return caps
    if isinstance(budget, Mapping):
        caps = {k: v for k, v in budget.items() if v is not None}
        Budget(**caps)  # validate now
        return caps
    raise ConfigError(f"Pipeline: budget must be a Budget or a mapping of caps, got {type(budget).__name__}")


def _trace_path(template: str | Path | None, run_id: str) -> Path | None:
    if template is None:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(str(template).replace("{run_id}", run_id).replace("{time}", stamp))


def _version() -> str:
    from .. import __version__

    return __version__


def _secret_values(spec: PipelineSpec) -> list[str]:
    """Values that came from environment references or sit under secret-named keys: never written anywhere."""
    from .spec import _ENV_REF, SECRET_KEYS, resolve_env

    raw = spec.raw()
    done = resolve_env(raw, source=spec.source)
    found: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                walk(a[k], b.get(k), str(k))
        elif isinstance(a, list) and isinstance(b, list):
            for x, y in zip(a, b, strict=False):
                walk(x, y, key)
        elif (
            isinstance(a, str)
            and isinstance(b, str)
            and ((_ENV_REF.search(a) and b != a) or any(s in key.lower() for s in SECRET_KEYS))
        ):
            found.append(b)

    walk(raw, done, "")
    return sorted({f for f in found if len(f) >= 4}, key=len, reverse=True)


def _close_soon(engine: Engine) -> None:
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop().create_task(engine.aclose())


# -- building components from a spec --------------------------------------------------------------------------
ENGINE_ROLES: tuple[str, ...] = get_args(EngineRole)
"""Roles served by an `Engine`; ``draft`` configures the policy engine and ``embedder`` the embedding judge."""


def build_engines(spec: PipelineSpec, *, skip: Collection[str] = ()) -> dict[str, Engine]:
    """The engines of a resolved spec's engine roles, except those in ``skip`` (given ready by the caller).

    A ``draft`` role becomes the policy engine's ``speculative_config``.
    """
    engines: dict[str, Engine] = {}
    draft = spec.engines.get("draft")
    try:
        for role, engine_spec in spec.engines.items():
            if role not in ENGINE_ROLES or role in skip:
                continue
            if role == "policy" and draft is not None:
                options = {**engine_spec.options, "speculative_config": draft.speculative_config()}
                engines[role] = build_engine(engine_spec.model_copy(update={"options": options}), runtime=spec.runtime)
            else:
                engines[role] = build_engine(engine_spec, runtime=spec.runtime)
    except BaseException:
        for engine in engines.values():
            with contextlib.suppress(Exception):
                _close_soon(engine)
        raise
    return engines


def build_engine(spec: EngineSpec, *, runtime: Any = None) -> Engine:
    """An engine from its spec (``test`` specs become a scripted `FunctionEngine`)."""
    from ..engine import create_engine

    options = dict(spec.options)
    if spec.backend == "test":
        return _scripted_engine(spec)
    if spec.backend == "vllm":
        if runtime is not None:
            if runtime.seed is not None:
                options.setdefault("seed", runtime.seed)
            if runtime.dtype is not None:
                options.setdefault("dtype", runtime.dtype)
            if runtime.max_num_seqs is not None:
                options.setdefault("max_num_seqs", runtime.max_num_seqs)
        if spec.model:
            options["model"] = spec.model
    else:
        options["model"] = spec.model
        if spec.base_url is not None:
            options["base_url"] = spec.base_url
        if spec.api_key is not None:
            options["api_key"] = spec.api_key
    try:
        return create_engine(spec.backend, **options)
    except TypeError as err:
        raise ConfigError(f"invalid {spec.backend} engine option: {err}") from None


def _scripted_engine(spec: EngineSpec) -> Engine:
    from ..engine.testing import FunctionEngine, ScriptedResponse, render_prompt
    from .spec import ReplySpec

    def convert(reply: Any) -> Any:
        if isinstance(reply, ReplySpec):
            logprobs: Any = reply.logprobs
            if isinstance(logprobs, list):
                logprobs = tuple(tuple(x) for x in logprobs)
            return ScriptedResponse(
                tuple(reply.texts), logprobs=logprobs, finish_reason=reply.finish_reason, token_delay=reply.token_delay
            )
        return reply

    queue = deque(convert(r) for r in spec.replies)
    rules = [(re.compile(r.when), convert(r.reply)) for r in spec.rules]
    default = convert(spec.default) if spec.default is not None else None

    def reply(request: GenerationRequest) -> Any:
        prompt = render_prompt(request)
        for pattern, answer in rules:
            if pattern.search(prompt):
                return answer
        if queue:
            return queue.popleft()
        if default is not None:
            return default
        raise EngineRequestError("scripted engine: no rule matched, the reply queue is empty and there is no default")

    return FunctionEngine(reply, model=spec.model or "scripted", token_delay=spec.token_delay)


@dataclass
class _Components:
    extractor: Any = None
    grader: Any = None
    step_scorer: Any = None
    judge: Any = None
    verifier: Any = None
    planner: Any = None
    tools: Any = None
    closeables: list[Any] = field(default_factory=list)


def _build_components(spec: PipelineSpec, engines: Mapping[str, Engine], base: Path | None) -> _Components:
    from ..verifiers.extraction import AnswerExtractor
    from ..verifiers.grading import get_grader

    out = _Components()
    v = spec.verifiers
    if v.extractor is not None:
        out.extractor = AnswerExtractor(v.extractor)
    out.grader = get_grader(v.grader.kind, **v.grader.options)

    def role(name: str | None, fallback: str | None) -> Engine | None:
        if name is not None:
            return engines[name]
        return engines.get(fallback) if fallback is not None else None

    if v.step_scorer is not None:
        s = v.step_scorer
        from ..verifiers import step_scorers as ss

        if s.kind == "generative_judge":
            out.step_scorer = ss.GenerativeJudgeScorer(
                role(s.engine, "judge"), top_logprobs=s.top_logprobs, fallback=s.fallback
            )
        elif s.kind == "scripted":
            out.step_scorer = ss.ScriptedStepScorer(dict(s.scores), default=s.default)
        else:
            assert s.base_url is not None and s.model is not None
            out.step_scorer = ss.VLLMRewardModelScorer.http(s.base_url, s.model)
        out.closeables.append(out.step_scorer)
    if v.redundancy is not None:
        from ..verifiers import redundancy as rd

        r = v.redundancy
        options = dict(r.options)
        if r.threshold is not None:
            options["threshold"] = r.threshold
        if r.kind == "answer":
            options.setdefault("grader", out.grader)
            if out.extractor is not None:
                options.setdefault("extractor", out.extractor)
            out.judge = rd.AnswerRedundancy(**options)
        elif r.kind == "lexical":
            out.judge = rd.LexicalRedundancy(**options)
        else:
            embedder = spec.engines.get("embedder")
            if embedder is not None:
                options.setdefault("model", embedder.model)
                options.update(embedder.options)
            out.judge = rd.EmbeddingRedundancy(**options)
    if v.verifier is not None:
        out.verifier = _run_verifier(role(v.verifier.engine, "judge") or engines["policy"], v.verifier)
    if spec.planner is not None:
        out.planner = _build_planner(spec)
        out.tools = _build_tools(spec, base)
    elif spec.tools:
        raise ConfigError("tools are listed but there is no planner to call them: add a 'planner' section")
    return out


def _run_verifier(engine: Engine, vspec: Any) -> Callable[[str, Any], Any]:
    """A best_of_n scorer: a generative verifier charged to the current run's budget."""
    from ..verifiers.genrm import GenerativeVerifier

    GenerativeVerifier(engine, k=vspec.k, temperature=vspec.temperature, max_tokens=vspec.max_tokens)  # validate

    async def score(problem: str, candidate: Any) -> float:
        verifier = GenerativeVerifier(
            engine, k=vspec.k, temperature=vspec.temperature, max_tokens=vspec.max_tokens, budget=_RUN_BUDGET.get()
        )
        return float(await verifier(problem, candidate))

    return score


def _build_planner(spec: PipelineSpec) -> Any:
    from ..planners import get_planner

    assert spec.planner is not None
    try:
        return get_planner(spec.planner.kind, **spec.planner.options)
    except TypeError as err:
        raise ConfigError(f"invalid planner option for {spec.planner.kind!r}: {err}") from None


def _build_tools(spec: PipelineSpec, base: Path | None) -> Any:
    """The listed tools (names and options were checked when the spec was loaded); none listed: no tools."""
    from ..executors.tools import ToolRegistry, default_tools
    from .spec import SpecError

    names = [t.name for t in spec.tools]
    corpus = None
    for i, tool in enumerate(spec.tools):
        if tool.name == "retrieve":
            corpus = _resolve_path(str(tool.options["corpus"]), base)
            if not Path(corpus).exists():
                where = f"tools.{i}.corpus"
                raise SpecError(
                    f"corpus {corpus!r} does not exist (relative paths are tried next to the YAML file, then in "
                    "the working directory)",
                    path=where,
                    line=spec.line_of(f"tools.{i}.retrieve.corpus"),
                    source=spec.source,
                )
    everything = default_tools(corpus=corpus, enable_http="http_get" in names)
    return ToolRegistry([everything.get(n) for n in names])


def _resolve_path(value: str, base: Path | None) -> str:
    path = Path(value)
    if not path.is_absolute() and base is not None and (base / path).exists():
        return str(base / path)
    return str(path)


# -- one-call helpers -------------------------------------------------------------------------------------------
async def run(
    query: str,
    *,
    engine: Engine,
    strategy: Any = None,
    budget: Budget | Mapping[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """Answer ``query`` once with a throw-away `Pipeline` (the engine is not closed).

    Example:
        >>> result = await bw.run("2 + 2?", engine=engine, strategy=bw.search.SelfConsistency(n=8))
    """
    pipeline = Pipeline(engine, strategy, budget=budget, **options)
    try:
        return await pipeline.run(query)
    finally:
        await pipeline.aclose()


def run_sync(
    query: str,
    *,
    engine: Engine,
    strategy: Any = None,
    budget: Budget | Mapping[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """`run` from synchronous code."""
    return asyncio.run(run(query, engine=engine, strategy=strategy, budget=budget, **options))
