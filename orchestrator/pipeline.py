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
progress, the `stream` queue; see `branchwise.orchestrator.recording`) and returns a `RunResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from ..budget import Budget, UsageSnapshot
from ..engine.base import Engine
from ..engine.seeding import MAX_SEED, run_seed
from ..errors import ConfigError, UnknownNameError
from ..events import use_sink
from ..executors.agent import AgentResult, run_agent
from ..executors.tools import ToolRegistry
from ..planners.base import Planner
from ..search.base import PromptTemplate, Result, SearchContext, Strategy
from ..search.registry import strategy_info
from ..search.single import Single
from ..verifiers.extraction import AnswerExtractor
from ..verifiers.grading import BaseGrader
from .build import ENGINE_ROLES, Closeable, Components, build_components, build_engines, close_soon, run_budget
from .progress import LiveProgress, PlainProgress, make_progress
from .recording import RunRecording, describe_strategy, strategy_records
from .spec import PipelineSpec, load_spec
from .spec_env import secret_values
from .spec_strategy import Where, check_fan_out
from .tracing import Event, EventListener, OTelSink, TraceSpool, now_iso, otel_enabled

__all__ = ["Pipeline", "RunResult", "build_engines", "run", "run_sync"]

logger = logging.getLogger(__name__)

ProgressMode = Literal["auto", "on", "off"]
_T = TypeVar("_T")


def _installed_version() -> str | None:
    # the root package's __version__ would import it (and every layer it re-exports) from this lower layer
    try:
        return importlib.metadata.version("branchwise")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return None


_VERSION = _installed_version()
_CAPS = ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s", "max_cost")


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
        events: events recorded.
    """

    query: str
    answer: str | None
    result: Result | AgentResult | None
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


@dataclass(frozen=True)
class _Settings:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    concurrency: int = 8
    max_replans: int = 1


class Pipeline:
    """A reusable runner: engines, an optional planner and tools, a strategy, verifiers, a budget and outputs.

    Args:
        engine: the policy engine (every reasoning trace samples from it).
        strategy: the test-time-scaling strategy of every reasoning thread (default `Single`).
        planner: a planner (see `branchwise.planners.get_planner`); None runs the query as one thread.
        tools: the tools a planner may call.
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
        otel: emit OpenTelemetry spans when opentelemetry is installed and a tracer provider is given or set
            globally.
        tracer_provider: the OpenTelemetry ``TracerProvider`` for those spans (default: the global one).
        owns_engines: `aclose` closes the engines (pipelines built from YAML own theirs).
        spec: the spec this pipeline was built from, recorded in trace headers (secrets masked).
        secrets: strings that must never appear in traces (resolved environment values).
        components: what a spec built besides engines, closed with the pipeline (scorers, built engines).

    Raises:
        ConfigError: bad arguments, a strategy count above its documented bound, or a strategy that starts more
            traces than the budget has tokens.
    """

    def __init__(
        self,
        engine: Engine,
        strategy: Strategy | None = None,
        *,
        planner: Planner | None = None,
        tools: ToolRegistry | None = None,
        budget: Budget | Mapping[str, Any] | None = None,
        engines: Mapping[str, Engine] | None = None,
        extractor: AnswerExtractor | None = None,
        grader: BaseGrader | None = None,
        prompt: PromptTemplate | None = None,
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
        components: Components | None = None,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"Pipeline: engine must be an Engine, got {type(engine).__name__}")
        strategy = Single() if strategy is None else strategy
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
        _check_strategy(strategy, self.caps)
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
        self._components = components
        self._built_engines: list[Engine] = []
        self._closed = False

    # -- construction from YAML --------------------------------------------------------------------------------
    @classmethod
    def from_yaml(
        cls,
        source: str | Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        engines: Mapping[str, Engine] | None = None,
    ) -> Pipeline:
        """Build a pipeline from a YAML file path or YAML text (see `branchwise.orchestrator.spec.load_spec`).

        Args:
            source: a ``.yaml`` path or the YAML text.
            overrides: dotted-path overrides, e.g. ``{"thought.n": 8}``.
            engines: ready engines by role, used instead of building those roles' engines from the spec (the
                pipeline does not close them), e.g. one vLLM engine shared by many pipelines.

        Raises:
            SpecError: the spec is invalid (the message names the YAML path and line).
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
        base = Path(spec.source).parent if Path(spec.source).is_file() else None
        built_engines = build_engines(resolved, skip=given)
        all_engines = {**built_engines, **given}
        try:
            built = build_components(resolved, all_engines, base)
            strategy = built.strategy(resolved)
        except BaseException:
            close_soon(list(built_engines.values()))
            raise
        thought = resolved.thought
        pipeline = cls(
            all_engines["policy"],
            strategy,
            planner=built.planner,
            tools=built.tools,
            budget=resolved.budget.model_dump(),
            engines={r: e for r, e in all_engines.items() if r != "policy"},
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
            spec=spec,
            secrets=secret_values(spec.raw(), source=spec.source),
            components=built,
        )
        pipeline._built_engines = list(built_engines.values())  # closed with the pipeline; given ones are not
        return pipeline

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
        seed: int | None = None,
        trace_spool: TraceSpool | None = None,
    ) -> RunResult:
        """Answer ``query``.

        Args:
            query: the question or task.
            budget: the budget for this run (default: a fresh one with the pipeline's caps).
            trace: a trace path for this run instead of the pipeline's.
            listeners: extra event listeners for this run.
            seed: make the run's sampling reproducible: every engine call gets a seed derived from this one
                (`branchwise.engine.seeding`). Every engine must honour per-request seeds.
            trace_spool: write the trace file through this `TraceSpool` (a thread of its own) instead of on the
                event loop; for servers running many runs at once.

        Returns:
            The `RunResult`. A budget cap reached mid-run is not an error: the result is marked.

        Raises:
            ConfigError: the pipeline is closed, the query is empty, or the seed is invalid or cannot be honoured.
            BranchwiseError: a runtime failure (also recorded in the trace as an "error" event).
        """
        if self._closed:
            raise ConfigError("Pipeline is closed")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("Pipeline.run: the query must be a non-empty string")
        if seed is not None:
            self.check_seed(seed)
        await self.start()  # load models before the run's clock (and its wall-clock budget) starts
        run_id = uuid.uuid4().hex[:12]
        owned = budget is None
        budget = budget if budget is not None else self.new_budget()
        path = _trace_path(trace if trace is not None else self.trace, run_id)
        recording = self._recording(query, run_id, budget, path, listeners or [], spool=trace_spool)
        live = self._progress_listener()
        if live is not None:
            recording.add(live)
            live.start()
        outcome: Result | AgentResult | None = None
        try:
            with use_sink(recording.sink), _current(budget), run_seed(seed):
                recording.record("run_start", {**self._describe(query, budget), "seed": seed})
                budget.start()
                outcome = await self._execute(query, budget, recording)
        except (asyncio.CancelledError, KeyboardInterrupt):
            recording.failed("cancelled", "interrupted")
            raise
        except BaseException as err:
            recording.failed("error", f"{type(err).__name__}: {err}", err)
            raise
        finally:
            if owned:
                budget.stop()  # the run it meters is over (a budget passed in belongs to the caller)
            end = recording.finish(outcome, budget)
            if live is not None:
                live.stop()
        return RunResult(
            query, end.answer, outcome, end.usage, path, end.pruned, end.budget_exhausted, end.seconds, run_id,
            recording.events,
        )  # fmt: skip

    def check_seed(self, seed: int) -> None:
        """Check that runs of this pipeline can be seeded with ``seed`` (see `run`).

        Raises:
            ConfigError: ``seed`` is not an integer in [0, `MAX_SEED`], or an engine cannot honour per-request seeds.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"Pipeline.run: seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
        for role, engine in self.engines.items():
            caps = engine.capabilities
            if not caps.per_request_seed:
                why = caps.extra.get("per_request_seed")
                raise ConfigError(
                    f"Pipeline.run: a seeded run needs engines that honour per-request seeds; the {role} engine "
                    f"({engine.backend}) does not" + (f": {why}" if why else "")
                )

    async def _execute(self, query: str, budget: Budget, recording: RunRecording) -> Result | AgentResult:
        s = self.settings
        context: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
        context["prompt"] = self.prompt
        if self.extractor is not None:
            context["extractor"] = self.extractor
        if self.grader is not None:
            context["grader"] = self.grader
        if self.planner is None:
            ctx = SearchContext(engine=self.engine, budget=budget, **context)
            recording.record(
                "strategy_start", {"strategy": self.strategy.name, "params": describe_strategy(self.strategy)}
            )
            result = await self.strategy.run(query, ctx)
            for kind, data in strategy_records(result):
                recording.record(kind, data)
            return result
        return await run_agent(
            query,
            planner=self.planner,
            tools=self.tools if self.tools is not None else ToolRegistry(),
            engine=self.engine,
            budget=budget,
            thought=self.strategy,
            max_replans=s.max_replans,
            concurrency=s.concurrency,
            thought_context=context,
        )

    async def start(self) -> None:
        """Start every engine (load models); `run` does it first, so a run's time excludes model loading."""
        if self._closed:
            raise ConfigError("Pipeline is closed")
        for engine in _distinct(self.engines.values()):
            await engine.start()

    def run_sync(self, query: str, *, budget: Budget | None = None, seed: int | None = None) -> RunResult:
        """`run` from synchronous code (starts an event loop; not from inside a running loop)."""
        return asyncio.run(self.run(query, budget=budget, seed=seed))

    async def stream(
        self, query: str, *, budget: Budget | None = None, seed: int | None = None
    ) -> AsyncIterator[Event]:
        """Run ``query`` and yield its events as they happen (the last one is "run_end").

        Leaving the loop early cancels the run (its engine requests are aborted). A run failure is raised after
        the events that led to it.
        """
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self.run(query, budget=budget, listeners=[queue.put_nowait], seed=seed), name="branchwise-pipeline-stream"
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
        """Release what the pipeline owns: the engines and scorers it built (all engines with ``owns_engines``);
        idempotent. A failure to close one is logged and the others are still closed."""
        if self._closed:
            return
        self._closed = True
        owned: list[Closeable] = list(self._components.closeables) if self._components is not None else []
        owned += self._built_engines
        if self.owns_engines:
            owned += [e for e in self.engines.values() if e not in owned]
        for item in _distinct(owned):
            try:
                await item.aclose()
            except Exception:
                logger.exception("closing %r failed", item)

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- helpers -----------------------------------------------------------------------------------------------
    def _recording(
        self,
        query: str,
        run_id: str,
        budget: Budget,
        path: Path | None,
        listeners: list[EventListener],
        *,
        spool: TraceSpool | None,
    ) -> RunRecording:
        header = {
            "run_id": run_id,
            "created": now_iso(),
            "branchwise": _VERSION,
            "query": query,
            "spec": self.spec.redacted() if self.spec is not None else None,
        }
        recording = RunRecording(
            listeners,
            secrets=self.secrets,
            budget=budget,
            engines=self.engines,
            trace=(path, header) if path is not None else None,
            spool=spool,
        )
        if self.otel and otel_enabled(self.tracer_provider):
            recording.add(OTelSink(self.tracer_provider))
        return recording

    def _describe(self, query: str, budget: Budget) -> dict[str, Any]:
        return {
            "query": query,
            "strategy": self.strategy.name,
            "params": describe_strategy(self.strategy),
            "planner": None
            if self.planner is None
            else (getattr(self.planner, "kind", None) or type(self.planner).__name__),
            "tools": self.tools.names() if self.tools is not None else [],
            "engines": {role: {"backend": e.backend, "model": e.model} for role, e in self.engines.items()},
            "budget": {k: getattr(budget, k) for k in _CAPS if getattr(budget, k) is not None},
            "budget_path": budget.path,
        }

    def _progress_listener(self) -> LiveProgress | PlainProgress | None:
        if self.progress == "off":
            return None
        out = self.progress_file if self.progress_file is not None else sys.stderr
        return make_progress(out, live=None if self.progress == "auto" else True, caps=self.caps)


# -- module-level helpers -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _current(budget: Budget) -> Iterator[None]:
    token = run_budget.set(budget)
    try:
        yield
    finally:
        run_budget.reset(token)


def _distinct(items: Iterable[_T]) -> list[_T]:
    seen: set[int] = set()
    out: list[_T] = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out


def _check_strategy(strategy: Strategy, caps: Mapping[str, Any]) -> None:
    """A registered strategy's counts within their bounds, and its fan-out within the budget's token caps."""
    try:
        info = strategy_info(strategy.name)
    except UnknownNameError:
        return  # a strategy object that was never registered declares nothing to check
    if info.cls is type(strategy):
        info.check_bounds(strategy)
    try:
        check_fan_out(strategy, caps, ("strategy",), Where({}, "Pipeline"))
    except ConfigError as err:
        raise ConfigError(f"Pipeline: {getattr(err, 'detail', err)}") from None


def _caps_of(budget: Budget | Mapping[str, Any] | None) -> dict[str, Any]:
    if budget is None:
        return {}
    if isinstance(budget, Budget):
        caps: dict[str, Any] = {k: getattr(budget, k) for k in _CAPS if getattr(budget, k) is not None}
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


# -- one-call helpers -------------------------------------------------------------------------------------------
async def run(
    query: str,
    *,
    engine: Engine,
    strategy: Strategy | None = None,
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
    strategy: Strategy | None = None,
    budget: Budget | Mapping[str, Any] | None = None,
    **options: Any,
) -> RunResult:
    """`run` from synchronous code."""
    return asyncio.run(run(query, engine=engine, strategy=strategy, budget=budget, **options))
