"""branchwise._processes: starting children without re-running the user's script, and the timeout process pool."""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchwise._processes import TimeoutProcessPool, main_hidden_from_spawn
from branchwise.errors import ConfigError, GraderPoolError, WorkerCrashError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pool() -> Iterator[TimeoutProcessPool]:
    p = TimeoutProcessPool(max_workers=1)
    yield p
    p.close()


@pytest.fixture
def pool2() -> Iterator[TimeoutProcessPool]:
    p = TimeoutProcessPool(max_workers=2)
    yield p
    p.close()


def _process_gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" in status.read_text().lower()
    except OSError:  # no such process any more
        return True


# -- main_hidden_from_spawn ------------------------------------------------------------------------------------


def test_main_module_identity_is_hidden_inside_and_restored_after() -> None:
    main = sys.modules["__main__"]
    before = (getattr(main, "__file__", None), getattr(main, "__spec__", None))
    with main_hidden_from_spawn():
        assert not hasattr(main, "__file__")
        assert main.__spec__ is None
    assert (getattr(main, "__file__", None), getattr(main, "__spec__", None)) == before


def test_a_child_started_inside_does_not_rerun_an_unguarded_script(tmp_path: Path) -> None:
    marker = tmp_path / "runs.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import multiprocessing, os
            from branchwise._processes import main_hidden_from_spawn
            with open({str(marker)!r}, "a") as f:
                f.write("ran\\n")
            with main_hidden_from_spawn():
                p = multiprocessing.get_context("spawn").Process(target=os.getpid)
                p.start()
            p.join(60)
            assert p.exitcode == 0, p.exitcode
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    assert marker.read_text().splitlines() == ["ran"]  # the child did not execute the script body again


# -- TimeoutProcessPool ----------------------------------------------------------------------------------------


def test_pool_runs_functions_and_propagates_errors(pool: TimeoutProcessPool) -> None:
    assert pool.worker_pids() == []  # nothing starts before the first item
    assert pool.run(math.sqrt, 16.0, timeout=10) == 4.0
    with pytest.raises(ValueError, match="math domain error"):
        pool.run(math.sqrt, -1.0, timeout=10)
    assert pool.restarts == 0
    assert pool.worker_pids() == [pool.run(os.getpid, timeout=10)]


def test_pool_timeout_kills_the_stuck_worker_and_recovers(pool: TimeoutProcessPool) -> None:
    stuck_pid = pool.run(os.getpid, timeout=10)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        pool.run(time.sleep, 60, timeout=0.5)
    assert time.monotonic() - started < 10
    assert _process_gone(stuck_pid)  # killed and reaped before the timeout was reported
    assert pool.restarts == 1
    new_pid = pool.run(os.getpid, timeout=10)
    assert new_pid != stuck_pid
    assert pool.run(math.sqrt, 9.0, timeout=10) == 3.0


def test_a_timeout_kills_only_the_stuck_worker(pool2: TimeoutProcessPool, tmp_path: Path) -> None:
    hold, release = tmp_path / "hold", tmp_path / "release"
    os.mkfifo(hold)
    os.mkfifo(release)
    blocked = pool2.submit(functools.partial(Path.read_text, hold), timeout=60)  # occupies one worker...
    other = pool2.run(os.getpid, timeout=30)  # ...so this runs on the other one
    with open(hold, "w") as f:
        f.write("done")
    assert blocked.result(timeout=30) == "done"
    before = pool2.worker_pids()
    assert len(before) == 2 and other in before
    bystander = pool2.submit(functools.partial(Path.read_text, release), timeout=60)
    stuck = pool2.submit(time.sleep, 60, timeout=0.5)
    with pytest.raises(TimeoutError):
        stuck.result(timeout=60)
    # The bystander is still running on its own worker: a rerun would block on the FIFO forever.
    with open(release, "w") as f:
        f.write("finished once")
    assert bystander.result(timeout=30) == "finished once"
    after = pool2.worker_pids()
    assert len(after) == 1 and after[0] in before
    (killed,) = set(before) - set(after)
    assert _process_gone(killed)
    assert pool2.restarts == 1


def test_an_item_that_kills_its_worker_fails_alone_after_its_attempts(pool2: TimeoutProcessPool) -> None:
    innocent = pool2.submit(time.sleep, 0.5, timeout=30)
    with pytest.raises(WorkerCrashError, match="3 times"):
        pool2.run(os._exit, 3, timeout=10)
    assert innocent.result(timeout=30) is None
    assert pool2.restarts == 3  # one replacement per crash, each caused by the crashing item alone
    assert pool2.run(math.sqrt, 36.0, timeout=10) == 6.0


def test_unpicklable_functions_and_results_fail_only_their_item(pool: TimeoutProcessPool) -> None:
    with pytest.raises(Exception, match="pickle"):
        pool.run(lambda: 1, timeout=10)
    with pytest.raises(RuntimeError, match="could not send its result back"):
        pool.run(threading.Lock, timeout=10)  # a lock cannot cross the pipe
    assert pool.run(math.sqrt, 4.0, timeout=10) == 2.0
    assert pool.restarts == 0


def test_queued_items_can_be_cancelled_and_close_restarts(pool: TimeoutProcessPool) -> None:
    first = pool.submit(time.sleep, 0.3, timeout=10)
    queued = pool.submit(math.sqrt, 4.0, timeout=10)
    assert queued.cancel()
    assert first.result(timeout=30) is None
    assert queued.cancelled()
    pool.close()
    assert pool.worker_pids() == []
    assert pool.run(math.sqrt, 25.0, timeout=10) == 5.0  # lazily started again


def test_close_fails_running_items_and_reaps_their_workers(pool: TimeoutProcessPool, tmp_path: Path) -> None:
    pid = pool.run(os.getpid, timeout=10)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    running = pool.submit(functools.partial(Path.read_text, fifo), timeout=120)
    waiting = pool.submit(math.sqrt, 1.0, timeout=10)
    # Opening the FIFO for writing returns once the worker has opened it for reading: the item is running (and
    # then blocks reading, since nothing is written).
    with open(fifo, "w"):
        assert running.running()
        pool.close()
    assert isinstance(running.exception(timeout=10), concurrent.futures.CancelledError)
    assert waiting.cancelled()
    assert _process_gone(pid)


def test_item_timer_starts_when_a_worker_takes_it(pool: TimeoutProcessPool) -> None:
    # Three 0.4 s items on one worker with a 0.8 s limit each: queued time must not count against them.
    futures = [pool.submit(time.sleep, 0.4, timeout=0.8) for _ in range(3)]
    results = [f.result(timeout=30) for f in concurrent.futures.as_completed(futures)]
    assert results == [None, None, None]
    assert pool.restarts == 0


def test_a_pool_whose_workers_cannot_start_raises_pool_errors() -> None:
    broken = TimeoutProcessPool(initializer=sys.exit, startup_timeout=30)  # every worker exits at start-up
    slow = TimeoutProcessPool(initializer=functools.partial(time.sleep, 30), startup_timeout=0.5)
    try:
        with pytest.raises(GraderPoolError, match="failed to start"):
            broken.run(math.sqrt, 4.0, timeout=10)
        with pytest.raises(GraderPoolError, match=r"did not start within 0\.5s"):
            slow.run(math.sqrt, 4.0, timeout=10)
    finally:
        broken.close()
        slow.close()


def test_workers_ignore_ctrl_c(pool: TimeoutProcessPool) -> None:
    pid = pool.run(os.getpid, timeout=10)
    os.kill(pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the whole process group
    assert pool.run(os.getpid, timeout=10) == pid  # still the same worker, still serving
    assert pool.restarts == 0


def test_pool_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        TimeoutProcessPool(max_workers=0)
    with pytest.raises(ConfigError):
        TimeoutProcessPool(start_method="fork")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        TimeoutProcessPool(startup_timeout=0)
    with pytest.raises(ConfigError):
        TimeoutProcessPool().submit(math.sqrt, 1.0, timeout=0)
