"""`branchwise eval --ray` and `branchwise.distributed` on a Ray cluster of this machine (127.0.0.1), started once
for the module, with scripted-engine pipelines on 2-4 actors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.cli import main
from branchwise.distributed import RayDispatcher, ReplicaOptions, ReplicaPool, run_batch
from branchwise.errors import EngineUnavailable
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.metrics import summarize
from branchwise.evals.pipelines import EvalSettings, evaluate_pipelines, pipeline_configs
from branchwise.evals.store import ResultRow, ResultsStore
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.spec import load_spec_file

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402 - after the skip: Ray is optional

pytestmark = [pytest.mark.timeout(300)]  # a Ray cluster starts in ~10 s here, but minutes on a loaded machine

PROBLEMS = 16
SMALL_STORE = 200 * 1024 * 1024  # bytes; rows are small, and the default (30% of memory) crowds a shared machine
# Deterministic per problem: the reply depends only on the question, so any actor gives the same row. Problems
# whose number ends in 1, 2 or 3 are answered right; the others split their two samples or say something wrong.
PIPELINE = """
name: scripted
engine:
  backend: test
  token_delay: {delay}
  rules:
    - {{when: "Q1 ", reply: ["The answer is 2.", "The answer is 2."]}}
    - {{when: "Q(2|12) ", reply: ["The answer is 4.", "The answer is 24.", "The answer is 24."]}}
    - {{when: "Q(3|13) ", reply: ["The answer is 6.", "The answer is 26."]}}
    - {{when: "Q[0-9]*[4-6] ", reply: ["The answer is 1.", "So 99 it is. The answer is 99."]}}
  default: "I do not know."
thought: {{strategy: self_consistency, n: 3, max_tokens: 32}}
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    ray.init(num_cpus=4, object_store_memory=SMALL_STORE, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def write_files(tmp_path: Path, *, delay: float = 0.0, problems: int = PROBLEMS) -> tuple[Path, Path]:
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"Q{i} What is {i}*2?", "answer": f"#### {2 * i}"} for i in range(1, problems + 1)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(PIPELINE.format(delay=delay))
    return data, pipeline


def eval_args(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", str(pipeline), "--benchmark", "gsm8k", "--data", str(data), "--out", str(out), "--no-hash",
            "--progress", "off", *extra]  # fmt: skip


def comparable(rows: list[ResultRow]) -> dict[str, tuple[Any, ...]]:
    """What must not depend on where a problem ran (not times, not the run id)."""
    return {
        r.problem_id: (r.answer, r.correct, r.score, json.dumps(r.candidates), r.votes, counts(r.usage), r.error)
        for r in rows
    }


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in usage.items() if not k.endswith("_s")}  # times are not counts


def stored(path: Path) -> list[ResultRow]:
    with ResultsStore(path, readonly=True) as store:
        return store.rows()


def test_eval_on_ray_equals_the_local_run_and_records_the_replicas(
    cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, pipeline = write_files(tmp_path)
    local, remote = tmp_path / "local.db", tmp_path / "ray.db"
    assert main(eval_args(pipeline, data, local, "--sweep", "thought.n=1,3")) == 0
    ray_flags = ("--ray", cluster, "--replicas", "3", "--replica-cpus", "1", "--concurrency", "2")
    assert main(eval_args(pipeline, data, remote, "--sweep", "thought.n=1,3", *ray_flags)) == 0
    a, b = stored(local), stored(remote)
    assert len(b) == 2 * PROBLEMS and len({(r.config_id, r.problem_id) for r in b}) == 2 * PROBLEMS
    assert comparable(a) == comparable(b)
    with ResultsStore(remote, readonly=True) as store:
        for config in store.configs():
            m_local = summarize([r for r in a if r.config_id == config.config_id], curves=False)
            m_ray = summarize(store.rows(config.config_id), curves=False)
            assert (m_ray.correct, m_ray.completion_tokens, m_ray.calls) == (
                m_local.correct,
                m_local.completion_tokens,
                m_local.calls,
            )
        (run,) = store.runs()
        assert run.status == "finished"
        assert run.repro["settings"]["ray"] == {"address": cluster, "replicas": 3, "max_tries": 3}
        assert run.repro["engines"]["policy"]["backend"] == "test"  # recorded by an actor, which built it
    right = sorted((r.config_id == b[0].config_id, r.problem_id) for r in b if r.correct)
    # thought.n=1: Q1, Q2, Q3 take their first sample; thought.n=3: Q1, Q3 and Q12 by majority
    assert [p for _, p in right] == ["gsm8k-0", "gsm8k-11", "gsm8k-2", "gsm8k-0", "gsm8k-1", "gsm8k-2"]


def test_an_actor_killed_mid_run_loses_and_duplicates_nothing(cluster: str, tmp_path: Path) -> None:
    data, pipeline = write_files(tmp_path, delay=0.02)
    spec = load_spec_file(pipeline)
    benchmark = load_benchmark("gsm8k", str(data), None)
    configs = pipeline_configs(spec, benchmark, [])
    dispatcher = RayDispatcher(ReplicaOptions(replicas=3, num_cpus=1, concurrency=2, max_restarts=0))
    delivered: list[ResultRow] = []
    killed: list[str] = []

    class KillAfterThree:
        def start(self, label: str, total: int, done: int) -> None:
            pass

        def advance(self, row: ResultRow) -> None:
            delivered.append(row)
            if len(delivered) == 3:  # the driver's own progress: one actor dies with problems in flight
                pool = dispatcher.pools[-1]
                victim = next(a for a in pool.actors if not a.dead)
                killed.append(victim.name)
                ray.kill(victim.handle, no_restart=True)

        def finish(self) -> None:
            pass

    async def go(out: Path, progress: Any, with_ray: bool) -> None:
        settings = EvalSettings(concurrency=2, progress=progress, hash_weights=False)
        if with_ray:
            settings.dispatcher = dispatcher
        with ResultsStore(out) as store:
            await evaluate_pipelines(benchmark, configs, store, Budget(), settings)

    asyncio.run(go(tmp_path / "ray.db", KillAfterThree(), True))
    asyncio.run(go(tmp_path / "local.db", None, False))
    pool = dispatcher.pools[-1]
    assert killed and pool.deaths == 1 and pool.restarts_left == 0
    ids = [r.problem_id for r in delivered]
    assert len(ids) == PROBLEMS and len(set(ids)) == PROBLEMS  # each problem delivered once
    assert all(r.error is None for r in delivered)
    b, a = stored(tmp_path / "ray.db"), stored(tmp_path / "local.db")
    assert comparable(a) == comparable(b)
    ma, mb = summarize(a, curves=False), summarize(b, curves=False)
    assert (ma.correct, ma.prompt_tokens, ma.completion_tokens, ma.calls) == (
        mb.correct,
        mb.prompt_tokens,
        mb.completion_tokens,
        mb.calls,
    )


# -- the pool's fault handling, with an actor whose work on one item kills its process --------------------------
class Worker:
    async def start(self) -> str:
        return "ready"

    async def work(self, item: str) -> str:
        if item == "poison":
            os._exit(1)  # what an out-of-memory kill or a crashing native library looks like from outside
        if item == "slow":
            await asyncio.sleep(600)
        await asyncio.sleep(0.01)
        return item.upper()


def make_worker(**options: Any) -> Any:
    return ray.remote(Worker).options(**options).remote()


async def map_items(pool: ReplicaPool[str, str], items: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    done: dict[str, str] = {}
    lost: dict[str, str] = {}

    async def on_result(item: str, result: str) -> bool:
        assert item not in done
        done[item] = result
        return True

    async def on_lost(item: str, reason: str) -> bool:
        lost[item] = reason
        return True

    async with pool:
        await pool.map(items, lambda actor, item: actor.work.remote(item), on_result, on_lost)
    return done, lost


def test_a_problem_that_kills_its_actors_is_given_up_after_max_tries(cluster: str) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor class lives in this test module
    items = [f"item{i}" for i in range(12)]
    items.insert(5, "poison")
    # one item at a time per actor: only the poison is in flight when an actor dies
    options = ReplicaOptions(replicas=2, num_cpus=0.5, concurrency=1, max_tries=2, max_restarts=3)
    pool: ReplicaPool[str, str] = ReplicaPool(options, make_worker, lambda actor: actor.start.remote())
    done, lost = asyncio.run(map_items(pool, items))
    assert done == {item: item.upper() for item in items if item != "poison"}
    assert list(lost) == ["poison"] and lost["poison"].startswith("ReplicaLost: in flight on 2 Ray actors")
    assert pool.deaths == 2
    # the first death was replaced; the second too unless every item was settled by then
    assert pool.started == ["ready"] * (2 + 3 - pool.restarts_left) and pool.restarts_left in (1, 2)


def test_every_replica_dead_and_no_restart_left_is_engine_unavailable(cluster: str) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    options = ReplicaOptions(replicas=2, num_cpus=0.5, concurrency=1, max_tries=5, max_restarts=0)
    pool: ReplicaPool[str, str] = ReplicaPool(options, make_worker, lambda actor: actor.start.remote())
    with pytest.raises(EngineUnavailable, match="every Ray replica died"):
        asyncio.run(map_items(pool, ["poison", "a"]))
    assert pool.deaths == 2 and pool.actors == []


def test_cancelling_the_driver_cancels_the_calls_and_keeps_what_finished(cluster: str) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    options = ReplicaOptions(replicas=2, num_cpus=0.5, concurrency=2)
    pool: ReplicaPool[str, str] = ReplicaPool(options, make_worker, lambda actor: actor.start.remote())
    done: dict[str, str] = {}

    async def go() -> None:
        three = asyncio.Event()

        async def on_result(item: str, result: str) -> bool:
            done[item] = result
            if len(done) == 3:
                three.set()
            return True

        async def mapped() -> None:
            async with pool:
                items = ["slow", "a", "b", "c", "slow"]
                await pool.map(items, lambda actor, item: actor.work.remote(item), on_result, on_result)

        task = asyncio.create_task(mapped())
        await three.wait()  # the fast items are in; both slow ones are running on the actors
        task.cancel()  # what Ctrl-C does to the driver's main task
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(go())
    assert done == {"a": "A", "b": "B", "c": "C"}  # what finished is kept
    assert pool.actors == [] and time.monotonic() - started < 120  # the 600 s calls did not hold anything up


def test_run_batch_returns_pipeline_results_in_order(cluster: str, tmp_path: Path) -> None:
    _, pipeline = write_files(tmp_path)
    queries = [f"Q{i} What is {i}*2? Put the answer after 'The answer is'." for i in (3, 1, 14, 7, 2)]
    outcomes = asyncio.run(run_batch(pipeline, queries, ReplicaOptions(replicas=2, num_cpus=0.5)))
    local = Pipeline.from_yaml(pipeline)
    try:
        expected = [local.run_sync(q).answer for q in queries]
    finally:
        asyncio.run(local.aclose())
    assert [o.query for o in outcomes] == queries
    assert [o.error for o in outcomes] == [None] * 5
    assert [o.result.answer for o in outcomes if o.result is not None] == expected == ["6", "2", "1", None, "24"]


def test_eval_wide_caps_are_refused_with_ray(cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, pipeline = write_files(tmp_path)
    assert main(eval_args(pipeline, data, tmp_path / "r.db", "--ray", cluster, "--max-calls", "5")) == 2
    assert "--max-calls: evaluation-wide caps are not available with --ray" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()


def test_driver_killed_with_sigkill_then_resumed(cluster: str, tmp_path: Path) -> None:
    data, pipeline = write_files(tmp_path, delay=0.05, problems=24)
    out = tmp_path / "r.db"
    argv = eval_args(pipeline, data, out, "--ray", cluster, "--replicas", "2", "--replica-cpus", "0.5",
                     "--concurrency", "1")  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "branchwise.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while _count(out) < 4:  # a subprocess: the file is all there is to watch
            assert driver.poll() is None, driver.stderr.read().decode() if driver.stderr else ""
            assert time.monotonic() < deadline, "the driver stored nothing within 60 s"
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    before = stored(out)
    assert 4 <= len(before) < 24
    with ResultsStore(out, readonly=True) as store:
        assert store.integrity_check() == "ok"
        assert [r.status for r in store.runs()] == ["running"]  # never finished: the process died mid-run
    assert main([*argv, "--resume"]) == 0
    after = stored(out)
    assert len(after) == 24 and len({r.problem_id for r in after}) == 24
    kept = {r.problem_id: r for r in after}
    assert all(kept[r.problem_id].run_id == r.run_id for r in before)  # what finished before the kill is kept
    local = tmp_path / "local.db"
    assert main(eval_args(pipeline, data, local)) == 0
    assert comparable(stored(local)) == comparable(after)


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT count(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # created, tables not yet there
        return 0
