"""One exit-code table for every command (issue 12 #9): 0 ok, 1 failed at run time, 2 bad input, 130 interrupted.

Also hostile trace files for ``trace show`` (#5) and command-line text that is not UTF-8 (#6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from branchwise.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, VLLM_LOG_ENV, main
from branchwise.errors import ModelProvisionError
from branchwise.orchestrator.tracing import TRACE_FORMAT, read_trace

PIPELINE = """\
engine: {backend: test, default: ["The answer is 42.", "The answer is 42."]}
thought: {strategy: self_consistency, n: 2, max_tokens: 32}
outputs: {progress: off, otel: false}
"""


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    return path


def interrupted(*_: object, **__: object) -> None:
    raise KeyboardInterrupt


def test_the_table_is_the_documented_one() -> None:
    assert (EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED) == (0, 1, 2, 130)
    assert main(["--help"]) == 0
    assert main([]) == 2 and main(["no-such-command"]) == 2 and main(["run"]) == 2  # argparse's own errors


def test_run(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["run", str(spec), "q?"]) == 0
    assert main(["run", str(spec), "q?", "--set", "thought.n=x"]) == 2
    assert main(["run", str(spec), "q?", "--set", "thought"]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("engine: {backend: test, replies: []}\noutputs: {progress: off, otel: false}\n")
    assert main(["run", str(broken), "q?"]) == 1  # the engine has nothing to say: a runtime failure
    monkeypatch.setattr("branchwise.cli.run.Pipeline.run", interrupted)
    assert main(["run", str(spec), "q?"]) == 130


def test_validate_and_schema(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["validate", str(spec)]) == 0
    assert main(["validate", str(spec), str(tmp_path / "missing.yaml")]) == 2
    assert main(["schema"]) == 0
    monkeypatch.setattr("branchwise.cli.run.load_spec_file", interrupted)
    assert main(["validate", str(spec)]) == 130
    monkeypatch.setattr("branchwise.cli.run.pipeline_json_schema", interrupted)
    assert main(["schema"]) == 130


def test_trace_show(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = tmp_path / "t.jsonl"
    assert main(["run", str(spec), "q?", "--trace", str(trace)]) == 0
    assert main(["trace", "show", str(trace)]) == 0
    assert main(["trace", "show", str(trace), "--max-traces", "-1"]) == 2
    monkeypatch.setattr("branchwise.cli.run.read_trace", interrupted)
    assert main(["trace", "show", str(trace)]) == 130


def test_models(monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["models", "list"]) == 0
    assert main(["models", "pull", "no-such-model"]) == 2

    def failing_pull(name: str, **_: object) -> Path:
        raise ModelProvisionError(f"download of {name} failed")

    monkeypatch.setattr("branchwise.cli.models.pull", failing_pull)
    assert main(["models", "pull", "smollm2-135m-instruct", "--quiet"]) == 1
    monkeypatch.setattr("branchwise.cli.models.pull", interrupted)
    assert main(["models", "pull", "smollm2-135m-instruct", "--quiet"]) == 130


def test_eval_and_report(spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r.db"
    base = ["eval", str(spec), "--benchmark", "arithmetic", "--limit", "2", "--out", str(out), "--no-hash"]
    assert main([*base, "--progress", "off"]) == 0
    assert main(["report", str(out), "--no-plots", "--out", str(tmp_path / "rep")]) == 0
    assert main([*base, "--progress", "off", "--max-calls", "1", "--out", str(tmp_path / "b.db")]) == 1
    assert main(["eval", str(tmp_path / "nope.yaml"), "--benchmark", "arithmetic"]) == 2
    assert main(["report", str(tmp_path / "nope.db")]) == 2
    monkeypatch.setattr("branchwise.cli.evaluate.write_report", interrupted)
    assert main(["report", str(out), "--no-plots"]) == 130


def test_sample(spec: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    base = ["sample", str(spec), "--benchmark", "arithmetic", "--limit", "1", "--out", str(bank), "--no-hash"]
    assert main([*base, "--n", "2"]) == 0
    assert main([*base, "--n", "0"]) == 2
    assert main(["sample", str(tmp_path / "nope.yaml"), "--benchmark", "arithmetic", "--n", "2", "--out", "x"]) == 2


# -- #5: hostile trace files --------------------------------------------------------------------------------------
HEADER = json.dumps({"format": TRACE_FORMAT, "version": 1, "run_id": "r", "query": "q"})


@pytest.mark.parametrize(
    ("content", "line", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 1, "not UTF-8"),
        (b"[1, 2, 3]\n", 1, "the header is a JSON array, not an object"),
        (b'"branchwise-trace"\n', 1, "the header is a JSON string"),
        (
            HEADER.encode() + b'\n{"seq": "one", "t": 0, "kind": "run_start", "data": {}}\n',
            2,
            "'seq' must be an integer",
        ),
        (HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": 7, "data": {}}\n', 2, "'kind' must be a string"),
        (HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "x", "data": [1]}\n', 2, "'data' must be an object"),
        (HEADER.encode() + b'\n[]\n{"seq": 1, "t": 0, "kind": "x", "data": {}}\n', 2, "must be a JSON object"),
        (
            HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "run_end", "data": {"usage": "lots"}}\n\n',
            2,
            "'usage' must be an object",
        ),
        (
            HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "engine_call", "data": {"prompt_tokens": "9"}}\n',
            2,
            "'prompt_tokens' must be an integer",
        ),
        (
            HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "run_end", "data": {"usage": {"calls": NaN}}}\n',
            2,
            "NaN is not a JSON number",
        ),
        (HEADER.encode() + b"\n" + b"[" * 100_000 + b"\n", 2, "not a JSON record"),
        (HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "trace_end", "data": {"tree": []}}\n', 2, "'tree' must be"),
        (
            HEADER.encode() + b'\n{"seq": 0, "t": 0, "kind": "strategy_end", "data": {"traces": [{"scores": []}]}}\n',
            2,
            "traces[0]: 'scores' must be an object",
        ),
        (
            json.dumps({"format": TRACE_FORMAT, "version": True}).encode() + b"\n",
            1,
            "version True is not supported",
        ),
        (json.dumps({"format": TRACE_FORMAT, "version": 1, "query": 5}).encode() + b"\n", 1, "'query' must be"),
    ],
    ids=[
        "binary",
        "header-array",
        "header-string",
        "seq",
        "kind",
        "data",
        "record-array",
        "usage",
        "tokens",
        "nan",
        "deep",
        "tree-id",
        "strategy-traces",
        "version-bool",
        "query-type",
    ],
)
def test_trace_show_refuses_a_bad_file_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, line: int, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    assert main(["trace", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}: " in err and message in err, err
    assert "Traceback" not in err


def test_trace_show_renders_names_from_the_file_as_text_not_markup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t.jsonl"
    call = {"role": "[/bold]", "model": "[red]m[/]", "prompt_tokens": 1, "completion_tokens": 2}
    events = [
        {"seq": 0, "t": 0, "kind": "engine_call", "data": call},
        {"seq": 1, "t": 0, "kind": "budget_exhausted", "data": {"cap": "[/x]", "detail": "[/y]"}},
    ]
    path.write_text(HEADER + "\n" + "".join(json.dumps(e) + "\n" for e in events))
    assert main(["trace", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/bold] ([red]m[/])" in out and "exhausted: [/y]" in out


# -- #6: command-line text that is not UTF-8 ---------------------------------------------------------------------
def test_a_query_that_is_not_utf8_runs_and_its_trace_round_trips(spec: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    raw = b"a\xff"
    command = [sys.executable, "-m", "branchwise.cli", "run", str(spec), "--trace", str(trace), raw]
    done = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.strip() == b"42"
    trace.read_bytes().decode("utf-8")  # the file itself is UTF-8
    recorded = read_trace(trace)
    assert recorded.header["query"] == os.fsdecode(raw)  # the same string Python made of the argument
    assert os.fsencode(recorded.header["query"]) == raw
    assert recorded.events[0].data["query"] == os.fsdecode(raw)


def test_a_query_from_stdin_that_is_not_utf8_runs(spec: Path, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    command = [sys.executable, "-m", "branchwise.cli", "run", str(spec), "--trace", str(trace), "-"]
    done = subprocess.run(command, input=b"caf\xe9 ?\n", capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert os.fsencode(read_trace(trace).header["query"]) == b"caf\xe9 ?"


@pytest.mark.parametrize(
    ("argv", "preset", "level"),
    [([], None, "ERROR"), (["-v"], None, None), (["--verbose"], None, None), ([], "DEBUG", "DEBUG")],
)
def test_vllm_log_lines_are_hidden_unless_asked_for(
    spec: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], preset: str | None, level: str | None
) -> None:
    if preset is None:
        monkeypatch.delenv(VLLM_LOG_ENV, raising=False)
    else:
        monkeypatch.setenv(VLLM_LOG_ENV, preset)
    assert main([*argv, "validate", str(spec)]) == EXIT_OK
    assert os.environ.get(VLLM_LOG_ENV) == level
