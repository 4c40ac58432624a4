"""The evaluation runner: many problems x configurations, concurrently, under one budget, into the store.

The runner knows nothing about pipelines or strategies: a configuration is a label, its parameters and a
``solve`` coroutine ``solve(problem, budget) -> result``, where the result looks like a search `Result` (an
``answer``, ``candidates`` with answer/confidence/tokens/score, ``votes``, ``usage``, ``budget_exhausted``) or
like a pipeline run result (the same, with the candidates in ``.result``). `strategy_solver` adapts a search
strategy on an engine; `evals.pipelines` adapts YAML pipelines.

For each configuration the pending problems (all of them, or with ``resume`` those without a stored row) run
``concurrency`` at a time. Each problem gets a child of the global `Budget`, so its own usage is recorded while
the global caps hold for the run; when a global cap is reached the run stops starting problems, and the problems
that were running when it was reached are not stored, since the run's budget (not their configuration) may have
clipped or aborted their calls; a later ``--resume`` with a larger budget runs them again. As each problem
finishes its answer and every candidate are graded with the benchmark's grader (graders that need a worker
process run there, never blocking the event loop), candidates are clustered by equivalence for maj@k, and its
row is committed in its own transaction from a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..budget import Budget
from ..engine.base import Engine
from ..errors import (
    BranchwiseError,
    BudgetExhausted,
    ConfigError,
    EngineUnavailable,
    GraderPoolError,
    ReplayMiss,
)
from ..search.base import SearchContext, Strategy
from ..verifiers.grading import BaseGrader
from .datasets import Benchmark, Problem
from .store import ConfigRecord, ResultRow, ResultsStore

__all__ = [
    "ConfigRun",
    "ConfigSummary",
    "Deliver",
    "Dispatch",
    "EvalConfig",
    "EvalSummary",
    "LineProgress",
    "ProblemSolver",
    "ProgressSink",
    "RichProgress",
    "Solve",
    "config_id",
    "failed_row",
    "make_progress",
    "parse_sweep",
    "run_eval",
    "strategy_solver",
]

logger = logging.getLogger(__name__)

Solve = Callable[[Problem, Budget], Awaitable[Any]]
"""``solve(problem, budget)``: solve one problem with every engine call charged to ``budget``."""

# Failures that mean the run cannot go on (no engine, no grader, bad configuration): they stop everything.
# A bank that cannot serve a request (ReplayMiss) means the configuration does not match the bank: stop too.
_FATAL: tuple[type[BaseException], ...] = (EngineUnavailable, GraderPoolError, ConfigError, ReplayMiss)


@dataclass(frozen=True)
class EvalConfig:
    """One configuration to evaluate.

    Attributes:
        label: a short name for reports ("self_consistency n=8", "thought.n=4").
        solve: the coroutine that solves one problem; None when a `Dispatch` given to `run_eval` solves the
            configuration's problems elsewhere (e.g. on Ray actors that build their own engines).
        params: everything that defines the configuration (JSON-serialisable); its hash is the config id.
        prepare: awaited before the configuration's first problem runs (e.g. a replay engine starts its bank
            over, so every configuration sees the same samples).
        time_scale: modelled seconds per real second. A replay engine pacing its bank's decode rate ``speedup``
            times faster sets it to ``speedup``: every latency and timestamp recorded for the configuration is
            then stretched by it from the configuration's start, so reports show modelled wall time.
    """

    label: str
    solve: Solve | None
    params: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[], Awaitable[None]] | None = None
    time_scale: float = 1.0


def config_id(benchmark: Benchmark, label: str, params: Mapping[str, Any]) -> str:
    """A stable id for (benchmark data, configuration): the first 16 hex digits of a sha256."""
    identity = {
        "benchmark": benchmark.name,
        "data": benchmark.sha256 or benchmark.source,
        "label": label,
        "params": params,
    }
    blob = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_sweep(specs: Sequence[str]) -> list[dict[str, str]]:
    """Expand ``--sweep key=v1,v2`` flags into one override dict per configuration (cartesian product).

    ``[]`` gives one empty override. Raises `ConfigError` for a flag without ``=``, an empty key or value, or a
    key swept twice.
    """
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        options = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(options):
            raise ConfigError(f"--sweep expects KEY=V1,V2,... with non-empty values, got {spec!r}")
        if any(key == k for k, _ in axes):
            raise ConfigError(f"--sweep key {key!r} given twice")
        axes.append((key, list(dict.fromkeys(options))))
    return [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


# ---------------------------------------------------------------------------------------------------------
# Progress


class ProgressSink(Protocol):
    """Receives progress: one configuration at a time."""

    def start(self, label: str, total: int, done: int) -> None: ...

    def advance(self, row: ResultRow) -> None: ...

    def finish(self) -> None: ...


class _Tally:
    def __init__(self) -> None:
        self.label, self.total, self.done, self.right, self.tokens = "", 0, 0, 0, 0
        self.new = 0
        self.started = time.perf_counter()

    def reset(self, label: str, total: int, done: int) -> None:
        self.label, self.total, self.done, self.right, self.tokens, self.new = label, total, done, 0, 0, 0
        self.started = time.perf_counter()

    def add(self, row: ResultRow) -> None:
        self.done += 1
        self.new += 1
        self.right += int(row.correct)
        self.tokens += row.usage_int("prompt_tokens") + row.usage_int("completion_tokens")

    @property
    def accuracy(self) -> float:
        return self.right / self.new if self.new else math.nan

    @property
    def eta_s(self) -> float:
        elapsed = time.perf_counter() - self.started
        return elapsed / self.new * (self.total - self.done) if self.new else math.nan


class LineProgress:
    """Plain progress lines on a stream (for logs and pipes): one line per finished problem, or every ``every``.

    Args:
        stream: where lines go (default stderr).
        every: write a line every this many problems (and always for the last one).
    """

    def __init__(self, stream: IO[str] | None = None, *, every: int = 1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = max(1, every)
        self._t = _Tally()

    def start(self, label: str, total: int, done: int) -> None:
        self._t.reset(label, total, done)
        self.stream.write(f"[eval] {label}: {total - done} to run ({done} already done)\n")
        self.stream.flush()

    def advance(self, row: ResultRow) -> None:
        t = self._t
        t.add(row)
        if t.new % self.every == 0 or t.done == t.total:
            eta = "?" if math.isnan(t.eta_s) else f"{t.eta_s:.0f}s"
            self.stream.write(
                f"[eval] {t.label}: {t.done}/{t.total} acc {t.accuracy:.1%} tokens {t.tokens:,} eta {eta}\n"
            )
            self.stream.flush()

    def finish(self) -> None:
        pass


class RichProgress:
    """A rich progress bar: problems done, accuracy so far, tokens, elapsed time and ETA."""

    def __init__(self, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]}"),
            TextColumn("tok {task.fields[tokens]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
        )
        self._task: TaskID | None = None
        self._running = False
        self._t = _Tally()

    def start(self, label: str, total: int, done: int) -> None:
        self._t.reset(label, total, done)
        if not self._running:
            self._progress.start()
            self._running = True
        self._task = self._progress.add_task(label, total=total, completed=done, acc="-", tokens="0")

    def advance(self, row: ResultRow) -> None:
        self._t.add(row)
        assert self._task is not None, "advance() before start()"
        self._progress.update(self._task, advance=1, acc=f"{self._t.accuracy:.1%}", tokens=f"{self._t.tokens:,}")

    def finish(self) -> None:
        if self._running:
            self._progress.stop()
            self._running = False


def make_progress(stream: IO[str] | None = None) -> ProgressSink:
    """A `RichProgress` when ``stream`` (default stderr) is a terminal, else `LineProgress`."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return RichProgress()
    return LineProgress(stream)


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class ConfigSummary:
    """What one configuration's run did."""

    label: str
    config_id: str
    total: int
    skipped: int = 0
    stored: int = 0
    errors: int = 0
    discarded: int = 0


@dataclass
class EvalSummary:
    """What a `run_eval` call did.

    Attributes:
        configs: per configuration, in order.
        stopped_by_budget: the global budget ran out before every problem ran.
        run_id: the store's record of this invocation.
    """

    configs: list[ConfigSummary]
    stopped_by_budget: bool
    run_id: int


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _usage_dict(usage: Any) -> dict[str, Any]:
    if usage is None:
        return {}
    if isinstance(usage, Mapping):
        return dict(usage)
    to_dict = getattr(usage, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    raise ConfigError(f"result usage must be a mapping or have to_dict(), got {type(usage).__name__}")


@dataclass(frozen=True)
class _Outcome:
    answer: str | None
    candidates: list[dict[str, Any]]
    votes: dict[str, float]
    usage: dict[str, Any]
    budget_exhausted: bool


def _outcome(result: Any, budget: Budget) -> _Outcome:
    """Read a search `Result`, a pipeline run result, or an equivalent mapping."""
    inner = _attr(result, "result")
    source = inner if inner is not None and _attr(inner, "candidates") is not None else result
    answer = _attr(result, "answer")
    candidates = []
    for c in _attr(source, "candidates") or ():
        candidates.append(
            {
                "answer": _attr(c, "answer"),
                "confidence": _attr(c, "confidence"),
                "verifier_score": _attr(c, "score"),
                "tokens": int(_attr(c, "tokens", 0) or 0),
            }
        )
    votes = {str(k): float(v) for k, v in (_attr(source, "votes") or {}).items()}
    usage = _usage_dict(_attr(result, "usage"))
    if not usage:
        usage = budget.usage.to_dict()
    return _Outcome(
        None if answer is None else str(answer),
        candidates,
        votes,
        usage,
        bool(_attr(result, "budget_exhausted", False)),
    )


async def _grade(grader: BaseGrader, problem: Problem, outcome: _Outcome) -> tuple[bool, float, list[dict[str, Any]]]:
    """Grade the answer and every candidate; give each candidate its answer cluster (None: no answer)."""
    verdicts: dict[str | None, tuple[bool, float]] = {}
    for answer in dict.fromkeys([outcome.answer, *(c["answer"] for c in outcome.candidates)]):
        result = await grader.grade(answer, problem.gold)
        verdicts[answer] = (result.correct, result.score)
    representatives: list[str] = []
    cluster_of: dict[str, int] = {}
    for c in outcome.candidates:
        answer = c["answer"]
        if answer is None or answer in cluster_of:
            continue
        for index, rep in enumerate(representatives):
            if await grader.aequivalent(rep, answer):
                cluster_of[answer] = index
                break
        else:
            cluster_of[answer] = len(representatives)
            representatives.append(answer)
    graded = []
    for c in outcome.candidates:
        correct, score = verdicts[c["answer"]]
        graded.append({**c, "correct": correct, "score": score, "cluster": cluster_of.get(c["answer"])})
    correct, score = verdicts[outcome.answer]
    return correct, score, graded


async def run_eval(
    benchmark: Benchmark,
    configs: Sequence[EvalConfig],
    store: ResultsStore,
    *,
    concurrency: int = 4,
    budget: Budget | None = None,
    resume: bool = False,
    grader: BaseGrader | None = None,
    progress: ProgressSink | None = None,
    repro: Mapping[str, Any] | None = None,
    argv: Sequence[str] = (),
    dispatch: Dispatch | None = None,
) -> EvalSummary:
    """Run every configuration on every problem of ``benchmark`` and store one row per (config, problem).

    Args:
        benchmark: the problems and their grader.
        configs: the configurations, run one after another (problems of one configuration run concurrently).
        store: the results store.
        concurrency: problems in flight at once.
        budget: the global budget every problem's calls are charged to (a child per problem); unlimited if None.
        resume: skip problems that already have a row (rows of failed problems are deleted and run again);
            without it, existing rows of a configuration are an error.
        grader: overrides the benchmark's grader.
        progress: progress display (default: none).
        repro: the reproducibility record stored with this invocation.
        argv: the command line, stored with this invocation.
        dispatch: where problems are solved (default: here, ``concurrency`` at a time, with ``config.solve``).
            Whatever solves them, rows are committed here, one at a time, as they arrive.

    Raises:
        ConfigError: bad arguments, duplicate configuration labels, or existing rows without ``resume``.
        EngineUnavailable, GraderPoolError: the engine or grader cannot work at all (the run stops; rows
            already stored stay).
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if not configs:
        raise ConfigError("no configuration to evaluate")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"configuration labels must be unique, got {labels}")
    records = [
        ConfigRecord(config_id(benchmark, c.label, c.params), c.label, benchmark.name, c.params) for c in configs
    ]
    for record in records:
        await asyncio.to_thread(store.register, record)  # disk writes stay off the event loop
        if not resume and await asyncio.to_thread(store.count, record.config_id) > 0:
            raise ConfigError(
                f"{store.path} already holds results of {record.label!r}: pass --resume to continue that run, "
                "or choose another results file"
            )
    budget = budget if budget is not None else Budget(name="eval")
    grader = grader if grader is not None else benchmark.make_grader()
    run_id = await asyncio.to_thread(store.start_run, dict(repro or {}), argv)
    if dispatch is None:
        dispatch = _LocalPool(ProblemSolver(budget, grader), concurrency)
    runner = _Runner(benchmark, store, budget, dispatch, progress, run_id, resume)
    summaries: list[ConfigSummary] = []
    status = "failed"
    try:
        stopped = False
        for config, record in zip(configs, records, strict=True):
            summary = ConfigSummary(config.label, record.config_id, len(benchmark.problems))
            summaries.append(summary)
            if stopped:
                continue
            stopped = await runner.run_config(config, record, summary)
        status = "budget" if stopped else "finished"
        return EvalSummary(summaries, stopped, run_id)
    except (KeyboardInterrupt, asyncio.CancelledError):
        status = "interrupted"
        raise
    finally:
        if progress is not None:
            progress.finish()
        store.finish_run(run_id, status)  # inline: this also runs while the task is being cancelled


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


Deliver = Callable[[ResultRow | None], Awaitable[bool]]
"""Hands one finished row to the run, which commits it and advances progress. None stands for a problem the global
budget cut short; then it returns False: start no more problems."""


@dataclass(frozen=True)
class ConfigRun:
    """A configuration's pending problems, handed to a `Dispatch`.

    Attributes:
        config: the configuration.
        record: its record in the store (its ``config_id`` goes into every row).
        pending: the problems to solve.
        origin: the configuration's start (``time.time()``), from which ``config.time_scale`` stretches times.
        run_id: the store's record of this invocation, written into every row.
    """

    config: EvalConfig
    record: ConfigRecord
    pending: Sequence[Problem]
    origin: float
    run_id: int


class Dispatch(Protocol):
    """Where a configuration's problems are solved: here (the default) or on other processes and machines.

    ``run`` solves the problems of ``job`` (rows are built by a `ProblemSolver`, wherever it runs), awaits
    ``deliver`` for each finished row as it arrives, and returns once every problem was delivered or ``deliver``
    returned False. It returns True when the global budget stopped it early.
    """

    async def run(self, job: ConfigRun, deliver: Deliver) -> bool: ...


@dataclass
class _Runner:
    """The state shared by one `run_eval` call."""

    benchmark: Benchmark
    store: ResultsStore
    budget: Budget
    dispatch: Dispatch
    progress: ProgressSink | None
    run_id: int
    resume: bool

    async def run_config(self, config: EvalConfig, record: ConfigRecord, summary: ConfigSummary) -> bool:
        """Run one configuration; returns True when the global budget stopped it."""
        store, budget, progress = self.store, self.budget, self.progress
        if config.prepare is not None:
            await config.prepare()
        if self.resume:  # failed problems are tried again
            await asyncio.to_thread(store.discard_errors, record.config_id)
        done = await asyncio.to_thread(store.done, record.config_id)
        problems = self.benchmark.problems
        pending = [p for p in problems if p.id not in done]
        summary.skipped = len(problems) - len(pending)
        if progress is not None:
            progress.start(config.label, len(problems), summary.skipped)
        stop = asyncio.Event()

        async def deliver(row: ResultRow | None) -> bool:
            if row is None:  # cut short by the global budget: not a result of this configuration
                summary.discarded += 1
                stop.set()
                return False
            if await asyncio.to_thread(store.add, row):
                summary.stored += 1
                summary.errors += row.error is not None
            if progress is not None:
                progress.advance(row)
            return True

        origin = time.time()  # the configuration's start: modelled times are stretched from here
        if pending and await self.dispatch.run(ConfigRun(config, record, pending, origin, self.run_id), deliver):
            stop.set()
        if stop.is_set():
            logger.warning("global budget exhausted (%s): %s stopped early", budget.exhausted_cap, config.label)
        return stop.is_set()


@dataclass
class _LocalPool:
    """The default `Dispatch`: ``concurrency`` problems in flight in this event loop."""

    solver: ProblemSolver
    concurrency: int

    async def run(self, job: ConfigRun, deliver: Deliver) -> bool:
        config, record, pending, origin, run_id = job.config, job.record, job.pending, job.origin, job.run_id
        queue = iter(pending)
        stop = asyncio.Event()

        async def worker() -> None:
            for problem in queue:
                if stop.is_set() or self.solver.budget.exhausted:
                    stop.set()
                    return
                row = await self.solver.solve_one(problem, config, record, origin=origin, run_id=run_id)
                if not await deliver(row):
                    stop.set()
                    return

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self.concurrency, len(pending))):
                    group.create_task(worker())
        except ExceptionGroup as failed:
            # A fatal error (or a bug) in one worker cancelled the others: raise it as itself, not wrapped.
            raise _first_leaf(failed) from None
        return stop.is_set()


@dataclass
class ProblemSolver:
    """Solves, grades and builds the row of one problem: the per-problem work of a run, wherever it happens (in
    `run_eval`'s own loop, or on a worker that sends its rows back to the process that stores them).

    Attributes:
        budget: the global budget; each problem runs under a child of it.
        grader: grades answers and clusters candidates.
    """

    budget: Budget
    grader: BaseGrader

    async def solve_one(
        self, problem: Problem, config: EvalConfig, record: ConfigRecord, *, origin: float, run_id: int
    ) -> ResultRow | None:
        """Solve, grade and build the row of one problem for the store's run ``run_id``; None when the global
        budget cut it short. ``origin``: the configuration's start (``time.time()``), from which
        ``config.time_scale`` stretches its times."""
        if config.solve is None:
            raise ConfigError(f"configuration {config.label!r} has no solve here: run it with its own dispatch")
        child = self.budget.child(f"{record.config_id}/{problem.id}")
        try:
            return await self._solve_under(child, config.solve, problem, config, record, origin=origin, run_id=run_id)
        finally:
            child.close()  # its usage is in the row and in the global budget; the run need not keep it

    async def _solve_under(
        self,
        child: Budget,
        solve: Solve,
        problem: Problem,
        config: EvalConfig,
        record: ConfigRecord,
        *,
        origin: float,
        run_id: int,
    ) -> ResultRow | None:
        started_at = time.time()
        clock = time.perf_counter()
        error: str | None = None
        cut = False
        try:
            result = await solve(problem, child)
        except BudgetExhausted as err:
            if self.budget.exhausted:
                return None
            result, error, cut = None, f"BudgetExhausted: {err}", True
        except _FATAL:
            raise
        except BranchwiseError as err:
            logger.warning("%s failed on %s: %s", config.label, problem.id, err)
            result, error = None, f"{type(err).__name__}: {err}"
        scale = config.time_scale
        latency = (time.perf_counter() - clock) * scale
        times = (origin + (started_at - origin) * scale, origin + (time.time() - origin) * scale)
        outcome = _Outcome(None, [], {}, child.usage.to_dict(), cut) if result is None else _outcome(result, child)
        cap = self.budget.exhausted_cap
        if cap is not None and (cap != "max_calls" or outcome.budget_exhausted):
            # A global cap was reached while this problem ran: its calls may have been clipped or aborted by the
            # run's budget rather than by its configuration, so it is no result of that configuration. (The
            # call cap only refuses new calls: a problem that got all of its calls is complete.)
            return None
        graded = await _grade(self.grader, problem, outcome)
        return _row(problem, record, run_id, outcome, graded, error=error, latency_s=latency, times=times)


def failed_row(problem: Problem, record: ConfigRecord, error: str, *, run_id: int) -> ResultRow:
    """The row of a problem that gave no result at all (e.g. every worker that tried it died): wrong, with
    ``error`` as the reason; a ``--resume`` runs it again, like any failed problem."""
    now = time.time()
    nothing = _Outcome(None, [], {}, {}, False)
    return _row(problem, record, run_id, nothing, (False, 0.0, []), error=error, latency_s=0.0, times=(now, now))


def _row(
    problem: Problem,
    record: ConfigRecord,
    run_id: int,
    outcome: _Outcome,
    graded: tuple[bool, float, list[dict[str, Any]]],
    *,
    error: str | None,
    latency_s: float,
    times: tuple[float, float],
) -> ResultRow:
    correct, score, candidates = graded
    return ResultRow(
        config_id=record.config_id,
        problem_id=problem.id,
        level=problem.level,
        gold=problem.gold,
        answer=outcome.answer,
        correct=correct,
        score=score,
        candidates=candidates,
        votes=outcome.votes,
        usage=outcome.usage,
        latency_s=latency_s,
        budget_exhausted=outcome.budget_exhausted,
        error=error,
        started_at=times[0],
        finished_at=times[1],
        run_id=run_id,
    )


def strategy_solver(
    strategy: Strategy,
    engine: Engine,
    benchmark: Benchmark,
    *,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_tokens: int = 512,
) -> Solve:
    """A ``solve`` that runs a search strategy on ``engine`` with the benchmark's prompt, extractor and grader."""
    extractor = benchmark.extractor()
    clustering = benchmark.make_grader()

    async def solve(problem: Problem, budget: Budget) -> Any:
        ctx = SearchContext(
            engine=engine,
            budget=budget,
            extractor=extractor,
            grader=clustering,
            prompt=benchmark.prompt,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
        )
        return await strategy.run(problem.question, ctx)

    return solve
