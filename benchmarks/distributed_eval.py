"""`branchwise eval --ray`: problems per minute on 1, 2 and 4 Ray actors, and what the driver costs per problem.

The engine is the scripted ``test`` backend with a per-token delay, so a call takes as long as a real one
(``--token-delay`` x ``--tokens`` seconds per sample, 1.2 s by default) while using almost no CPU: what is
measured is the distribution (dispatch, one Ray call per problem, the row coming back, the driver's commit), not a
model. Each actor builds its own engine and runs ``--concurrency`` problems at a time.

Figures:
- problems/min per actor count, from the stored rows (first problem's start to last problem's end; actor start-up
  excluded, and reported apart), and the ratio per doubling of actors;
- the driver's overhead per problem: with an engine that answers at once on one actor at concurrency 1, the time
  per problem through Ray minus the same problems solved in the driver's own process;
- the driver's commit rate: rows per second `run_eval` stores when a dispatch hands it finished rows as fast as it
  can (the ceiling the single-writer design puts on any number of actors).

    python benchmarks/distributed_eval.py [--quick] [--address ADDRESS] [--rounds R]

``--quick``: fewer problems, one round. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _paired import alternating

from branchwise.budget import Budget
from branchwise.distributed import RayDispatcher, ReplicaOptions, connect
from branchwise.evals.datasets import Benchmark, load_benchmark
from branchwise.evals.metrics import summarize
from branchwise.evals.pipelines import EvalSettings, PipelineConfig, evaluate_pipelines, pipeline_configs
from branchwise.evals.runner import ConfigRun, Deliver, EvalConfig, run_eval
from branchwise.evals.store import ResultRow, ResultsStore
from branchwise.orchestrator.spec import load_spec

ACTORS = (1, 2, 4)


def files(folder: Path, problems: int) -> Path:
    data = folder / "data.jsonl"
    rows = [{"question": f"Q{i} What is {i}*2?", "answer": f"#### {2 * i}"} for i in range(1, problems + 1)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def pipeline(tokens: int, delay: float) -> str:
    words = " ".join(["step"] * max(0, tokens - 4))
    return f"""
name: latency
engine:
  backend: test
  token_delay: {delay}
  default: "{words} The answer is 4."
thought: {{strategy: single, max_tokens: {tokens + 8}}}
"""


async def ray_eval(
    benchmark: Benchmark, configs: Sequence[PipelineConfig], out: Path, actors: int, concurrency: int
) -> dict[str, Any]:
    dispatcher = RayDispatcher(ReplicaOptions(replicas=actors, num_cpus=1, concurrency=concurrency))
    settings = EvalSettings(concurrency=concurrency, hash_weights=False, dispatcher=dispatcher)
    started = time.perf_counter()
    with ResultsStore(out) as store:
        await evaluate_pipelines(benchmark, configs, store, Budget(), settings)
        rows = store.rows()
    elapsed = time.perf_counter() - started
    metrics = summarize(rows, curves=False)
    assert metrics.n == len(benchmark.problems) and metrics.errors == 0, (metrics.n, metrics.errors)
    return {
        "actors": actors,
        "problems": metrics.n,
        "problems_per_min": metrics.problems_per_min,
        "wall_s": metrics.wall_time_s,
        "startup_s": elapsed - metrics.wall_time_s,
    }


async def local_eval(benchmark: Benchmark, configs: Sequence[PipelineConfig], out: Path) -> float:
    settings = EvalSettings(concurrency=1, hash_weights=False)
    with ResultsStore(out) as store:
        await evaluate_pipelines(benchmark, configs, store, Budget(), settings)
        return summarize(store.rows(), curves=False).wall_time_s


class Replay:
    """A dispatch that hands `run_eval` finished rows as fast as it takes them: only the driver's work is left."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def run(self, job: ConfigRun, deliver: Deliver) -> bool:
        record, origin, run_id = job.record, job.origin, job.run_id
        for problem in job.pending:
            row = ResultRow(
                config_id=record.config_id, problem_id=problem.id, level=None, gold=problem.gold, answer="4",
                correct=False, score=0.0, candidates=[{"answer": "4", "tokens": 12, "correct": False, "score": 0.0,
                "cluster": 0, "confidence": None, "verifier_score": None}] * 8, votes={"4": 8.0},
                usage={"prompt_tokens": 90, "completion_tokens": 96, "calls": 1}, latency_s=1.0,
                budget_exhausted=False, error=None, started_at=origin, finished_at=time.time(), run_id=run_id,
            )  # fmt: skip
            if not await deliver(row):
                return True
        return False


async def commit_rate(folder: Path, count: int) -> float:
    benchmark = load_benchmark("arithmetic", None, count)
    config = EvalConfig("replayed", None, {"n": count})
    with ResultsStore(folder / "commit.db") as store:
        started = time.perf_counter()
        await run_eval(benchmark, [config], store, dispatch=Replay(count))
        elapsed = time.perf_counter() - started
        assert store.count() == count
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer problems, one round")
    parser.add_argument("--address", help="a Ray cluster to join (default: one started on this machine)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the actor counts (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="problems in flight on each actor (default 4)")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per scripted sample (default 24)")
    parser.add_argument("--token-delay", type=float, default=0.05, help="seconds per token (default 0.05)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    per_actor = 12 if args.quick else 24  # problems per actor slot-set: every count runs a few waves
    problems = per_actor * args.concurrency
    connect(args.address, num_cpus=None if args.address else max(ACTORS), log_to_driver=False)
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in ACTORS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        benchmark = load_benchmark("gsm8k", str(files(folder, problems)), None)
        configs = pipeline_configs(load_spec(pipeline(args.tokens, args.token_delay)), benchmark, [])
        for r in range(rounds):
            for n in alternating(ACTORS, r):
                out = folder / f"ray-{n}-{r}.db"
                runs[n].append(asyncio.run(ray_eval(benchmark, configs, out, n, args.concurrency)))
                print(f"round {r + 1}: {n} actor(s): {runs[n][-1]['problems_per_min']:.0f} problems/min", flush=True)
        # the driver's overhead per problem: an instant engine, one problem at a time, through Ray and locally
        instant = pipeline_configs(load_spec(pipeline(args.tokens, 0.0)), benchmark, [])
        small = dataclasses.replace(benchmark, problems=benchmark.problems[: 24 if args.quick else 48])
        through_ray = asyncio.run(ray_eval(small, instant, folder / "ray-instant.db", 1, 1))
        here_s = asyncio.run(local_eval(small, instant, folder / "local-instant.db"))
        overhead_ms = (through_ray["wall_s"] - here_s) / len(small.problems) * 1000
        rate = asyncio.run(commit_rate(folder, 500 if args.quick else 2000))

    means = {n: statistics.mean(x["problems_per_min"] for x in runs[n]) for n in ACTORS}
    ratios = {f"{b}/{a}": means[b] / means[a] for a, b in itertools.pairwise(ACTORS)}
    per_call_s = args.tokens * args.token_delay
    print()
    print(f"scripted engine: {args.tokens} tokens x {args.token_delay} s = {per_call_s:.2f} s a call; "
          f"{args.concurrency} problems in flight per actor; {problems} problems; {rounds} round(s)")  # fmt: skip
    print(f"{'actors':>6}  {'problems/min':>12}  {'vs half':>7}  {'ideal':>7}  {'start-up s':>10}")
    for n in ACTORS:
        ideal = 60 / per_call_s * args.concurrency * n
        half = f"{means[n] / means[n // 2]:.2f}x" if n // 2 in means else "-"
        startup = statistics.mean(x["startup_s"] for x in runs[n])
        print(f"{n:>6}  {means[n]:>12.0f}  {half:>7}  {ideal:>7.0f}  {startup:>10.1f}")
    print(f"driver overhead per problem (Ray round trip + commit, instant engine): {overhead_ms:.1f} ms")
    print(f"driver commit rate (rows handed over as fast as taken): {rate:.0f} rows/s")
    figures = {
        "benchmark": "distributed_eval",
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1m": os.getloadavg()[0]},
        "workload": {
            "problems": problems,
            "tokens": args.tokens,
            "token_delay_s": args.token_delay,
            "concurrency_per_actor": args.concurrency,
            "rounds": rounds,
        },
        "problems_per_min": {str(n): round(means[n], 1) for n in ACTORS},
        "runs": {str(n): runs[n] for n in ACTORS},
        "ratio_per_doubling": {k: round(v, 3) for k, v in ratios.items()},
        "driver_overhead_ms_per_problem": round(overhead_ms, 2),
        "instant_problems": len(small.problems),
        "driver_commit_rows_per_s": round(rate, 1),
    }
    print(json.dumps(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
