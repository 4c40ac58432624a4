"""Graders: is a predicted answer right, and are two answers the same?

Every grader offers the `Grader` protocol, ``async grade(prediction, gold) -> GradeResult``, plus a
synchronous ``equivalent(a, b)`` that self-consistency uses to cluster sampled answers by meaning rather than
spelling ("1/2", "0.5" and ``\\frac{1}{2}`` land in one cluster). Gold may be one string or several accepted
answers (aliases); a prediction is right if it matches any of them. Predictions are *extracted* answers
(see `verifiers.extraction`), not whole generations; a None prediction ("no answer found") is always wrong.

- `NumericGrader`: numbers compared exactly, then within a relative/absolute tolerance; commas, fractions,
  currency and percent signs understood.
- `MathGrader`: symbolic equivalence with math-verify (LaTeX, fractions, equations, intervals, sets), after a
  fast numeric path that needs no worker. math-verify runs in a `TimeoutProcessPool` because its own
  signal-based timeouts only work on a main thread and cannot stop C-level work: a stuck item is killed with
  its worker process, counts as wrong with detail "timeout", and the pool is replaced.
- `QAGrader`: SQuAD-style normalised exact match and token F1 against every accepted answer.
- `YesNoGrader`: yes/no/true/false and (A)/(B) answers.

`get_grader(name)` builds one by name ("math", "numeric", "qa", "yesno").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import importlib.util
import logging
import math
import multiprocessing
import os
import re
import threading
import time
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from .._processes import main_hidden_from_spawn
from ..errors import ConfigError, GraderPoolError, MissingDependencyError, UnknownNameError, WorkerCrashError
from .extraction import parse_number

__all__ = [
    "BaseGrader",
    "GoldAnswer",
    "GradeResult",
    "Grader",
    "GraderPoolError",
    "MathGrader",
    "NumericGrader",
    "QAGrader",
    "TimeoutProcessPool",
    "WorkerCrashError",
    "YesNoGrader",
    "available_graders",
    "close_default_pool",
    "default_math_pool",
    "get_grader",
    "init_math_worker",
    "math_verify_equal",
    "normalize_qa_answer",
    "qa_exact_match",
    "qa_f1",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
GoldAnswer = str | Sequence[str]
"""One accepted answer, or several (any of them counts as a match)."""


@dataclass(frozen=True, slots=True)
class GradeResult:
    """The verdict on one prediction.

    Attributes:
        correct: whether the prediction is accepted.
        score: a graded score in [0, 1] (1/0 for exact graders, token F1 for QA).
        detail: how the verdict was reached ("numeric", "math-verify", "exact", "timeout", "no answer", ...).
    """

    correct: bool
    score: float
    detail: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ConfigError(f"GradeResult.score must be in [0, 1], got {self.score}")


@runtime_checkable
class Grader(Protocol):
    """What strategies and evals need from a grader."""

    name: str

    async def grade(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one extracted prediction against the gold answer(s) without blocking the event loop."""
        ...

    def equivalent(self, a: str, b: str) -> bool:
        """Whether two answers mean the same (used to cluster sampled answers)."""
        ...


def _as_golds(gold: GoldAnswer) -> tuple[str, ...]:
    if isinstance(gold, str):
        return (gold,)
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):  # loaders often hand over raw numbers
        return (str(gold),)
    golds = tuple(str(g) for g in gold)
    if not golds:
        raise ConfigError("gold must be an answer or a non-empty list of accepted answers")
    return golds


_NO_ANSWER = GradeResult(False, 0.0, "no answer")


class BaseGrader(ABC):
    """Shared plumbing: a synchronous `grade_sync` does the work; `grade` and `grade_many` wrap it.

    Graders whose work is cheap (microseconds) run it inline in `grade`; `MathGrader` overrides `grade` to
    await a worker process instead.
    """

    name: str = ""

    @abstractmethod
    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one prediction, blocking the calling thread until done."""

    def equivalent(self, a: str, b: str) -> bool:
        """Whether ``b`` is accepted when ``a`` is the gold answer."""
        return self.grade_sync(b, a).correct

    async def grade(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one prediction (inline: cheap graders never block the loop for long)."""
        return self.grade_sync(prediction, gold)

    async def aequivalent(self, a: str, b: str) -> bool:
        """Async `equivalent`."""
        return (await self.grade(b, a)).correct

    def grade_many(self, pairs: Iterable[tuple[str | None, GoldAnswer]]) -> list[GradeResult]:
        """Grade many (prediction, gold) pairs, blocking; results in input order."""
        return [self.grade_sync(p, g) for p, g in pairs]

    def close(self) -> None:  # noqa: B027 - an optional hook, deliberately a no-op by default
        """Release resources held by the grader (nothing, for the cheap graders)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------------------------------------------
# Numbers


class NumericGrader(BaseGrader):
    """Compares numbers: exactly as rationals, else (unless both are integers) within tolerance.

    Understands "1,000", "-3.5", "3/4", ``\\frac{3}{4}``, "$12", "1e-3". A percent sign on either side is
    read both ways ("50%" matches 50 and 0.5), since models and datasets disagree on which is meant.

    Args:
        rel_tol: relative tolerance of the float comparison.
        abs_tol: absolute tolerance of the float comparison.
        percent: read "p%" as either p or p/100 (True) or only as p (False).
    """

    name = "numeric"

    def __init__(self, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9, percent: bool = True) -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise ConfigError("rel_tol and abs_tol must be >= 0")
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.percent = percent

    def values(self, text: str) -> tuple[Fraction, ...]:
        """The readings of ``text`` as a number (none if it is not a plain number)."""
        value = parse_number(text)
        if value is None:
            return ()
        if self.percent and text.rstrip().rstrip("$").rstrip().endswith("%"):
            return (value, value / 100)
        return (value,)

    def close_enough(self, a: Fraction, b: Fraction) -> bool:
        """Exact equality, or `math.isclose` within the tolerances when either value is not an integer.

        Two integers must be equal: a relative tolerance would otherwise accept 7,000,001 for 7,000,000.
        """
        if a == b:
            return True
        if a.denominator == 1 and b.denominator == 1:
            return False
        try:
            return math.isclose(float(a), float(b), rel_tol=self.rel_tol, abs_tol=self.abs_tol)
        except OverflowError:  # beyond float range: only exact equality counts
            return False

    def match(self, prediction: str, golds: Sequence[str]) -> bool | None:
        """True/False when the prediction and every gold are numbers, None when something is not a number."""
        pred_values = self.values(prediction)
        if not pred_values:
            return None
        all_numeric = True
        for gold in golds:
            gold_values = self.values(gold)
            if not gold_values:
                all_numeric = False
                continue
            if any(self.close_enough(p, g) for p in pred_values for g in gold_values):
                return True
        return False if all_numeric else None

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return _NO_ANSWER
        golds = _as_golds(gold)
        if not self.values(prediction):
            return GradeResult(False, 0.0, "not a number")
        verdict = self.match(prediction, golds)
        return GradeResult(bool(verdict), 1.0 if verdict else 0.0, "numeric")

    def __repr__(self) -> str:
        return f"NumericGrader(rel_tol={self.rel_tol}, abs_tol={self.abs_tol}, percent={self.percent})"


# ---------------------------------------------------------------------------------------------------------
# Worker pool with hard per-item timeouts


def _worker_ready() -> int:
    return os.getpid()


class _Job:
    __slots__ = ("args", "attempts", "deadline", "fn", "result", "started", "timeout")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float, result: Any) -> None:
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.result: concurrent.futures.Future[Any] = result
        self.attempts = 0
        self.deadline = math.inf
        self.started = False


def _settle(future: concurrent.futures.Future[Any], *, value: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class TimeoutProcessPool:
    """A process pool that runs picklable functions with a hard time limit per call.

    A supervisor thread feeds a `concurrent.futures.ProcessPoolExecutor` at most ``max_workers`` items at a
    time, so an item's clock starts when a worker actually takes it (not while it queues), and a fresh pool
    is warmed up (workers started, ``initializer`` run) before any item is timed. When an item overruns, the
    pool's worker processes are killed (a stuck C-level computation ignores anything gentler), the item's
    future fails with `TimeoutError`, and the other items that were running are resubmitted to a new pool.

    Everything is lazy: no process or thread exists until the first `submit`. `close` stops them; a later
    `submit` starts them again, so a shared pool can be closed by anyone without breaking other users.

    Args:
        max_workers: worker processes (1-2 is plenty: grading is bursty and the machine has other work).
        start_method: "forkserver" (default where available) or "spawn". Never "fork": the parent runs
            threads (and possibly an inference engine) that must not be forked.
        initializer: a picklable function run once in each new worker (imports, warm-up).
        startup_timeout: seconds allowed for a new pool's workers to start and initialise.
        max_attempts: how many times an item may be running when its worker crashes before it fails with
            `WorkerCrashError` (a crash breaks the whole pool, so every running item takes a strike; items
            killed because *another* item timed out are rerun without one).
    """

    def __init__(
        self,
        max_workers: int = 1,
        *,
        start_method: Literal["forkserver", "spawn"] | None = None,
        initializer: Callable[[], object] | None = None,
        startup_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        if max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        if startup_timeout <= 0 or max_attempts < 1:
            raise ConfigError("startup_timeout must be > 0 and max_attempts >= 1")
        self.max_workers = max_workers
        self.start_method = start_method
        self._initializer = initializer
        self._startup_timeout = startup_timeout
        self._max_attempts = max_attempts
        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None  # owned by the supervisor thread
        self._restarts = 0

    @property
    def restarts(self) -> int:
        """How many times the worker processes were killed and the pool replaced."""
        return self._restarts

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty when no pool is running)."""
        processes: dict[int, Any] = getattr(self._pool, "_processes", None) or {}
        try:
            return sorted(processes)
        except RuntimeError:  # the executor changed its process table while we read it
            return []

    def submit(self, fn: Callable[..., T], *args: Any, timeout: float) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` in a worker; the future fails with `TimeoutError` after ``timeout`` seconds.

        ``fn`` and ``args`` must be picklable (``fn`` a module-level function). The future may be cancelled
        while it still queues; once running, the item runs to completion or timeout.
        """
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        job = _Job(fn, args, timeout, future)
        with self._cond:
            self._queue.append(job)
            if not self._closing:
                self._ensure_thread_locked()
            self._cond.notify_all()
        return future

    def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """`submit` and wait for the result (blocks the calling thread)."""
        return self.submit(fn, *args, timeout=timeout).result()

    def close(self) -> None:
        """Stop the workers and the supervisor; items still queued are cancelled, running ones fail.

        Blocks until the supervisor has exited (at most a moment: running workers are killed).
        """
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._closing = True
            pending, self._queue = self._queue, collections.deque()
            self._cond.notify_all()
        for job in pending:
            if not job.result.cancel():
                _settle(job.result, error=concurrent.futures.CancelledError("grading pool closed"))
        thread.join()
        with self._cond:
            self._closing = False
            self._thread = None
            if self._queue:  # submitted while closing: serve them with a fresh supervisor
                self._ensure_thread_locked()

    def _ensure_thread_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, name="branchwise-grading-pool", daemon=True)
            self._thread.start()

    def _wake(self, _future: object = None) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- supervisor thread --------------------------------------------------------------------------------

    def _supervise(self) -> None:
        running: dict[concurrent.futures.Future[Any], _Job] = {}
        try:
            while True:
                to_start: list[_Job] = []
                with self._cond:
                    while not self._closing:
                        if any(f.done() for f in running) or (self._queue and len(running) < self.max_workers):
                            break
                        wait_s: float | None = None
                        if running:
                            wait_s = min(job.deadline for job in running.values()) - time.monotonic()
                            if wait_s <= 0:
                                break
                        self._cond.wait(wait_s)
                    if self._closing:
                        return
                    while self._queue and len(running) + len(to_start) < self.max_workers:
                        job = self._queue.popleft()
                        if job.started or job.result.set_running_or_notify_cancel():
                            job.started = True
                            to_start.append(job)
                self._reap(running)
                for job in to_start:
                    self._start(job, running)
        except BaseException as err:  # the supervisor must never die silently with callers waiting
            logger.exception("grading pool supervisor failed")
            with self._cond:
                stranded = list(running.values()) + list(self._queue)
                self._queue.clear()
                self._thread = None  # the next submit starts a fresh supervisor
            failure = GraderPoolError(f"grading pool supervisor failed: {err!r}")
            for job in stranded:
                _settle(job.result, error=failure)
            raise
        finally:
            for job in running.values():
                _settle(job.result, error=concurrent.futures.CancelledError("grading pool closed"))
            self._discard_pool(kill=bool(running), count=False)

    def _ensure_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is not None:
            return self._pool
        context = multiprocessing.get_context(self.start_method)
        pool = concurrent.futures.ProcessPoolExecutor(
            self.max_workers, mp_context=context, initializer=self._initializer
        )
        self._pool = pool
        try:
            # One warm-up call per worker, submitted back to back so that every worker is spawned and
            # initialised before any item's clock starts.
            with main_hidden_from_spawn():  # workers need library code only, not the user's script
                warm = [pool.submit(_worker_ready) for _ in range(self.max_workers)]
            done, not_done = concurrent.futures.wait(warm, timeout=self._startup_timeout)
        except Exception as err:  # e.g. starting processes while this process is itself bootstrapping
            self._discard_pool(kill=True, count=False)
            raise GraderPoolError(f"grading worker pool failed to start: {err!r}") from err
        failure = next((f.exception() for f in done if f.exception() is not None), None)
        if not_done or failure is not None:
            self._discard_pool(kill=True, count=False)
            reason = f"did not start within {self._startup_timeout}s" if not_done else repr(failure)
            raise GraderPoolError(f"grading worker pool failed to start: {reason}") from failure
        logger.debug("grading pool started: %d %s worker(s)", self.max_workers, self.start_method)
        return pool

    def _discard_pool(self, *, kill: bool, count: bool = True) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if count:
            self._restarts += 1
        processes = list((getattr(pool, "_processes", None) or {}).values())
        if kill:
            for process in processes:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
                process.join(timeout=5.0)

    def _retry(self, job: _Job, cause: BaseException | None, *, count: bool = True) -> None:
        job.deadline = math.inf
        if count:
            job.attempts += 1
        if job.attempts >= self._max_attempts:
            err = WorkerCrashError(f"a worker died under this item {job.attempts} times")
            err.__cause__ = cause
            _settle(job.result, error=err)
            return
        with self._cond:
            self._queue.appendleft(job)

    def _start(self, job: _Job, running: dict[concurrent.futures.Future[Any], _Job]) -> None:
        try:
            pool = self._ensure_pool()
        except GraderPoolError as err:
            _settle(job.result, error=err)
            return
        try:
            future = pool.submit(job.fn, *job.args)
        except (BrokenProcessPool, RuntimeError) as err:  # the pool broke since the last item
            self._discard_pool(kill=True)
            self._retry(job, err)
            return
        job.deadline = time.monotonic() + job.timeout
        running[future] = job
        future.add_done_callback(self._wake)

    def _reap(self, running: dict[concurrent.futures.Future[Any], _Job]) -> None:
        broken: BaseException | None = None
        for future, job in list(running.items()):
            if not future.done():
                continue
            del running[future]
            if future.cancelled():
                self._retry(job, None)
                continue
            err = future.exception()
            if isinstance(err, BrokenProcessPool):
                broken = err
                self._retry(job, err)
            elif err is not None:
                _settle(job.result, error=err)
            else:
                _settle(job.result, value=future.result())
        if broken is not None:
            logger.warning("a grading worker died; restarting the pool")
            for job in running.values():
                self._retry(job, broken)
            running.clear()
            self._discard_pool(kill=True)
            return
        now = time.monotonic()
        expired = [(f, job) for f, job in running.items() if job.deadline <= now]
        if not expired:
            return
        for future, _job in expired:
            del running[future]
        for job in running.values():  # innocent bystanders die with the pool: run them again, no strike
            self._retry(job, None, count=False)
        running.clear()
        # Kill before reporting, so a caller that sees the timeout knows the stuck worker is gone.
        self._discard_pool(kill=True)
        for _future, job in expired:
            logger.warning("grading item timed out after %.3gs; its worker was killed", job.timeout)
            _settle(job.result, error=TimeoutError(f"grading timed out after {job.timeout}s"))

    def __repr__(self) -> str:
        return f"TimeoutProcessPool(max_workers={self.max_workers}, start_method={self.start_method!r})"


# ---------------------------------------------------------------------------------------------------------
# math-verify


def init_math_worker() -> None:
    """Worker initializer for math-verify pools: import and warm up its parsers, quiet its warnings.

    Pass it as ``initializer`` when building your own `TimeoutProcessPool` for a `MathGrader`, so the
    first item's time limit is not spent importing sympy.
    """
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from math_verify import parse, verify

    half = parse("\\boxed{\\frac{1}{2}}", parsing_timeout=None)
    verify(half, parse("\\boxed{0.5}", parsing_timeout=None), timeout_seconds=None)


def _boxed(answer: str) -> str:
    if "\\boxed" in answer:
        return answer
    s = answer.strip()
    if len(s) > 2 and s.startswith("$") and s.endswith("$"):
        s = s.strip("$").strip()
    return "\\boxed{" + s + "}"


def math_verify_equal(prediction: str, golds: tuple[str, ...]) -> bool:
    """Whether math-verify accepts ``prediction`` for any of ``golds``. Runs in a worker process.

    Both sides are parsed as the content of ``\\boxed{}`` (answers are already extracted). math-verify's
    signal-based timeouts are disabled: the pool enforces the time limit.
    """
    from math_verify import parse, verify

    target = parse(_boxed(prediction), parsing_timeout=None)
    if not target:
        return False
    for gold in golds:
        parsed = parse(_boxed(gold), parsing_timeout=None)
        if parsed and verify(parsed, target, timeout_seconds=None):
            return True
    return False


_default_pools: dict[str, TimeoutProcessPool] = {}  # "math" -> the shared pool, created on first use
_default_pool_lock = threading.Lock()


def default_math_pool() -> TimeoutProcessPool:
    """The process pool shared by every `MathGrader` that was not given its own (created lazily).

    One worker on machines with up to 3 cores, two above that.
    """
    with _default_pool_lock:
        pool = _default_pools.get("math")
        if pool is None:
            workers = 2 if (os.cpu_count() or 1) >= 4 else 1
            pool = _default_pools["math"] = TimeoutProcessPool(workers, initializer=init_math_worker)
        return pool


def close_default_pool() -> None:
    """Stop the shared math-verify workers (they restart on the next use)."""
    with _default_pool_lock:
        pool = _default_pools.get("math")
    if pool is not None:
        pool.close()


_Key = tuple[str, tuple[str, ...]]
_WS_RE = re.compile(r"\s+")


def _compact(text: str) -> str:
    return _WS_RE.sub("", text).strip("$")


class MathGrader(BaseGrader):
    """Mathematical equivalence: plain numbers directly, everything else with math-verify in a worker.

    ``\\frac{1}{2}`` == 0.5 == "1/2", ``\\dfrac{3}{4}`` == "3/4", "x=3" == "3", "[1,2)" intervals, "1,-2" as
    the set {1, -2}, ``\\text{Evelyn}`` == "Evelyn". Results are cached per (prediction, golds) in an LRU, and
    identical items in flight are graded once.

    Args:
        timeout: hard limit in seconds on one item's math-verify work; an overrun counts as wrong with
            detail "timeout" (and is cached: pathological inputs stay pathological).
        rel_tol: relative tolerance of the numeric fast path.
        abs_tol: absolute tolerance of the numeric fast path.
        cache_size: entries kept in the LRU cache of results.
        pool: the worker pool to use; default: the shared `default_math_pool`. A pool given here is not closed
            by `close` (its creator owns it).
        verify_fn: the picklable module-level function run in the worker as ``verify_fn(prediction, golds)``
            (default `math_verify_equal`); a seam for tests and alternative checkers.

    Raises:
        MissingDependencyError: (on first use) math-verify is not installed.
        GraderPoolError: (from grading calls) the worker pool could not start or was closed under the item;
            an infrastructure failure is raised, never reported as a wrong answer. An item that merely
            crashes its worker is graded wrong with detail "error: worker crashed".

    Note:
        `grade` awaits the worker without blocking the event loop. `grade_sync`, `grade_many` and
        `equivalent` block their thread: call them from worker threads or synchronous code, never from
        inside a running event loop. Workers start with forkserver/spawn but do not re-import the user's main
        module, so scripts need no ``if __name__ == "__main__":`` guard.
    """

    name = "math"

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-9,
        cache_size: int = 4096,
        pool: TimeoutProcessPool | None = None,
        verify_fn: Callable[[str, tuple[str, ...]], bool] | None = None,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout}")
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0, got {cache_size}")
        self.timeout = timeout
        self.numeric = NumericGrader(rel_tol=rel_tol, abs_tol=abs_tol)
        self._pool = pool
        self._verify_fn = verify_fn or math_verify_equal
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[_Key, GradeResult] = collections.OrderedDict()
        self._inflight: dict[_Key, concurrent.futures.Future[GradeResult]] = {}
        self._lock = threading.Lock()
        self._checked_dependency = verify_fn is not None

    @property
    def pool(self) -> TimeoutProcessPool:
        """The worker pool this grader submits to."""
        return self._pool if self._pool is not None else default_math_pool()

    def cache_info(self) -> dict[str, int]:
        """Entries in the result cache and items in flight."""
        with self._lock:
            return {"cached": len(self._cache), "inflight": len(self._inflight), "maxsize": self._cache_size}

    def _quick(self, prediction: str | None, golds: tuple[str, ...]) -> GradeResult | None:
        """A verdict that needs no worker: no answer, cached, same text, or plain numbers."""
        if prediction is None or not prediction.strip():
            return _NO_ANSWER
        key = (prediction, golds)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        compact = _compact(prediction)
        if any(compact == _compact(g) for g in golds):
            return GradeResult(True, 1.0, "exact")
        verdict = self.numeric.match(prediction, golds)
        if verdict is not None:
            return GradeResult(verdict, 1.0 if verdict else 0.0, "numeric")
        return None

    def _remember(self, key: _Key, result: GradeResult) -> None:
        if self._cache_size == 0:
            return
        with self._lock:
            self._cache[key] = result
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _check_dependency(self) -> None:
        if not self._checked_dependency:
            if importlib.util.find_spec("math_verify") is None:
                raise MissingDependencyError(
                    "MathGrader",
                    "math-verify",
                    "pip install 'math-verify[antlr4_13_2]'  (or: pip install branchwise[grading])",
                )
            self._checked_dependency = True

    def _submit(self, prediction: str, golds: tuple[str, ...]) -> concurrent.futures.Future[GradeResult]:
        """A future of the verdict; identical items in flight share one future."""
        key = (prediction, golds)
        with self._lock:
            shared = self._inflight.get(key)
            if shared is not None:
                return shared
            out: concurrent.futures.Future[GradeResult] = concurrent.futures.Future()
            # Marked running at once so no single waiter can cancel the future the others share.
            out.set_running_or_notify_cancel()
            self._inflight[key] = out
        try:
            self._check_dependency()
            job = self.pool.submit(self._verify_fn, prediction, golds, timeout=self.timeout)
        except BaseException as err:
            with self._lock:
                self._inflight.pop(key, None)
            _settle(out, error=err)
            raise

        def finish(done: concurrent.futures.Future[bool]) -> None:
            try:
                result = self._verdict(done)
            except GraderPoolError as err:  # the pool cannot grade at all: fail loudly, never "wrong"
                with self._lock:
                    self._inflight.pop(key, None)
                _settle(out, error=err)
                return
            if result.detail in ("math-verify", "timeout"):
                self._remember(key, result)
            with self._lock:
                self._inflight.pop(key, None)
            _settle(out, value=result)

        job.add_done_callback(finish)
        return out

    @staticmethod
    def _verdict(done: concurrent.futures.Future[bool]) -> GradeResult:
        """The item's verdict; raises `GraderPoolError` when the pool itself failed."""
        if done.cancelled():
            raise GraderPoolError("the grading pool was closed before this item ran")
        err = done.exception()
        if isinstance(err, TimeoutError):
            return GradeResult(False, 0.0, "timeout")
        if isinstance(err, WorkerCrashError):  # this item's own fault: it is wrong, the pool is fine
            logger.warning("an answer crashed its grading worker: %s", err)
            return GradeResult(False, 0.0, "error: worker crashed")
        if isinstance(err, GraderPoolError):
            raise err
        if isinstance(err, concurrent.futures.CancelledError):
            raise GraderPoolError("the grading pool was closed while this item ran") from err
        if err is not None:
            logger.warning("math-verify failed: %r", err)
            return GradeResult(False, 0.0, f"error: {type(err).__name__}: {err}")
        correct = bool(done.result())
        return GradeResult(correct, 1.0 if correct else 0.0, "math-verify")

    async def grade(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one prediction; worker results are awaited, never blocking the event loop."""
        golds = _as_golds(gold)
        quick = self._quick(prediction, golds)
        if quick is not None:
            return quick
        assert prediction is not None  # _quick answers None predictions
        return await asyncio.wrap_future(self._submit(prediction, golds))

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        golds = _as_golds(gold)
        quick = self._quick(prediction, golds)
        if quick is not None:
            return quick
        assert prediction is not None
        return self._submit(prediction, golds).result()

    def grade_many(self, pairs: Iterable[tuple[str | None, GoldAnswer]]) -> list[GradeResult]:
        """Grade many pairs, using every worker at once; blocks until all are graded."""
        slots: list[GradeResult | concurrent.futures.Future[GradeResult]] = []
        for prediction, gold in pairs:
            golds = _as_golds(gold)
            quick = self._quick(prediction, golds)
            if quick is not None:
                slots.append(quick)
            else:
                assert prediction is not None
                slots.append(self._submit(prediction, golds))
        return [s.result() if isinstance(s, concurrent.futures.Future) else s for s in slots]

    def close(self) -> None:
        """Clear the result cache. Pools belong to their creator (`close_default_pool` for the shared one)."""
        with self._lock:
            self._cache.clear()

    def __repr__(self) -> str:
        return f"MathGrader(timeout={self.timeout}, pool={self.pool!r})"


# ---------------------------------------------------------------------------------------------------------
# QA


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


@functools.lru_cache(maxsize=65536)
def normalize_qa_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation (any Unicode punctuation), articles and extra spaces."""
    lowered = text.lower()
    no_punct = "".join(ch for ch in lowered if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES_RE.sub(" ", no_punct).split())


def qa_exact_match(prediction: str, gold: str) -> bool:
    """Normalised exact match."""
    return normalize_qa_answer(prediction) == normalize_qa_answer(gold)


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalised answers (1.0 if both normalise to nothing)."""
    return _token_f1(normalize_qa_answer(prediction).split(), normalize_qa_answer(gold).split())


class QAGrader(BaseGrader):
    """Short-answer QA: SQuAD-normalised exact match and token F1, maximised over accepted answers/aliases.

    ``score`` is the best token F1; ``correct`` is exact match, or ``F1 >= f1_threshold`` when a threshold
    is set.

    Args:
        f1_threshold: accept on token F1 at or above this value instead of requiring exact match.
    """

    name = "qa"

    def __init__(self, *, f1_threshold: float | None = None) -> None:
        if f1_threshold is not None and not 0.0 < f1_threshold <= 1.0:
            raise ConfigError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
        self.f1_threshold = f1_threshold

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return _NO_ANSWER
        golds = _as_golds(gold)
        pred = normalize_qa_answer(prediction)
        normalized = [normalize_qa_answer(g) for g in golds]
        if pred in normalized:
            return GradeResult(True, 1.0, "exact match")
        pred_tokens = pred.split()
        f1 = max(_token_f1(pred_tokens, g.split()) for g in normalized)
        correct = self.f1_threshold is not None and f1 >= self.f1_threshold
        return GradeResult(correct, f1, f"f1={f1:.3f}")

    def __repr__(self) -> str:
        return f"QAGrader(f1_threshold={self.f1_threshold})"


# ---------------------------------------------------------------------------------------------------------
# Yes / no


_YES = frozenset({"yes", "y", "true", "correct"})
_NO = frozenset({"no", "n", "false", "incorrect"})
_CHOICE_RE = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.:)]|$))")


class YesNoGrader(BaseGrader):
    """Binary answers: "Yes", "no.", "True", "false", "(A)" / "B)" all map to yes or no.

    Letters map in order of ``letters``: by default A is yes and B is no (the StrategyQA choice order).
    Beyond the first word, a text that mentions exactly one of "yes"/"no" maps to it.

    Args:
        letters: the option letters meaning (yes, no).
    """

    name = "yesno"

    def __init__(self, *, letters: tuple[str, str] = ("a", "b")) -> None:
        if len(letters) != 2 or any(len(x) != 1 or not x.isalpha() for x in letters):
            raise ConfigError(f"letters must be two single letters, got {letters!r}")
        self.letters = (letters[0].lower(), letters[1].lower())

    def label(self, text: str) -> Literal["yes", "no"] | None:
        """ "yes", "no" or None when the text is neither."""
        s = text.strip().lower().replace("*", "").strip()
        choice = _CHOICE_RE.match(s)
        letter = (choice.group(1) or choice.group(2)) if choice is not None else None
        if letter in self.letters:
            return "yes" if letter == self.letters[0] else "no"
        words = re.findall(r"[a-z]+", s)
        if not words:
            return None
        if words[0] in _YES:
            return "yes"
        if words[0] in _NO:
            return "no"
        has_yes, has_no = "yes" in words, "no" in words
        if has_yes != has_no:
            return "yes" if has_yes else "no"
        return None

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        if prediction is None:
            return _NO_ANSWER
        label = self.label(prediction)
        if label is None:
            return GradeResult(False, 0.0, "not yes/no")
        golds = {self.label(g) for g in _as_golds(gold)} - {None}
        if not golds:
            raise ConfigError(f"gold {gold!r} is not a yes/no answer")
        correct = label in golds
        return GradeResult(correct, 1.0 if correct else 0.0, label)

    def equivalent(self, a: str, b: str) -> bool:
        label = self.label(a)
        return label is not None and label == self.label(b)

    def __repr__(self) -> str:
        return f"YesNoGrader(letters={self.letters!r})"


# ---------------------------------------------------------------------------------------------------------
# Registry


_GRADERS: dict[str, Callable[..., BaseGrader]] = {
    "math": MathGrader,
    "numeric": NumericGrader,
    "qa": QAGrader,
    "yesno": YesNoGrader,
}


def available_graders() -> tuple[str, ...]:
    """Names `get_grader` accepts."""
    return tuple(sorted(_GRADERS))


def get_grader(name: str, **options: Any) -> BaseGrader:
    """Build a grader by name ("math", "numeric", "qa", "yesno"), passing ``options`` to its constructor.

    Raises:
        UnknownNameError: no grader has that name (with "did you mean" suggestions).
        ConfigError: an option is invalid.
    """
    factory = _GRADERS.get(name)
    if factory is None:
        raise UnknownNameError("grader", name, list(_GRADERS))
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"invalid options for grader {name!r}: {err}") from err
