"""Evaluation harness throughput: problems per minute on the real engine, harness overhead, grader throughput.

Parts (each compared with a baseline measured in the same run; both sides get the same untimed warm-up pass,
then timed rounds run them in alternating order, A B, B A, ..., and the medians are compared):

1. ``problems/min`` of `run_eval` on the embedded engine (default model) with self-consistency, at concurrency 1
   (baseline) and at --concurrency K: the ratio is what running problems concurrently on one engine buys. The
   warm-up pass (at K) also puts every prompt in the prefix cache, so neither side finds the cache colder.
2. harness overhead: `run_eval` on a scripted engine that answers instantly (grading, clustering, one SQLite
   transaction per row): rows per second, against the same solves with no grading or store (baseline).
3. grader throughput on MATH-500 gold answers rewritten (math-verify needed): answers/s through `MathGrader` and
   its process pool (hard per-item timeouts, never blocks the event loop) versus math-verify called in-process
   (baseline, no timeout protection), at least 3 rounds.

``--full`` instead runs the recorded comparison: GSM8K (first --limit problems, default 100) with the 0.5B model
(qwen2.5-coder-0.5b-instruct) for single, self_consistency@8, deepconf@8 and adaptive, into
``benchmarks/results/gsm8k-qwen0.5b.db`` and its report (takes hours on 2 CPU cores; resumable: run it again
to continue after an interruption).

    python benchmarks/eval_throughput.py [--quick] [--concurrency 4] [--problems 8] [--rounds 2]
    python benchmarks/eval_throughput.py --full [--limit 100]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _paired import alternating
from rich.console import Console
from rich.table import Table

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine
from branchwise.evals.datasets import BENCHMARKS_ENV, Benchmark, load_benchmark
from branchwise.evals.metrics import summarize
from branchwise.evals.repro import reproducibility_record
from branchwise.evals.runner import EvalConfig, LineProgress, config_id, run_eval, strategy_solver
from branchwise.evals.store import ResultsStore
from branchwise.search import Adaptive, DeepConf, SelfConsistency, Single

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "benchmarks"
RESULTS = ROOT / "benchmarks" / "results"


async def engine_throughput(
    problems: int, concurrency: int, max_tokens: int, model: str, rounds: int
) -> dict[str, Any]:
    from branchwise.engine.vllm_engine import VLLMEngine

    bench = load_benchmark("arithmetic", limit=problems, seed=11)
    out: dict[str, Any] = {"model": model, "problems": problems, "max_tokens": max_tokens, "rounds": rounds}
    async with VLLMEngine(model, max_model_len=2048, seed=0) as engine:
        started = time.perf_counter()
        await engine.start()
        out["engine_start_s"] = time.perf_counter() - started
        solve = strategy_solver(SelfConsistency(n=4), engine, bench, max_tokens=max_tokens)
        with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.db") as store:

            async def timed_eval(k: int, tag: str) -> dict[str, Any]:
                config = EvalConfig(f"sc4-c{k}-{tag}", solve, {"k": k, "run": tag})
                began = time.perf_counter()
                await run_eval(bench, [config], store, concurrency=k)
                wall = time.perf_counter() - began
                rows = store.rows(config_id(bench, config.label, config.params))
                tokens = sum(r.usage_int("completion_tokens") for r in rows)
                return {
                    "wall_s": wall,
                    "problems_per_min": 60 * problems / wall,
                    "completion_tokens": tokens,
                    "tokens_per_s": tokens / wall,
                    "accuracy": sum(r.correct for r in rows) / len(rows),
                }

            # One untimed pass warms both sides alike (first-batch set-up, every prompt in the prefix cache); then
            # the two sides alternate (1, K, then K, 1, ...).
            await timed_eval(concurrency, "warm-up")
            runs: dict[int, list[dict[str, Any]]] = {1: [], concurrency: []}
            for i in range(rounds):
                for k in alternating([1, concurrency], i):
                    runs[k].append(await timed_eval(k, f"round{i}"))
    for k, values in runs.items():
        out[f"c{k}"] = {
            "problems_per_min": statistics.median(v["problems_per_min"] for v in values),
            "tokens_per_s": statistics.median(v["tokens_per_s"] for v in values),
            "rounds": values,
        }
    out["concurrency"] = concurrency
    out["speedup"] = out[f"c{concurrency}"]["problems_per_min"] / out["c1"]["problems_per_min"]
    return out


async def harness_overhead(problems: int, rounds: int) -> dict[str, Any]:
    bench = load_benchmark("arithmetic", limit=problems, seed=3)
    gold = {p.question: p.gold[0] for p in bench.problems}

    def reply(request: Any) -> list[str]:
        q = next(g for text, g in gold.items() if text in request.messages[-1].content)
        return [f"The answer is {q}.", f"The answer is {int(q) + 1}.", f"So {q}."]

    solve = strategy_solver(SelfConsistency(n=3), FunctionEngine(reply), bench)
    gate = asyncio.Semaphore(8)

    async def bare(problem: Any) -> None:
        async with gate:
            await solve(problem, Budget())

    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.db") as store:

        async def solves_only(tag: str) -> float:
            """The baseline: the same solves, no grading or store."""
            began = time.perf_counter()
            await asyncio.gather(*(bare(p) for p in bench.problems))
            return time.perf_counter() - began

        async def harness(tag: str) -> float:
            began = time.perf_counter()
            await run_eval(bench, [EvalConfig(f"sc3-{tag}", solve, {"run": tag})], store, concurrency=8)
            return time.perf_counter() - began

        sides = {"solves_only": solves_only, "harness": harness}
        for side in sides.values():  # the same untimed warm-up pass for both
            await side("warm-up")
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(rounds):
            for name in alternating(list(sides), i):
                seconds[name].append(await sides[name](f"round{i}"))
        assert store.count() == problems * (rounds + 1)
    bare_s, full_s = statistics.median(seconds["solves_only"]), statistics.median(seconds["harness"])
    return {
        "problems": problems,
        "rounds": rounds,
        "solve_only_per_s": problems / bare_s,
        "harness_rows_per_s": problems / full_s,
        "overhead_ms_per_row": 1000 * (full_s - bare_s) / problems,
    }


def grader_throughput(limit: int, rounds: int) -> dict[str, Any]:
    from branchwise.verifiers.grading import (
        MathGrader,
        NumericGrader,
        TimeoutProcessPool,
        init_math_worker,
        math_verify_equal,
    )

    rows = [json.loads(line) for line in (SHARED / "math500.jsonl").read_text().splitlines()]
    pairs: list[tuple[str, str]] = []
    for row in rows:
        gold = row["answer"]
        rewritten = gold.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
        pairs.append((rewritten if rewritten != gold else f"{gold}+1", gold))
    # Keep the items that need math-verify (not plain numbers or identical text, which MathGrader settles without a
    # worker), so both paths do the same work.
    numeric = NumericGrader()
    pairs = [(p, g) for p, g in pairs if numeric.match(p, (g,)) is None and p.replace(" ", "") != g.replace(" ", "")]
    pairs = pairs[:limit]
    init_math_worker()
    pools = {workers: TimeoutProcessPool(workers, initializer=init_math_worker) for workers in (1, 2)}
    try:

        def through(pool: TimeoutProcessPool) -> Callable[[], list[bool]]:
            grader = MathGrader(pool=pool, cache_size=0, timeout=10.0)
            return lambda: [v.correct for v in grader.grade_many(pairs)]

        sides: dict[str, Callable[[], list[bool]]] = {
            "inprocess": lambda: [math_verify_equal(p, (g,)) for p, g in pairs],
            **{f"pool{w}": through(pool) for w, pool in pools.items()},
        }
        # The same untimed warm-up pass for every path: it fills sympy's caches (about 3x slower than later
        # passes here) and starts the workers. Then rounds in alternating order.
        verdicts = {name: run() for name, run in sides.items()}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(rounds):
            for name in alternating(list(sides), i):
                began = time.perf_counter()
                sides[name]()
                seconds[name].append(time.perf_counter() - began)
    finally:
        for pool in pools.values():
            pool.close()
    out: dict[str, Any] = {"answers": len(pairs), "rounds": rounds}
    for name, values in seconds.items():
        out[f"{name}_per_s"] = len(pairs) / statistics.median(values)
        if name != "inprocess":
            agree = zip(verdicts[name], verdicts["inprocess"], strict=True)
            out[f"{name}_agreement"] = sum(a == bool(b) for a, b in agree) / len(pairs)
    out["pool1_vs_inprocess"] = out["pool1_per_s"] / out["inprocess_per_s"]
    return out


async def full_comparison(limit: int, concurrency: int, model: str, max_tokens: int) -> dict[str, Any]:
    from branchwise.engine.vllm_engine import VLLMEngine
    from branchwise.evals.report import write_report

    os.environ.setdefault(BENCHMARKS_ENV, str(SHARED))
    bench: Benchmark = load_benchmark("gsm8k", limit=limit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    db = RESULTS / "gsm8k-qwen0.5b.db"
    strategies = [
        ("single", Single()),
        ("self_consistency@8", SelfConsistency(n=8)),
        ("deepconf@8", DeepConf(n=8, warmup=2, window=64, keep=0.9, consensus=0.95)),
        ("adaptive", Adaptive(probe=2, stages=(4, 8))),
    ]
    async with VLLMEngine(model, max_model_len=2048, seed=0) as engine:
        await engine.start()
        configs = [
            EvalConfig(label, strategy_solver(s, engine, bench, max_tokens=max_tokens, temperature=0.7),
                       {"strategy": s.name, "params": {k: repr(v) for k, v in s.describe().items()},
                        "max_tokens": max_tokens, "temperature": 0.7, "model": model})
            for label, s in strategies
        ]  # fmt: skip
        repro = reproducibility_record(
            engines={"policy": engine},
            seeds={"engine": 0},
            settings={"benchmark": "gsm8k", "limit": limit, "concurrency": concurrency, "max_tokens": max_tokens,
                      "data_sha256": bench.sha256},
        )  # fmt: skip
        with ResultsStore(db) as store:
            resume = store.count() > 0
            await run_eval(bench, configs, store, concurrency=concurrency, resume=resume, repro=repro,
                           progress=LineProgress(every=5), argv=sys.argv)  # fmt: skip
            figures = {c.label: summarize(store.rows(c.config_id), curves=False).to_dict() for c in store.configs()}
    md, page = write_report(db, out_dir=RESULTS / "gsm8k-qwen0.5b")
    return {"results": str(db), "report": str(md), "html": str(page), "configs": figures}


def full_row(m: dict[str, Any]) -> list[str]:
    """A configuration's cells in the --full table; adds `mean_total_tokens` to its figures.

    Every token a strategy causes counts: prompts are re-sent with each call, so tokens per problem are prompt +
    completion, and both parts are shown.
    """
    prompt, completion = m["prompt_tokens"] / m["n"], m["completion_tokens"] / m["n"]
    m["mean_total_tokens"] = prompt + completion
    return [f"{m['accuracy']:.1%}", f"[{m['ci'][0]:.1%}, {m['ci'][1]:.1%}]", f"{prompt:.0f}", f"{completion:.0f}",
            f"{prompt + completion:.0f}", f"{m['problems_per_min']:.2f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a couple of minutes)")
    parser.add_argument("--full", action="store_true", help="the recorded GSM8K comparison (hours)")
    parser.add_argument("--model", default=None, help="engine model (default smollm2; --full: the 0.5B model)")
    parser.add_argument("--problems", type=int, default=None, help="problems for the engine throughput part")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, default=100, help="--full: GSM8K problems")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each side (after one warm-up)")
    parser.add_argument("--skip-engine", action="store_true", help="only the harness and grader parts")
    args = parser.parse_args()
    console = Console(width=160)
    if args.full:
        comparison = asyncio.run(
            full_comparison(args.limit, args.concurrency, args.model or "qwen2.5-coder-0.5b-instruct",
                            args.max_tokens or 384)
        )  # fmt: skip
        table = Table(title=f"GSM8K first {args.limit}: {args.model or 'qwen2.5-coder-0.5b-instruct'}")
        for column in ("configuration", "accuracy", "95% CI", "prompt tok/problem", "completion tok/problem",
                       "total tok/problem", "problems/min"):  # fmt: skip
            table.add_column(column)
        for label, m in comparison["configs"].items():
            table.add_row(label, *full_row(m))
        console.print(table)
        print(json.dumps(comparison))
        return
    problems = args.problems or (6 if args.quick else 20)
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d")}
    figures["harness"] = asyncio.run(harness_overhead(200 if args.quick else 1000, max(args.rounds, 3)))
    figures["grader"] = grader_throughput(60 if args.quick else 200, max(args.rounds, 3))
    if not args.skip_engine:
        figures["engine"] = asyncio.run(
            engine_throughput(problems, args.concurrency, args.max_tokens or (96 if args.quick else 192),
                              args.model or "smollm2-135m-instruct", args.rounds)
        )  # fmt: skip
    table = Table(title="evaluation harness throughput")
    for column in ("part", "measure", "value", "baseline", "ratio"):
        table.add_column(column)
    h, g = figures["harness"], figures["grader"]
    table.add_row("harness (scripted engine)", "rows/s (grade + cluster + commit)", f"{h['harness_rows_per_s']:.0f}",
                  f"{h['solve_only_per_s']:.0f} solves/s", f"{h['overhead_ms_per_row']:.2f} ms/row")  # fmt: skip
    table.add_row("grader (MATH-500 rewrites)", "answers/s, pool of 1", f"{g['pool1_per_s']:.1f}",
                  f"{g['inprocess_per_s']:.1f} in-process", f"{g['pool1_vs_inprocess']:.2f}x")  # fmt: skip
    table.add_row("", "answers/s, pool of 2", f"{g['pool2_per_s']:.1f}", "", "")
    if "engine" in figures:
        e = figures["engine"]
        k = e["concurrency"]
        table.add_row(f"engine ({e['model']}, sc@4, {e['max_tokens']} tok)", f"problems/min at concurrency {k}",
                      f"{e[f'c{k}']['problems_per_min']:.1f}", f"{e['c1']['problems_per_min']:.1f} at 1",
                      f"{e['speedup']:.2f}x")  # fmt: skip
    console.print(table)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
