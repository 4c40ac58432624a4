"""`MathGrader`: symbolic equivalence with math-verify, run in worker processes with hard time limits.

math-verify's own signal-based timeouts only work on a main thread and cannot stop C-level work, so it runs in a
`TimeoutProcessPool` (`branchwise._processes`): a stuck item is killed with its worker process and counts as
wrong with detail "timeout". Plain numbers, identical texts and cached verdicts need no worker.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable

from .._processes import TimeoutProcessPool, settle
from ..errors import ConfigError, GraderPoolError, MissingDependencyError, WorkerCrashError
from .grader_base import NO_ANSWER, BaseGrader, GoldAnswer, GradeResult, as_golds
from .numeric import NumericGrader

__all__ = ["MathGrader", "close_default_pool", "default_math_pool", "init_math_worker", "math_verify_equal"]

logger = logging.getLogger(__name__)


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
            return NO_ANSWER
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
            settle(out, error=err)
            raise

        def finish(done: concurrent.futures.Future[bool]) -> None:
            try:
                result = self._verdict(done)
            except GraderPoolError as err:  # the pool cannot grade at all: fail loudly, never "wrong"
                with self._lock:
                    self._inflight.pop(key, None)
                settle(out, error=err)
                return
            if result.detail in ("math-verify", "timeout"):
                self._remember(key, result)
            with self._lock:
                self._inflight.pop(key, None)
            settle(out, value=result)

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
        golds = as_golds(gold)
        quick = self._quick(prediction, golds)
        if quick is not None:
            return quick
        assert prediction is not None  # _quick answers None predictions
        return await asyncio.wrap_future(self._submit(prediction, golds))

    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        golds = as_golds(gold)
        quick = self._quick(prediction, golds)
        if quick is not None:
            return quick
        assert prediction is not None
        return self._submit(prediction, golds).result()

    def grade_many(self, pairs: Iterable[tuple[str | None, GoldAnswer]]) -> list[GradeResult]:
        """Grade many pairs, using every worker at once; blocks until all are graded."""
        slots: list[GradeResult | concurrent.futures.Future[GradeResult]] = []
        for prediction, gold in pairs:
            golds = as_golds(gold)
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
