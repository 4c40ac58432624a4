"""`branchwise run`, `validate`, `schema` and `trace show`, including Ctrl-C on a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from branchwise.cli import main
from branchwise.orchestrator.tracing import read_trace

PIPELINE = """\
engine:
  backend: test
  default: ["6 x 7 = 42. The answer is 42.", "The answer is 42.", "The answer is 41."]
thought: {strategy: self_consistency, n: 3}
outputs: {progress: off, otel: false}
"""


@pytest.fixture
def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    return path


def test_run_prints_answer_and_summary(pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert main(["run", str(pipeline), "What is 6 x 7?", "--trace", str(trace)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "42"
    assert "completion" in err and "1 calls" in err and "0 traces pruned" in err and str(trace) in err
    assert read_trace(trace).run_end is not None


def test_run_shows_plain_progress_unless_the_spec_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("progress: off, ", ""))
    assert main(["run", str(path), "q?"]) == 0
    err = capsys.readouterr().err
    assert "run started: strategy=self_consistency" in err and "run ok: answer='42'" in err
    assert main(["run", str(path), "q?", "--no-progress"]) == 0
    assert "run started" not in capsys.readouterr().err


def test_run_json_and_overrides(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(pipeline), "q?", "--json", "--set", "thought.n=1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["answer"] == "42" and summary["llm_calls"] == 1 and summary["pruned"] == 0
    assert summary["completion_tokens"] > 0 and summary["trace"] is None


def test_usage_errors_exit_2_with_path_and_line(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(pipeline), "q?", "--set", "thought.nn=1"]) == 2
    assert "Did you mean 'n'?" in capsys.readouterr().err
    assert main(["run", str(pipeline), "q?", "--set", "novalue"]) == 2
    bad = pipeline.with_name("bad.yaml")
    bad.write_text(PIPELINE.replace("strategy: self_consistency", "strategy: self_consistensy"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4:" in err and "Did you mean 'self_consistency'?" in err


def test_runtime_failure_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("engine: {backend: test, replies: []}\noutputs: {progress: off, otel: false}\n")
    assert main(["run", str(path), "q?"]) == 1
    assert "EngineRequestError" in capsys.readouterr().err


def test_validate_and_schema(pipeline: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(pipeline)]) == 0
    assert "ok (policy=test:default; planner none; strategy self_consistency)" in capsys.readouterr().out
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "branchwise pipeline"


def test_trace_show(pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    assert main(["run", str(pipeline), "q?", "--trace", str(trace)]) == 0
    capsys.readouterr()
    assert main(["trace", "show", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "self_consistency" in out and "answer '42'" in out
    not_a_trace = tmp_path / "x.jsonl"
    not_a_trace.write_text('{"hello": 1}\n')
    assert main(["trace", "show", str(not_a_trace)]) == 2


# A test run started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored, and
# Python keeps an ignored SIGINT ignored: the child restores Ctrl-C as a terminal would have it, then runs the CLI.
_CLI_WITH_CTRL_C = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from branchwise.cli import main; sys.exit(main(sys.argv[1:]))"
)
# A background job as a shell starts it: SIGINT ignored, so only SIGTERM can stop it.
_CLI_IN_BACKGROUND = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "from branchwise.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("cli", "stop"),
    [(_CLI_WITH_CTRL_C, signal.SIGINT), (_CLI_WITH_CTRL_C, signal.SIGTERM), (_CLI_IN_BACKGROUND, signal.SIGTERM)],
    ids=["ctrl-c", "sigterm", "sigterm-in-background"],
)
def test_ctrl_c_stops_cleanly_and_keeps_the_trace(tmp_path: Path, cli: str, stop: signal.Signals) -> None:
    slow = tmp_path / "slow.yaml"
    words = " ".join(f"w{i}" for i in range(3000))
    slow.write_text(
        "engine: {backend: test, token_delay: 0.005, default: '" + words + " The answer is 1.'}\n"
        "thought: {strategy: self_consistency, n: 2, max_tokens: 4000}\n"
        "outputs: {progress: off, otel: false}\n"
    )
    trace = tmp_path / "t.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", cli, "run", str(slow), "q?", "--trace", str(trace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        # wait for the trace to show the engine streaming (both traces opened), then interrupt
        while not (trace.exists() and trace.read_text().count('"kind":"trace_start"') == 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.02)
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    recorded = read_trace(trace)
    assert not recorded.truncated
    end = recorded.run_end
    assert end is not None and end.data["status"] == "cancelled"
    assert [e.kind for e in recorded.events].count("trace_end") == 2  # both traces closed, not left running
