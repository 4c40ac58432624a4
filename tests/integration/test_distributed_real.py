"""`branchwise eval --ray` with a real SmolLM2 replica: one Ray actor on a cluster of this machine (127.0.0.1)
builds the embedded vLLM engine from the spec and solves the problems; the driver stores the rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchwise.cli import main
from branchwise.evals.metrics import summarize
from branchwise.evals.store import ResultsStore

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(900)]

PIPELINE = """
engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 2048, enforce_eager: true}
runtime: {seed: 0}
thought: {strategy: self_consistency, n: 2, max_tokens: 32, temperature: 0.7}
"""


def test_one_real_smollm2_replica_on_a_ray_actor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "real.yaml"
    spec.write_text(PIPELINE)
    out = tmp_path / "r.db"
    # 2 logical CPUs: the actor reserves both, as the engine uses one core and vLLM keeps one free
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        argv = ["eval", str(spec), "--benchmark", "arithmetic", "--limit", "3", "--seed", "7", "--out", str(out),
                "--no-hash", "--progress", "off", "--ray", "--replicas", "1", "--replica-cpus", "2",
                "--concurrency", "3"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        ray.shutdown()
    with ResultsStore(out, readonly=True) as store:
        rows = store.rows()
        (run,) = store.runs()
    metrics = summarize(rows, curves=False)
    assert metrics.n == 3 and metrics.errors == 0
    assert all(len(r.candidates) == 2 for r in rows)
    assert all(0 < r.usage_int("completion_tokens") <= 2 * 32 for r in rows)
    assert run.status == "finished" and run.repro["settings"]["ray"]["replicas"] == 1
    engine = run.repro["engines"]["policy"]  # recorded on the actor, which loaded the model
    assert engine["backend"] == "vllm" and engine["model_path"] and "smollm2" in engine["model_path"].lower()
