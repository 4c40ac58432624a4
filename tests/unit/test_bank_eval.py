"""Strategies compared on one trace bank: `branchwise eval` over several replay pipelines, `report --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchwise.cli import main
from branchwise.evals.metrics import summarize
from branchwise.evals.report import summary_json
from branchwise.evals.store import ResultsStore

TOY = """
name: toy
engine:
  backend: test
  default: ["I add them. The answer is 4.", "Hmm, a longer way round gives The answer is 5.", "So The answer is 4."]
thought: {strategy: self_consistency, n: 6, max_tokens: 32, temperature: 0.6}
"""

ON_BANK = """
name: {name}
engine: {{backend: replay, bank: "{bank}", rate: 0, seed: 3}}
thought: {thought}
"""


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    spec = tmp_path / "toy.yaml"
    spec.write_text(TOY)
    out = tmp_path / "bank"
    argv = ["sample", str(spec), "--benchmark", "arithmetic", "--n", "6", "--limit", "5", "--out", str(out)]
    assert main([*argv, "--no-hash"]) == 0
    return out


def write(tmp_path: Path, name: str, bank: Path, thought: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(ON_BANK.format(name=name, bank=bank, thought=thought))
    return path


def test_strategies_on_one_bank_are_paired_on_identical_samples(
    tmp_path: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = write(tmp_path, "sc", bank, "{strategy: self_consistency, n: 6, max_tokens: 32, temperature: 0.6}")
    stop = write(tmp_path, "stop", bank, "{strategy: consensus, n: 6, max_tokens: 32, temperature: 0.6}")
    db = tmp_path / "cmp.db"
    argv = ["eval", str(sc), str(stop), "--benchmark", "arithmetic", "--limit", "5", "--out", str(db)]
    assert main([*argv, "--progress", "off", "--no-hash"]) == 0
    with ResultsStore(db, readonly=True) as store:
        labels = {c.label: c.config_id for c in store.configs()}
        assert sorted(labels) == ["sc", "stop"]
        sc_rows, stop_rows = store.rows(labels["sc"]), store.rows(labels["stop"])
    # The bank started over for the second pipeline: no configuration ran out of banked samples.
    assert [r.error for r in sc_rows + stop_rows] == [None] * 10
    assert all(len(r.candidates) == 6 for r in sc_rows)
    # The exact stopping rule answers as self-consistency over the same samples, with fewer tokens.
    assert [r.answer for r in stop_rows] == [r.answer for r in sc_rows]
    capsys.readouterr()

    assert main(["report", str(db), "--json", "--baseline", "sc"]) == 0
    report = json.loads(capsys.readouterr().out)
    [paired] = report["paired"]
    assert (paired["strategy"], paired["baseline"], paired["problems"]) == ("stop", "sc", 5)
    assert paired["accuracy_diff"] == 0.0 and paired["ci_low"] <= 0.0 <= paired["ci_high"]
    sc_tokens = sum(r.usage_int("prompt_tokens") + r.usage_int("completion_tokens") for r in sc_rows)
    stop_tokens = sum(r.usage_int("prompt_tokens") + r.usage_int("completion_tokens") for r in stop_rows)
    assert (paired["baseline_tokens"], paired["tokens"]) == (sc_tokens, stop_tokens)
    assert paired["token_reduction"] == pytest.approx(1 - stop_tokens / sc_tokens)
    assert 0 < paired["token_reduction"] < 1  # the vote of 4 = "4" against "5" is decided before the 6th sample
    assert paired["latency_s"] == pytest.approx(sum(r.latency_s for r in stop_rows))
    assert paired["baseline_latency_s"] == pytest.approx(sum(r.latency_s for r in sc_rows))
    assert paired["speedup"] == pytest.approx(paired["baseline_latency_s"] / paired["latency_s"])
    assert summary_json(db, baseline="sc") == report


def test_a_pipeline_the_bank_cannot_serve_stops_the_evaluation(
    tmp_path: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hotter = write(tmp_path, "hot", bank, "{strategy: self_consistency, n: 6, max_tokens: 32, temperature: 0.9}")
    argv = ["eval", str(hotter), "--benchmark", "arithmetic", "--limit", "5", "--out", str(tmp_path / "hot.db")]
    assert main([*argv, "--progress", "off", "--no-hash"]) == 1
    assert "settings" in capsys.readouterr().err  # ReplayMiss names why: different sampling settings


def test_report_json_refuses_an_unknown_baseline(
    tmp_path: Path, bank: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc = write(tmp_path, "sc", bank, "{strategy: self_consistency, n: 6, max_tokens: 32, temperature: 0.6}")
    db = tmp_path / "one.db"
    argv = ["eval", str(sc), "--benchmark", "arithmetic", "--limit", "2", "--out", str(db), "--progress", "off"]
    assert main([*argv, "--no-hash"]) == 0
    assert main(["report", str(db), "--json", "--baseline", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_replay_engine_needs_a_bank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "nobank.yaml"
    spec.write_text("engine: {backend: replay}\nthought: {strategy: single}\n")
    assert main(["validate", str(spec)]) == 2
    assert "needs 'bank'" in capsys.readouterr().err


def test_paced_replay_records_modelled_time(tmp_path: Path, bank: Path) -> None:
    """A replay paced at the bank's rate, 20 times faster than real time, records the modelled latencies: the time
    to first token plus one decode step per further token, stretched back by the speedup."""
    rate, ttft, speedup = 40.0, 0.5, 20
    spec = tmp_path / "paced.yaml"
    spec.write_text(
        f'engine: {{backend: replay, bank: "{bank}", rate: {rate}, ttft: {ttft}, speedup: {speedup}, seed: 3}}\n'
        "thought: {strategy: self_consistency, n: 1, max_tokens: 32, temperature: 0.6}\n"
    )
    db = tmp_path / "paced.db"
    argv = ["eval", str(spec), "--benchmark", "arithmetic", "--limit", "3", "--concurrency", "1", "--out", str(db)]
    assert main([*argv, "--progress", "off", "--no-hash"]) == 0
    with ResultsStore(db, readonly=True) as store:
        (config,) = store.configs()
        rows = store.rows(config.config_id)
    for row in rows:
        modelled = ttft + (row.usage_int("completion_tokens") - 1) / rate
        assert modelled <= row.latency_s < modelled + 1.0  # + our own overhead, stretched 20 times
        assert row.finished_at - row.started_at == pytest.approx(row.latency_s, abs=0.05)
    metrics = summarize(rows)
    assert metrics.wall_time_s >= sum(r.latency_s for r in rows) * 0.99  # one problem at a time
