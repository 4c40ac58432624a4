"""Child processes started by library code: hiding the user's script from them, and a pool with hard timeouts.

- `main_hidden_from_spawn`: multiprocessing's ``spawn`` and ``forkserver`` start methods re-import the parent's
  main module in every child, so a script that starts processes at import time (no ``if __name__ ==
  "__main__":`` guard) would run again in each child. Library children (vLLM's engine core, grading workers)
  only need library code, so while they start we hide the main module's identity from multiprocessing.
- `TimeoutProcessPool`: runs picklable functions in worker processes it owns, with a hard time limit per call;
  an overrunning call is stopped by killing its worker (a stuck C-level computation ignores anything gentler).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any, Literal, TypeVar

from .errors import ConfigError, GraderPoolError, WorkerCrashError

__all__ = ["TimeoutProcessPool", "main_hidden_from_spawn", "settle"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The main module is process-global; serialise our temporary edits of it.
_LOCK = threading.RLock()


@contextlib.contextmanager
def main_hidden_from_spawn() -> Iterator[None]:
    """Within this block, processes started with spawn/forkserver do not re-import ``__main__``."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _LOCK:
        had_file = hasattr(main, "__file__")
        saved_file = getattr(main, "__file__", None)
        saved_spec = getattr(main, "__spec__", None)
        main.__spec__ = None
        if had_file:
            del main.__file__
        try:
            yield
        finally:
            main.__spec__ = saved_spec
            if had_file:
                main.__file__ = saved_file


# ---------------------------------------------------------------------------------------------------------------
# The worker side (runs in the child process)


def _worker_main(conn: multiprocessing.connection.Connection, initializer: Callable[[], object] | None) -> None:
    """A worker's loop: run the initializer, say ready, then run ``(fn, args)`` items until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to running items.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent went away
            return
        if item is None:
            return
        fn, args = item
        try:
            reply: tuple[str, Any] = ("ok", fn(*args))
        except Exception as err:
            reply = ("err", err)
        try:
            conn.send(reply)
        except Exception as err:  # the value or the exception cannot be pickled: report that instead
            conn.send(("err", RuntimeError(f"the worker could not send its result back: {err!r}")))


# ---------------------------------------------------------------------------------------------------------------
# The parent side


class _Job:
    __slots__ = ("args", "attempts", "fn", "future", "timeout")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float, future: Any) -> None:
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.future: concurrent.futures.Future[Any] = future
        self.attempts = 0


class _Worker:
    """One worker process, its end of the pipe, and the item it runs (owned by the supervisor thread)."""

    __slots__ = ("conn", "deadline", "job", "pid", "process", "ready")

    def __init__(self, process: BaseProcess, conn: multiprocessing.connection.Connection, deadline: float) -> None:
        self.process = process
        self.conn = conn
        self.pid: int | None = None
        self.ready = False
        self.job: _Job | None = None
        self.deadline = deadline  # start-up deadline until ready, then the running item's deadline

    def stop(self, *, kill: bool) -> None:
        """End the process (asking nicely when idle) and reap it."""
        if not kill:
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)
        self.conn.close()


def settle(future: concurrent.futures.Future[Any], *, value: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` with ``value`` or ``error`` unless it is already done (a cancelled caller, a race)."""
    if future.done():
        return
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class TimeoutProcessPool:
    """Runs picklable functions in worker processes with a hard time limit per call.

    The pool owns its workers: each is a process with a pipe to a supervisor thread, which hands it one item at a
    time. An item's clock starts when a worker takes it (not while it queues), and a new worker is started and
    initialised (``initializer`` run) before it is given an item. When an item overruns, its worker is killed,
    the item's future fails with `TimeoutError`, and a fresh worker replaces it on demand; the other workers and
    their items are not touched. A worker that dies under an item (a crash) is replaced and the item is run
    again, up to ``max_attempts`` times in all, then fails with `WorkerCrashError`.

    Everything is lazy: no process or thread exists until the first `submit`. `close` stops them; a later
    `submit` starts them again, so a shared pool can be closed by anyone without breaking other users.

    Args:
        max_workers: worker processes (1-2 is plenty for bursty work on a machine with other work).
        start_method: "forkserver" (default where available) or "spawn". Never "fork": the parent runs
            threads (and possibly an inference engine) that must not be forked.
        initializer: a picklable function run once in each new worker (imports, warm-up).
        startup_timeout: seconds allowed for a new worker to start and initialise.
        max_attempts: how many times an item may be running when its worker dies before it fails with
            `WorkerCrashError`.
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
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers must be an integer >= 1, got {max_workers!r}")
        if start_method is None:
            start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        if not startup_timeout > 0 or max_attempts < 1:
            raise ConfigError("startup_timeout must be > 0 and max_attempts >= 1")
        self.max_workers = max_workers
        self.start_method = start_method
        self._initializer = initializer
        self._startup_timeout = startup_timeout
        self._max_attempts = max_attempts
        self._lock = threading.Lock()
        self._queue: collections.deque[_Job] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._pids: list[int] = []
        self._restarts = 0

    @property
    def restarts(self) -> int:
        """How many workers were killed (an item overran) or died (an item crashed them) and so replaced."""
        return self._restarts

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that are ready (empty when none is running)."""
        with self._lock:
            return sorted(self._pids)

    def submit(self, fn: Callable[..., T], *args: Any, timeout: float) -> concurrent.futures.Future[T]:
        """Run ``fn(*args)`` in a worker; the future fails with `TimeoutError` after ``timeout`` seconds.

        ``fn`` and ``args`` must be picklable (``fn`` a module-level function). The future may be cancelled
        while it still queues; once running, the item runs to completion or timeout.
        """
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            self._queue.append(_Job(fn, args, timeout, future))
            if self._thread is None and not self._closing:
                self._start_supervisor_locked()
            self._wake_locked()
        return future

    def run(self, fn: Callable[..., T], *args: Any, timeout: float) -> T:
        """`submit` and wait for the result (blocks the calling thread)."""
        return self.submit(fn, *args, timeout=timeout).result()

    def close(self) -> None:
        """Stop the workers and the supervisor; items still queued are cancelled, running ones fail.

        Blocks until the supervisor has exited (at most a moment: running workers are killed).
        """
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._closing = True
            pending, self._queue = self._queue, collections.deque()
            self._wake_locked()
        for job in pending:
            if not job.future.cancel():
                settle(job.future, error=concurrent.futures.CancelledError("the pool was closed"))
        thread.join()
        with self._lock:
            self._closing = False
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
            if self._queue:  # submitted while closing: serve them with a fresh supervisor
                self._start_supervisor_locked()

    def __repr__(self) -> str:
        return f"TimeoutProcessPool(max_workers={self.max_workers}, start_method={self.start_method!r})"

    # -- supervisor thread ----------------------------------------------------------------------------------------
    def _start_supervisor_locked(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._supervise, name="branchwise-process-pool", daemon=True)
        self._thread.start()

    def _wake_locked(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _supervise(self) -> None:
        workers: list[_Worker] = []
        try:
            while self._step(workers):
                pass
        except BaseException as err:  # the supervisor must never die silently with callers waiting
            logger.exception("process pool supervisor failed")
            with self._lock:
                stranded = [w.job for w in workers if w.job is not None] + list(self._queue)
                self._queue.clear()
            failure = GraderPoolError(f"the process pool supervisor failed: {err!r}")
            for job in stranded:
                settle(job.future, error=failure)
            raise
        finally:
            for worker in workers:
                if worker.job is not None:
                    settle(worker.job.future, error=concurrent.futures.CancelledError("the pool was closed"))
                worker.stop(kill=worker.job is not None or not worker.ready)
            with self._lock:
                self._pids = []

    def _step(self, workers: list[_Worker]) -> bool:
        """One round: start workers and hand out items, wait for something to happen, handle it."""
        with self._lock:
            if self._closing:
                return False
            idle = [w for w in workers if w.ready and w.job is None]
            handed = [(w, self._next_job_locked()) for w in idle]
            starting = sum(1 for w in workers if not w.ready)
            spawn = min(self.max_workers - len(workers), max(0, len(self._queue) - starting))
        for worker, job in handed:  # pipes and processes are handled outside the lock: submit never waits on them
            self._assign(worker, job)
        workers.extend(self._spawn() for _ in range(spawn))
        deadline = min((w.deadline for w in workers), default=math.inf)
        waitables: list[Any] = [self._wake_r]
        for w in workers:
            waitables += [w.conn, w.process.sentinel]
        timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        ready = multiprocessing.connection.wait(waitables, timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
        for worker in list(workers):
            if worker.conn in ready:
                if not self._receive(worker):
                    self._lost(worker, workers)
            elif worker.process.sentinel in ready:
                self._lost(worker, workers)
            elif worker.deadline <= time.monotonic():
                self._overran(worker, workers)
        return True

    def _next_job_locked(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            if job.attempts > 0 or job.future.set_running_or_notify_cancel():
                return job
        return None  # everything queued was cancelled

    def _assign(self, worker: _Worker, job: _Job | None) -> None:
        while job is not None:
            try:
                worker.conn.send((job.fn, job.args))
            except Exception as err:  # fn or args cannot be pickled: that item's error, not the pool's
                settle(job.future, error=err)
                with self._lock:
                    job = self._next_job_locked()
                continue
            worker.job = job
            worker.deadline = time.monotonic() + job.timeout
            return

    def _spawn(self) -> _Worker:
        context = (
            multiprocessing.get_context("spawn")
            if self.start_method == "spawn"
            else multiprocessing.get_context("forkserver")
        )
        parent_conn, child_conn = context.Pipe()
        process = context.Process(
            target=_worker_main, args=(child_conn, self._initializer), name="branchwise-pool-worker", daemon=True
        )
        with main_hidden_from_spawn():  # workers need library code only, not the user's script
            process.start()
        child_conn.close()
        return _Worker(process, parent_conn, time.monotonic() + self._startup_timeout)

    def _receive(self, worker: _Worker) -> bool:
        """Read the worker's message; False when the pipe broke (the worker died)."""
        try:
            kind, value = worker.conn.recv()
        except (EOFError, OSError):
            return False
        except Exception as err:  # the result arrived but cannot be unpickled here
            kind, value = "err", RuntimeError(f"the result of a worker could not be read: {err!r}")
        if kind == "ready":
            worker.ready, worker.pid, worker.deadline = True, int(value), math.inf
            with self._lock:
                self._pids.append(worker.pid)
            return True
        job, worker.job, worker.deadline = worker.job, None, math.inf
        if job is not None:
            settle(job.future, value=value if kind == "ok" else None, error=value if kind == "err" else None)
        return True

    def _remove(self, worker: _Worker, workers: list[_Worker], *, kill: bool) -> None:
        workers.remove(worker)
        worker.stop(kill=kill)
        with self._lock:
            if worker.pid in self._pids:
                self._pids.remove(worker.pid)

    def _lost(self, worker: _Worker, workers: list[_Worker]) -> None:
        """The worker process ended by itself: at start-up, under an item, or idle."""
        self._remove(worker, workers, kill=True)
        code = worker.process.exitcode
        if not worker.ready:
            reason = f"a worker exited with code {code} while starting"
            with self._lock:
                job = self._next_job_locked()
            if job is not None:
                settle(job.future, error=GraderPoolError(f"the worker pool failed to start: {reason}"))
            return
        self._restarts += 1
        job = worker.job
        if job is None:
            return
        job.attempts += 1
        if job.attempts >= self._max_attempts:
            settle(job.future, error=WorkerCrashError(f"a worker died under this item {job.attempts} times"))
            return
        logger.warning("a pool worker died under an item (exit code %s); running it again", code)
        with self._lock:
            self._queue.appendleft(job)

    def _overran(self, worker: _Worker, workers: list[_Worker]) -> None:
        """The worker missed its deadline: starting too slowly, or an item past its time limit. Kill it."""
        self._remove(worker, workers, kill=True)
        if not worker.ready:
            with self._lock:
                job = self._next_job_locked()
            if job is not None:
                reason = f"a worker did not start within {self._startup_timeout}s"
                settle(job.future, error=GraderPoolError(f"the worker pool failed to start: {reason}"))
            return
        self._restarts += 1
        job = worker.job
        if job is not None:
            logger.warning("a pool item timed out after %.3gs; its worker was killed", job.timeout)
            # Killed and reaped before the timeout is reported: a caller that sees it knows the worker is gone.
            settle(job.future, error=TimeoutError(f"timed out after {job.timeout}s"))
