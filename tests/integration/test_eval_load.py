"""Load: 1,000 problems through ``branchwise eval`` on the scripted backend at concurrency 64 (issue 12).

Every problem gets exactly one result; the process's memory stays flat while the run goes on (its resident size is
sampled from /proc while it runs); a ``kill -9`` mid-run followed by ``--resume`` loses and duplicates nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROBLEMS = 1000
CONCURRENCY = 64

PIPELINE = """
engine:
  backend: test
  rules:
    - {when: "Q7 ", reply: "Let me think about it. The answer is 8."}
  default: ["Let me think about it step by step. The answer is 3.", "Hmm, the answer is 4."]
thought: {strategy: self_consistency, n: 4, max_tokens: 64}
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[list[str], Path]:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"Q{i} What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(PROBLEMS)
        )
    )
    pipeline = tmp_path / "load.yaml"
    pipeline.write_text(PIPELINE)
    db = tmp_path / "results.db"
    argv = [sys.executable, "-m", "branchwise.cli", "eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(data),
            "--out", str(db), "--concurrency", str(CONCURRENCY), "--progress", "off", "--no-hash"]  # fmt: skip
    return argv, db


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:  # the process has exited
        return None
    return None


def assert_one_row_per_problem(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        total, distinct = conn.execute("SELECT COUNT(*), COUNT(DISTINCT problem_id) FROM results").fetchone()
        assert total == distinct == PROBLEMS
        ids = {r[0] for r in conn.execute("SELECT problem_id FROM results")}
        assert ids == {f"gsm8k-{i}" for i in range(PROBLEMS)}
        assert conn.execute("SELECT COUNT(*) FROM results WHERE error IS NOT NULL").fetchone()[0] == 0


def test_a_thousand_problems_at_concurrency_64_one_result_each_in_flat_memory(setup: tuple[list[str], Path]) -> None:
    argv, db = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    samples: list[tuple[int, float]] = []  # (rows committed, resident MiB), while the run goes on
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append((count_rows(db), rss))
        time.sleep(0.2)  # a measurement interval, not a synchronisation
    _, err = proc.communicate()
    seconds = time.monotonic() - started
    assert proc.returncode == 0, err.decode()
    assert_one_row_per_problem(db)
    # Flat: once a quarter of the problems are done (the engine, the store and 64 problems in flight are all set
    # up), the resident size grows by less than a few MiB until the end.
    settled = [rss for rows, rss in samples if rows >= PROBLEMS // 4]
    assert settled, samples
    growth = max(settled) - settled[0]
    print(f"\n1,000 problems, concurrency 64: {seconds:.1f} s, peak RSS {max(r for _, r in samples):.1f} MiB, "
          f"growth after 25% {growth:.1f} MiB; samples {samples}")  # fmt: skip
    assert growth < 12


def test_kill_minus_nine_mid_run_then_resume_loses_and_duplicates_nothing(setup: tuple[list[str], Path]) -> None:
    argv, db = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while count_rows(db) < PROBLEMS // 3:  # the writer is another process: poll its commits, with a deadline
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "rows did not appear in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_rows = count_rows(db)
    assert PROBLEMS // 3 <= killed_rows < PROBLEMS

    resumed = subprocess.run([*argv, "--resume"], check=False, capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({killed_rows} already done)" in resumed.stderr
    assert_one_row_per_problem(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM runs ORDER BY run_id").fetchall() == [("running",), ("finished",)]
