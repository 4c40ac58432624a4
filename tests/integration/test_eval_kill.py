"""Kill -9 a real ``branchwise eval`` process mid-run: the results file stays sound, and a resume finishes the run
with no duplicate and no missing row."""

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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROBLEMS = 40

PIPELINE = """
engine:
  backend: test
  token_delay: 0.01
  rules:
    - {when: "Q7 ", reply: "Let me think about it. The answer is 8."}
  default: ["Let me think about it step by step. The answer is 3.", "Hmm, the answer is 4."]
thought: {strategy: self_consistency, n: 2, max_tokens: 64}
"""


def count_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def test_kill_minus_nine_then_resume(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i} What is {i}+1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(PROBLEMS)))  # fmt: skip
    pipeline = tmp_path / "slow.yaml"
    pipeline.write_text(PIPELINE)
    db = tmp_path / "results.db"
    argv = [sys.executable, "-m", "branchwise.cli", "eval", str(pipeline), "--benchmark", "gsm8k",
            "--data", str(data), "--out", str(db), "--concurrency", "3", "--progress", "off", "--no-hash",
            "--sweep", "thought.n=2,3"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        # Wait until a few rows are committed: a short poll with a deadline (the writer is another process).
        deadline = time.monotonic() + 60
        while count_rows(db) < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no rows appeared in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert Path(f"{db}-wal").exists()  # killed with its write-ahead log not checkpointed

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        killed_rows = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        assert 5 <= killed_rows < 2 * PROBLEMS
        assert conn.execute("SELECT status FROM runs").fetchall() == [("running",)]

    resumed = subprocess.run(
        [*argv, "--resume"], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=90
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"({killed_rows - PROBLEMS if killed_rows > PROBLEMS else killed_rows} already done)" in resumed.stderr

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        per_config = conn.execute(
            "SELECT config_id, COUNT(*), COUNT(DISTINCT problem_id) FROM results GROUP BY config_id"
        ).fetchall()
        assert len(per_config) == 2
        assert all(total == distinct == PROBLEMS for _, total, distinct in per_config)
        ids = {r[0] for r in conn.execute("SELECT problem_id FROM results")}
        assert ids == {f"gsm8k-{i}" for i in range(PROBLEMS)}
        assert conn.execute("SELECT status FROM runs ORDER BY run_id").fetchall() == [("running",), ("finished",)]
        right = {r[0] for r in conn.execute("SELECT problem_id FROM results WHERE correct = 1")}
        assert "gsm8k-7" in right and right <= {"gsm8k-2", "gsm8k-3", "gsm8k-7"}  # 8; 3 or 4 (ties)
