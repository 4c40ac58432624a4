"""``branchwise eval`` and ``branchwise report`` on YAML pipelines with the scripted ``test`` backend."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from branchwise.cli import main
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.pipelines import benchmark_overrides
from branchwise.evals.store import ResultsStore

DATA = [
    {"question": "Q1 What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "Q2 What is 10-4?", "answer": "#### 6"},
    {"question": "Q3 What is 7*6?", "answer": "#### 42"},
    {"question": "Q4 What is 1,000+1?", "answer": "#### 1,001"},
]

PIPELINE = """
name: scripted
engine:
  backend: test
  rules:
    - {when: "(?s)Q1 .*The answer is <answer>", reply: ["The answer is 5.", "The answer is 6."]}
    - {when: "Q2 ", reply: "The answer is 6."}
    - {when: "Q3 ", reply: ["The answer is 41.", "The answer is 42.", "The answer is 42."]}
    - {when: "Q4 ", reply: "So it is 1001 in total. The answer is 1,001."}
  default: "I do not know."
thought: {strategy: self_consistency, n: 2, max_tokens: 32}
budget: {max_completion_tokens: 500}
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in DATA))
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(PIPELINE)
    return data, pipeline


def run(*argv: str) -> int:
    return main(list(argv))


def test_eval_sweep_resume_and_report(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, pipeline = files
    out = tmp_path / "r.db"
    base = ["eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--no-hash"]
    assert run(*base, "--sweep", "thought.n=1,3", "--concurrency", "2") == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    table = [line.split() for line in captured.err.splitlines() if line.startswith("[eval] thought.n=")]
    assert [row[1:4] for row in table[-2:]] == [["thought.n=1", "3/4", "75.0%"], ["thought.n=3", "4/4", "100.0%"]]
    assert table[-2][-4] == "1.00x" and float(table[-1][-4].rstrip("x")) > 1  # n=3 spends more than n=1
    with ResultsStore(out, readonly=True) as store:
        configs = store.configs()
        assert [c.label for c in configs] == ["thought.n=1", "thought.n=3"]
        assert configs[1].params["sweep"] == {"thought.n": "3"}
        assert configs[1].params["spec"]["thought"]["n"] == 3
        rows = {r.problem_id: r for r in store.rows(configs[1].config_id)}
        assert len(rows) == 4 and rows["gsm8k-2"].correct and len(rows["gsm8k-2"].candidates) == 3
        assert rows["gsm8k-3"].correct and rows["gsm8k-3"].answer == "1001" and rows["gsm8k-1"].correct
        (record,) = store.runs()
        assert record.status == "finished" and record.argv[0] == "branchwise"
        settings = record.repro["settings"]
        assert settings["benchmark"] == "gsm8k" and settings["problems"] == 4 and settings["concurrency"] == 2
        assert record.repro["engines"]["policy"]["backend"] == "test"
    # the benchmark's prompt was applied (rule 1 matches it), the pipeline's per-run cap too
    assert rows["gsm8k-0"].answer == "5" and rows["gsm8k-0"].usage["calls"] == 1

    # again without --resume: refused, nothing changes
    assert run(*base, "--sweep", "thought.n=1,3") == 2
    assert "--resume" in capsys.readouterr().err
    assert run(*base, "--sweep", "thought.n=1,3", "--resume") == 0
    assert "0 to run (4 already done)" in capsys.readouterr().err
    with ResultsStore(out, readonly=True) as store:
        assert store.count() == 8 and len(store.runs()) == 2

    # report: one file, then a comparison with a second run
    assert run("report", str(out), "--out", str(tmp_path / "rep"), "--no-plots") == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "thought.n=3 vs thought.n=1" in md and (tmp_path / "rep" / "report.html").is_file()
    other = tmp_path / "other.db"
    assert run(*base[:-3], "--out", str(other), "--no-hash", "--sweep", "thought.n=3") == 0
    assert run("report", str(out), str(other), "--no-plots") == 0
    printed = capsys.readouterr().out.split()
    assert printed[-2].endswith("r-report/report.md")
    assert "thought.n=3 (r) vs thought.n=3 (other)" in Path(printed[-2]).read_text()


def test_eval_global_budget_then_resume(
    files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, pipeline = files
    out = tmp_path / "b.db"
    base = ["eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--no-hash"]
    assert run(*base, "--max-calls", "2", "--concurrency", "1", "--progress", "off") == 1
    assert "evaluation budget ran out (max_calls)" in capsys.readouterr().err
    assert sqlite3.connect(out).execute("SELECT COUNT(*) FROM results").fetchone()[0] == 2
    assert run(*base, "--resume") == 0
    with ResultsStore(out, readonly=True) as store:
        assert store.count() == 4 and [r.status for r in store.runs()] == ["budget", "finished"]


def test_eval_usage_errors(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, pipeline = files
    base = ["eval", str(pipeline), "--data", str(data), "--out", str(tmp_path / "x.db")]
    assert run(*base, "--benchmark", "gsm9k") == 2
    assert "Did you mean 'gsm8k'" in capsys.readouterr().err
    assert run(*base, "--benchmark", "gsm8k", "--sweep", "thought.nn") == 2
    assert "KEY=V1" in capsys.readouterr().err
    assert run(*base, "--benchmark", "gsm8k", "--sweep", "budgt.max_tokens=1,2") == 2
    assert "budgt" in capsys.readouterr().err
    assert run(*base, "--benchmark", "gsm8k", "--concurrency", "0") == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert run("eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(bad)) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert run("report", str(tmp_path / "none.db")) == 2


def test_traces_are_off_unless_asked(files: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = files
    traced = tmp_path / "traced.yaml"
    traced.write_text(PIPELINE + 'outputs: {trace: "' + str(tmp_path / "traces" / "{run_id}.jsonl") + '"}\n')
    base = ["eval", str(traced), "--benchmark", "gsm8k", "--data", str(data), "--no-hash", "--limit", "2"]
    assert run(*base, "--out", str(tmp_path / "a.db")) == 0
    assert not (tmp_path / "traces").exists()
    assert run(*base, "--out", str(tmp_path / "b.db"), "--traces") == 0
    assert len(list((tmp_path / "traces").glob("*.jsonl"))) == 2


def test_benchmark_overrides_respect_the_yaml() -> None:
    bench = load_benchmark("arithmetic", limit=1)
    defaults = benchmark_overrides({}, bench)
    assert defaults["thought.prompt"] == {"user": bench.prompt.user}
    assert defaults["verifiers.grader"] == {"kind": "numeric"} and defaults["verifiers.extractor"][0] == "boxed"
    assert benchmark_overrides({"thought": {"prompt": {"user": "{question}"}}, "verifiers": {"grader": "qa",
                                "extractor": ["answer_is"]}}, bench) == {}  # fmt: skip


def test_pipeline_budget_caps_each_problem(files: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = files
    capped = tmp_path / "capped.yaml"
    capped.write_text(PIPELINE.replace("max_completion_tokens: 500", "max_completion_tokens: 2"))
    out = tmp_path / "c.db"
    argv = ["eval", str(capped), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--no-hash"]
    assert run(*argv) == 0  # a per-problem cap is part of the configuration: its rows are kept
    with ResultsStore(out, readonly=True) as store:
        rows = store.rows()
        assert len(rows) == 4 and all(r.usage["completion_tokens"] <= 2 for r in rows)
        assert not any(r.correct for r in rows)  # one token per sample: no answer fits


def test_eval_offset_runs_a_window_of_the_file(files: tuple[Path, Path], tmp_path: Path) -> None:
    data, pipeline = files
    out = tmp_path / "w.db"
    argv = ["eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--no-hash"]
    assert run(*argv, "--offset", "2", "--limit", "1") == 0
    with ResultsStore(out, readonly=True) as store:
        (config,) = store.configs()
        assert [r.problem_id for r in store.rows(config.config_id)] == ["gsm8k-2"]
