"""What stopping early can save on a trace bank, before any strategy runs: the limits the data sets.

For every banked problem the N traces' answers are extracted and graded with the benchmark's own rules (no engine
runs). Over ``--orders`` seeded random orders of each problem's traces it reports:

- **SC@k** for k = 1, 2, 4, ..., N: the expected accuracy of a majority vote over the first k traces (ties go to
  the answer seen first, as in `branchwise.search.sampling.pick_answer`) and its tokens (one request: the prompt
  once plus k traces).
- **exact stopping, one trace per request**: traces are drawn one at a time and the run stops as soon as the
  leading answer cannot lose the vote of N (the leader has more votes than the runner-up plus every trace not
  drawn yet). It returns SC@N's answer on every problem (so its accuracy is SC@N's) with the fewest traces any
  rule that never changes SC@N's answer can use in that order; each request re-sends the prompt. Its token
  reduction is therefore the most that answer-preserving stopping can save on this bank. The row "prompt once"
  counts the prompt a single time, as if one request's samples could be drawn one after another: a floor no
  engine reaches (samples of one request decode in lockstep), shown for the completion tokens alone.
- **agreement**: the share of a problem's traces that give its SC@N answer (in banked order), averaged over
  problems.

A token reduction target (``--target``, default 0.6) is then put against the data: the largest k whose SC@k
costs at most (1 - target) of SC@N's tokens, and that k's expected accuracy next to SC@N's.

    python benchmarks/bank_limits.py BANK --benchmark gsm8k [--data PATH] [--orders 200] [--target 0.6]
        [--limit P]

``--quick``: the first 10 problems, 20 orders. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from branchwise.engine.tracebank import TraceBank
from branchwise.evals.datasets import load_benchmark
from branchwise.verifiers.grader_base import BaseGrader


@dataclass(frozen=True)
class BankedRun:
    """One problem's traces as the analysis needs them: answer cluster, correctness and tokens per trace."""

    problem_id: str
    prompt_tokens: int
    clusters: tuple[int, ...]  # per trace: the index of its answer's cluster (-1: no answer)
    correct: tuple[bool, ...]  # per cluster: whether that answer is right
    tokens: tuple[int, ...]  # per trace


def cluster(answers: Sequence[str | None], grader: BaseGrader) -> tuple[list[int], list[str]]:
    """Each answer's cluster index (answers the grader deems equivalent share one; -1 for no answer)."""
    representatives: list[str] = []
    labels = []
    for answer in answers:
        if answer is None:
            labels.append(-1)
            continue
        for i, rep in enumerate(representatives):
            if answer == rep or grader.equivalent(rep, answer):
                labels.append(i)
                break
        else:
            representatives.append(answer)
            labels.append(len(representatives) - 1)
    return labels, representatives


def majority(labels: Sequence[int]) -> int:
    """The cluster with the most votes among ``labels`` (-1 when none answered); ties go to the first seen."""
    counts: dict[int, int] = {}
    for label in labels:
        if label >= 0:
            counts[label] = counts.get(label, 0) + 1
    best, most = -1, 0
    for label, count in counts.items():  # in first-seen order
        if count > most:
            best, most = label, count
    return best


def exact_stop(labels: Sequence[int]) -> int:
    """How many traces, drawn in this order, it takes until the leading answer cannot lose the vote of all."""
    n = len(labels)
    counts: dict[int, int] = {}
    for k, label in enumerate(labels, start=1):
        if label >= 0:
            counts[label] = counts.get(label, 0) + 1
        ranked = [*sorted(counts.values(), reverse=True), 0, 0]
        if ranked[0] > ranked[1] + (n - k):
            return k
    return n


def load_runs(bank_path: str, benchmark_name: str, data: str | None, limit: int | None) -> list[BankedRun]:
    bank = TraceBank(bank_path)
    try:
        problems = sorted(bank.problems(), key=lambda p: (p.position is None, p.position, p.problem_id))
        if limit is not None:
            problems = problems[:limit]
        upto = max((p.position for p in problems if p.position is not None), default=None)
        benchmark = load_benchmark(benchmark_name, data, None if upto is None else upto + 1)
        gold = {p.id: p.gold for p in benchmark.problems}
        extractor, grader = benchmark.extractor(), benchmark.make_grader()
        runs = []
        for problem in problems:
            samples = bank.samples(problem)
            answers = [extractor.extract(s.text) for s in samples]
            labels, reps = cluster(answers, grader)
            right = tuple(grader.grade_sync(rep, gold[problem.problem_id]).correct for rep in reps)
            tokens = tuple(len(s.token_ids) for s in samples)
            runs.append(BankedRun(problem.problem_id, problem.prompt_tokens, tuple(labels), right, tokens))
        grader.close()
        return runs
    finally:
        bank.close()


def analyse(runs: Sequence[BankedRun], orders: int, target: float, seed: int = 0) -> dict[str, object]:
    n = min(len(r.tokens) for r in runs)
    ks = sorted({*(2**i for i in range(n.bit_length()) if 2**i <= n), n})
    rng = random.Random(seed)
    sc_right = dict.fromkeys(ks, 0.0)
    sc_tokens = dict.fromkeys(ks, 0.0)
    exact_tokens = exact_shared = exact_traces = 0.0
    agreement = []
    for run in runs:
        full = majority(run.clusters[:n])
        agreement.append(sum(1 for c in run.clusters[:n] if c == full and c >= 0) / n)
        for _ in range(orders):
            order = rng.sample(range(n), n)
            labels = [run.clusters[i] for i in order]
            for k in ks:
                pick = majority(labels[:k])
                sc_right[k] += (pick >= 0 and run.correct[pick]) / orders
                sc_tokens[k] += (run.prompt_tokens + sum(run.tokens[i] for i in order[:k])) / orders
            stop = exact_stop(labels)
            exact_traces += stop / orders
            drawn = sum(run.tokens[i] for i in order[:stop])
            exact_tokens += (stop * run.prompt_tokens + drawn) / orders
            exact_shared += (run.prompt_tokens + drawn) / orders
    problems = len(runs)
    base = sc_tokens[n]
    affordable = [k for k in ks if sc_tokens[k] <= (1 - target) * base]
    k_at_target = max(affordable) if affordable else None
    return {
        "problems": problems,
        "n": n,
        "orders": orders,
        "sc": {k: {"accuracy": sc_right[k] / problems, "tokens": sc_tokens[k]} for k in ks},
        "exact_stop": {
            "traces_per_problem": exact_traces / problems,
            "tokens": exact_tokens,
            "token_reduction": 1 - exact_tokens / base,
            "tokens_prompt_once": exact_shared,
            "token_reduction_prompt_once": 1 - exact_shared / base,
        },
        "agreement_mean": statistics.fmean(agreement),
        "target": target,
        "k_at_target": k_at_target,
        "accuracy_at_target": None if k_at_target is None else sc_right[k_at_target] / problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank", help="a bank folder or chunk file (branchwise sample)")
    parser.add_argument("--benchmark", default="gsm8k")
    parser.add_argument("--data", help="benchmark file (default: $BRANCHWISE_BENCHMARKS/<standard name>)")
    parser.add_argument("--orders", type=int, default=200, help="random orders of each problem's traces")
    parser.add_argument("--target", type=float, default=0.6, help="token reduction to test against (fraction)")
    parser.add_argument("--limit", type=int, help="the first P banked problems only")
    parser.add_argument("--quick", action="store_true", help="10 problems, 20 orders")
    args = parser.parse_args()
    limit, orders = (10, 20) if args.quick else (args.limit, args.orders)
    started = time.perf_counter()
    runs = load_runs(args.bank, args.benchmark, args.data, limit)
    figures = analyse(runs, orders, args.target)
    figures["seconds"] = round(time.perf_counter() - started, 2)

    sc = figures["sc"]
    assert isinstance(sc, dict)
    n = figures["n"]
    base = sc[n]["tokens"]
    table = Table(title=f"{args.bank}: {figures['problems']} problems x {n} traces, {orders} orders")
    for column in ("rule", "accuracy", "tokens", "tokens vs SC@N"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for k, row in sc.items():
        table.add_row(f"SC@{k}", f"{row['accuracy']:.1%}", f"{row['tokens']:,.0f}", f"{row['tokens'] / base:.2f}")
    exact = figures["exact_stop"]
    assert isinstance(exact, dict)
    table.add_row(
        f"exact stop, 1 per request ({exact['traces_per_problem']:.1f} traces)",
        f"{sc[n]['accuracy']:.1%}",
        f"{exact['tokens']:,.0f}",
        f"{exact['tokens'] / base:.2f}",
    )
    table.add_row(
        "exact stop, prompt once (floor)",
        f"{sc[n]['accuracy']:.1%}",
        f"{exact['tokens_prompt_once']:,.0f}",
        f"{exact['tokens_prompt_once'] / base:.2f}",
    )
    Console().print(table)
    print(
        f"mean agreement with the SC@{n} answer: {figures['agreement_mean']:.1%}; "
        f"most traces within {1 - args.target:.0%} of SC@{n}'s tokens: k = {figures['k_at_target']}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
