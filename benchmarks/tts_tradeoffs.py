"""Accuracy versus tokens of test-time-scaling strategies on the real embedded engine.

Strategies: single (greedy), self_consistency at N, deepconf (online, N; DeepConf-high keep=0.9 and DeepConf-low
keep=0.1), prune (N) and adaptive (up to N), for
each N in --ns. For every strategy: accuracy, total completion tokens, and against self_consistency at the same
N the token reduction and the accuracy difference with a 95% paired interval (Newcombe's hybrid score method)
and the discordant problems behind it.

Problems: built-in arithmetic word problems (default), or the first --limit GSM8K test problems from
../shared/benchmarks/gsm8k_test.jsonl with --gsm8k.

    python benchmarks/tts_tradeoffs.py [--quick] [--gsm8k] [--model qwen2.5-coder-0.5b-instruct] [--limit 20]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from branchwise.budget import Budget
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.arithmetic import arithmetic_problems
from branchwise.evals.metrics import paired_difference_interval
from branchwise.search import Adaptive, DeepConf, Prune, SearchContext, SelfConsistency, Single, Strategy
from branchwise.verifiers.grading import NumericGrader

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks"


def load_problems(gsm8k: bool, limit: int) -> list[tuple[str, str]]:
    if not gsm8k:
        return [(p.question, p.answer) for p in arithmetic_problems(limit, seed=1, levels=(1, 2, 3))]
    path = SHARED / "gsm8k_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:limit]]
    return [(r["question"], r["answer"].split("####")[-1].strip().replace(",", "")) for r in rows]


def strategies(ns: list[int], window: int) -> list[tuple[str, int, Strategy]]:
    result: list[tuple[str, int, Strategy]] = [("single", 1, Single())]
    for n in ns:
        result += [
            (f"self_consistency@{n}", n, SelfConsistency(n=n)),
            # DeepConf-high (keep the 90% most confident) and DeepConf-low (keep the top 10%), as in the paper.
            (f"deepconf@{n}", n, DeepConf(n=n, warmup=max(2, n // 4), keep=0.9, window=window, consensus=0.95)),
            (f"deepconf_low@{n}", n, DeepConf(n=n, warmup=max(2, n // 4), keep=0.1, window=window, consensus=0.95)),
            (f"prune@{n}", n, Prune(n=n, interval=32, min_tokens=64)),
            (f"adaptive@{n}", n, Adaptive(probe=max(2, n // 4), stages=(n,) if n > max(2, n // 4) else ())),
        ]
    return result


def paired_diff(a: list[bool], b: list[bool]) -> tuple[float, float, float, int, int]:
    """Accuracy of a minus b with its 95% paired interval (Newcombe), and the discordant counts."""
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    lo, hi = paired_difference_interval(both, only_a, only_b, len(a) - both - only_a - only_b)
    return (only_a - only_b) / len(a), lo, hi, only_a, only_b


async def run_one(
    engine: VLLMEngine, strategy: Strategy, problems: list[tuple[str, str]], max_tokens: int, concurrency: int
) -> dict[str, Any]:
    grader = NumericGrader()
    gate = asyncio.Semaphore(concurrency)

    async def solve(question: str, gold: str) -> tuple[bool, int, int]:
        async with gate:
            ctx = SearchContext(engine=engine, budget=Budget(), max_tokens=max_tokens, temperature=0.7)
            result = await strategy.run(question, ctx)
            correct = result.answer is not None and grader.equivalent(result.answer, gold)
            return correct, result.usage.completion_tokens, result.pruned

    started = time.perf_counter()
    rows = await asyncio.gather(*(solve(q, g) for q, g in problems))
    return {
        "correct": [r[0] for r in rows],
        "tokens": sum(r[1] for r in rows),
        "pruned": sum(r[2] for r in rows),
        "seconds": time.perf_counter() - started,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 problems, N=8, 192 tokens")
    parser.add_argument("--gsm8k", action="store_true", help="GSM8K test problems instead of built-in ones")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--ns", default="8,16", help="comma-separated N values")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--window", type=int, default=64, help="DeepConf group-confidence window")
    parser.add_argument("--concurrency", type=int, default=4, help="problems in flight at once")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.ns, args.max_tokens = 6, "8", 192
    ns = [int(x) for x in args.ns.split(",")]
    problems = load_problems(args.gsm8k, args.limit)

    runs: dict[str, dict[str, Any]] = {}
    async with VLLMEngine(args.model, max_model_len=2048) as engine:
        await engine.start()
        for label, n, strategy in strategies(ns, args.window):
            runs[label] = run = {"n": n, **await run_one(engine, strategy, problems, args.max_tokens, args.concurrency)}
            print(  # progress on stderr: a full run takes an hour or more
                f"{label}: {sum(run['correct'])}/{len(problems)} right, {run['tokens']} tokens, {run['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    table = Table(title=f"test-time scaling on {len(problems)} {'GSM8K' if args.gsm8k else 'arithmetic'} problems")
    for column in (
        "strategy",
        "accuracy",
        "tokens",
        "pruned",
        "vs SC@N tokens",
        "vs SC@N accuracy (95% CI; discordant)",
        "s",
    ):
        table.add_column(column)
    figures = []
    for label, run in runs.items():
        acc = sum(run["correct"]) / len(problems)
        baseline = runs.get(f"self_consistency@{run['n']}")
        reduction = diff = None
        if baseline is not None and baseline is not run:
            reduction = 1 - run["tokens"] / baseline["tokens"] if baseline["tokens"] else None
            diff = paired_diff(run["correct"], baseline["correct"])
        table.add_row(
            label, f"{acc:.1%}", str(run["tokens"]), str(run["pruned"]),
            "" if reduction is None else f"{reduction:+.1%} fewer" if reduction >= 0 else f"{-reduction:.1%} more",
            "" if diff is None else (
                f"{diff[0] * 100:+.1f} pts [{diff[1] * 100:+.1f}, {diff[2] * 100:+.1f}]; {diff[3]} vs {diff[4]}"
            ),
            f"{run['seconds']:.0f}",
        )  # fmt: skip
        figures.append(
            {
                "strategy": label, "accuracy": round(acc, 4), "tokens": run["tokens"], "pruned": run["pruned"],
                "seconds": round(run["seconds"], 1),
                "token_reduction_vs_sc": None if reduction is None else round(reduction, 4),
                "accuracy_diff_vs_sc": None if diff is None else [round(x, 4) for x in diff[:3]],
                "discordant_vs_sc": None if diff is None else list(diff[3:]),
            }
        )  # fmt: skip
    Console().print(table)
    meta = {"model": args.model, "problems": len(problems), "set": "gsm8k" if args.gsm8k else "arithmetic"}
    print(json.dumps({"benchmark": "tts_tradeoffs", **meta, "max_tokens": args.max_tokens, "results": figures}))


if __name__ == "__main__":
    asyncio.run(main())
