"""`branchwise.distributed` without a cluster: the error without Ray, option checks, GPUs read from the spec, and
what the driver does with a problem its workers gave up on."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from branchwise.budget import Budget
from branchwise.cli import main
from branchwise.distributed import INSTALL_HINT, ReplicaOptions, replica_cpus, replica_gpus, run_batch
from branchwise.distributed.replicas import _check_distributable
from branchwise.errors import ConfigError
from branchwise.evals.datasets import Problem, load_benchmark
from branchwise.evals.runner import ConfigRun, Deliver, EvalConfig, ProblemSolver, failed_row, run_eval
from branchwise.evals.store import ResultsStore
from branchwise.orchestrator.spec import load_spec

PIPELINE = "engine: {backend: test, default: 'The answer is 4.'}\nthought: {strategy: single}\n"


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed


@pytest.mark.usefixtures("no_ray")
def test_ray_flag_without_ray_says_how_to_install_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "Q1 What is 2+2?", "answer": "#### 4"}) + "\n")
    spec = tmp_path / "p.yaml"
    spec.write_text(PIPELINE)
    out = tmp_path / "r.db"
    argv = ["eval", str(spec), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--ray"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "need Ray, which is not installed" in err and "pip install 'branchwise[distributed]'" in err
    assert not out.exists()  # refused before any work
    assert main(argv[:-1]) == 0  # the same evaluation without --ray needs no Ray


@pytest.mark.usefixtures("no_ray")
def test_run_batch_without_ray_raises_config_error_naming_the_extra() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'branchwise\[distributed\]'"):
        asyncio.run(run_batch(load_spec(PIPELINE), ["q"]))
    assert INSTALL_HINT == "pip install 'branchwise[distributed]'"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0}, "replicas must be in 1..4096"),
        ({"num_gpus": -1}, "replica resources must be >= 0"),
        ({"resources": {"accelerator": -0.5}}, "replica resources must be >= 0"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"max_tries": 0}, "max_tries must be >= 1"),
        ({"max_restarts": -1}, "max_restarts must be >= 0"),
    ],
)
def test_replica_options_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ReplicaOptions(**options)  # type: ignore[arg-type]


def test_gpus_per_replica_come_from_the_spec_parallelism() -> None:
    head = "engine: {backend: vllm, model: smollm2-135m-instruct"
    assert replica_gpus(load_spec(head + ", tensor_parallel_size: 2}\nthought: {strategy: single}\n")) == 2
    assert replica_gpus(load_spec(head + "}\nthought: {strategy: single}\n")) == 0
    assert replica_gpus(load_spec(PIPELINE)) == 0


def test_cpus_per_replica_come_from_the_cores_the_spec_binds() -> None:
    head = "engine: {backend: vllm, model: smollm2-135m-instruct"
    assert replica_cpus(load_spec(head + ", cpu_cores: '0-3,6'}\nthought: {strategy: single}\n")) == 5
    assert replica_cpus(load_spec(head + "}\nthought: {strategy: single}\n")) == 1
    assert replica_cpus(load_spec(PIPELINE)) == 1


def test_replay_pipelines_are_refused_with_ray(tmp_path: Path) -> None:
    spec = load_spec(f"engine: {{backend: replay, bank: {tmp_path}}}\nthought: {{strategy: single}}\n")
    with pytest.raises(ConfigError, match="evaluate replay pipelines without --ray"):
        _check_distributable(spec)


def test_a_problem_given_up_is_stored_as_failed_and_resume_runs_it_again(tmp_path: Path) -> None:
    benchmark = load_benchmark("arithmetic", None, 3)

    async def solve(problem: Problem, budget: Budget) -> dict[str, object]:
        return {"answer": problem.gold[0], "candidates": [], "usage": {"calls": 1}}

    config = EvalConfig("c", solve, {"k": 1})
    solver = ProblemSolver(Budget(), benchmark.make_grader())

    class LoseTheFirst:
        """A dispatch whose workers all died under the first problem (what `RayDispatcher` delivers then)."""

        async def run(self, job: ConfigRun, deliver: Deliver) -> bool:
            first, *rest = job.pending
            await deliver(failed_row(first, job.record, "ReplicaLost: in flight on 3 Ray actors", run_id=job.run_id))
            for problem in rest:
                await deliver(await solver.solve_one(problem, config, job.record, origin=job.origin, run_id=job.run_id))
            return False

    with ResultsStore(tmp_path / "r.db") as store:
        summary = asyncio.run(run_eval(benchmark, [config], store, dispatch=LoseTheFirst()))
        assert (summary.configs[0].stored, summary.configs[0].errors) == (3, 1)
        lost = next(r for r in store.rows() if r.error)
        assert lost.problem_id == benchmark.problems[0].id and not lost.correct and lost.answer is None
        assert lost.run_id == summary.run_id and lost.error.startswith("ReplicaLost")
        again = asyncio.run(run_eval(benchmark, [config], store, resume=True))  # solved here this time
        assert (again.configs[0].skipped, again.configs[0].stored, again.configs[0].errors) == (2, 1, 0)
        assert all(r.correct and r.error is None for r in store.rows())
