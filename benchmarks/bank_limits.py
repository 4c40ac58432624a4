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
- **confidence-weighted SC@k**: the same first k traces, each vote weighted by its trace confidence (DeepConf's
  lowest group confidence over ``--window`` tokens, from the banked top-k logprobs): whether a better vote than
  the plain majority lets fewer traces match SC@N.
- **a perfect selector over k traces** (pass@k in that order): right when any of the first k traces is right. No
  verifier, reward model or vote over those k traces can do better, and its own tokens are not counted, so it is
  the ceiling of every selector that spends k traces.
- **paired against SC@N**: each random order, taken across all problems, is one run of the rule; for each run the
  accuracy difference to SC@N (in banked order) and its 95% paired interval (the harness's Newcombe interval).
  Reported: the mean difference, the median interval, and the share of runs whose interval lies above
  ``-margin`` (the evidence issue's criterion: -2 points on the 0.5B).
- **agreement**: the share of a problem's traces that give its SC@N answer (in banked order), averaged over
  problems.

A token reduction target (``--target``, default 0.6) is then put against the data: the largest k whose SC@k
costs at most (1 - target) of SC@N's tokens, and that k's expected accuracy next to SC@N's.

    python benchmarks/bank_limits.py BANK --benchmark gsm8k [--data PATH] [--orders 200] [--target 0.6]
        [--margin 0.02] [--window 32] [--ks 4,5,6,8] [--limit P]

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

from branchwise.engine.tracebank import BankedSample, TraceBank
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.metrics import paired_difference_interval
from branchwise.verifiers.confidence import LOGPROB_FLOOR, ConfidenceTracker
from branchwise.verifiers.grader_base import BaseGrader


@dataclass(frozen=True)
class BankedRun:
    """One problem's traces as the analysis needs them: answer cluster, correctness and tokens per trace."""

    problem_id: str
    prompt_tokens: int
    clusters: tuple[int, ...]  # per trace: the index of its answer's cluster (-1: no answer)
    correct: tuple[bool, ...]  # per cluster: whether that answer is right
    tokens: tuple[int, ...]  # per trace
    confidence: tuple[float, ...] = ()  # per trace: its DeepConf confidence (empty: drawn without logprobs)


def sample_confidence(sample: BankedSample, window: int) -> float | None:
    """A banked trace's lowest group confidence (DeepConf), from its top-k means; None without logprobs."""
    if not sample.logprobs:
        return None
    tracker = ConfidenceTracker(window=window)
    for logprob, top_mean, count in zip(sample.logprobs, sample.top_mean, sample.top_counts, strict=True):
        # the token confidence of `token_confidence`: minus the top-k mean when there are >= 2 alternatives
        tracker.push(-top_mean if count >= 2 else max(logprob, LOGPROB_FLOOR), logprob)
    return tracker.lowest_group_confidence


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


def majority(labels: Sequence[int], weights: Sequence[float] | None = None) -> int:
    """The cluster with the most votes among ``labels`` (-1 when none answered); ties go to the first seen.

    With ``weights``, each label's vote counts its weight (a trace confidence) instead of 1.
    """
    counts: dict[int, float] = {}
    for i, label in enumerate(labels):
        if label >= 0:
            counts[label] = counts.get(label, 0) + (1 if weights is None else weights[i])
    best, most = -1, 0.0
    for label, count in counts.items():  # in first-seen order
        if best < 0 or count > most:
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


def load_runs(
    bank_path: str, benchmark_name: str, data: str | None, limit: int | None, window: int = 32
) -> list[BankedRun]:
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
            confidences = [sample_confidence(s, window) for s in samples]
            confidence = () if None in confidences else tuple(c for c in confidences if c is not None)
            runs.append(BankedRun(problem.problem_id, problem.prompt_tokens, tuple(labels), right, tokens, confidence))
        grader.close()
        return runs
    finally:
        bank.close()


def _paired(tables: Sequence[Sequence[int]], margin: float) -> dict[str, float]:
    """Summary of one rule's runs against SC@N: each table is (both, rule only, SC@N only, neither) right."""
    intervals = sorted(paired_difference_interval(*table) for table in tables)
    problems = sum(tables[0])
    return {
        "accuracy_diff": statistics.fmean((t[1] - t[2]) / problems for t in tables),
        "ci_low_median": statistics.median(lo for lo, _ in intervals),
        "ci_high_median": statistics.median(hi for _, hi in intervals),
        "share_above_margin": sum(lo > -margin for lo, _ in intervals) / len(intervals),
    }


def analyse(
    runs: Sequence[BankedRun],
    orders: int,
    target: float,
    seed: int = 0,
    margin: float = 0.02,
    ks: Sequence[int] | None = None,
) -> dict[str, object]:
    """The figures of the module docstring; ``ks``: the vote sizes (default 1, 2, 4, ..., N; N is always added)."""
    n = min(len(r.tokens) for r in runs)
    if ks is not None and not all(1 <= k <= n for k in ks):
        raise ValueError(f"every k must be between 1 and {n}, the traces of each problem: got {list(ks)}")
    ks = sorted({*(ks if ks is not None else (2**i for i in range(n.bit_length()) if 2**i <= n)), n})
    weighted = all(r.confidence for r in runs)
    kinds = ("sc", "oracle", "weighted") if weighted else ("sc", "oracle")
    rules = [(kind, k) for kind in kinds for k in ks]
    rng = random.Random(seed)
    right = dict.fromkeys(rules, 0.0)
    sc_tokens = dict.fromkeys(ks, 0.0)
    # per rule and order: the paired table (both, rule only, SC@N only, neither) against SC@N in banked order
    tables = {rule: [[0, 0, 0, 0] for _ in range(orders)] for rule in rules}
    exact_tokens = exact_shared = exact_traces = 0.0
    agreement = []
    for run in runs:
        full = majority(run.clusters[:n])
        full_right = full >= 0 and run.correct[full]
        agreement.append(sum(1 for c in run.clusters[:n] if c == full and c >= 0) / n)
        for o in range(orders):
            order = rng.sample(range(n), n)
            labels = [run.clusters[i] for i in order]
            weights = [run.confidence[i] for i in order] if weighted else None
            for kind, k in rules:
                if kind == "oracle":
                    ok = any(c >= 0 and run.correct[c] for c in labels[:k])
                else:
                    pick = majority(labels[:k], weights[:k] if kind == "weighted" and weights else None)
                    ok = pick >= 0 and run.correct[pick]
                right[kind, k] += ok / orders
                tables[kind, k][o][(not ok) * 2 + (not full_right)] += 1
            for k in ks:
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

    def summary(kind: str) -> dict[int, dict[str, float]]:
        return {
            k: {"accuracy": right[kind, k] / problems, "tokens": sc_tokens[k]} | _paired(tables[kind, k], margin)
            for k in ks
        }

    return {
        "problems": problems,
        "n": n,
        "orders": orders,
        "margin": margin,
        "sc": summary("sc"),
        "weighted": summary("weighted") if weighted else None,
        "oracle": summary("oracle"),
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
        "accuracy_at_target": None if k_at_target is None else right["sc", k_at_target] / problems,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank", help="a bank folder or chunk file (branchwise sample)")
    parser.add_argument("--benchmark", default="gsm8k")
    parser.add_argument("--data", help="benchmark file (default: $BRANCHWISE_BENCHMARKS/<standard name>)")
    parser.add_argument("--orders", type=int, default=200, help="random orders of each problem's traces")
    parser.add_argument("--target", type=float, default=0.6, help="token reduction to test against (fraction)")
    parser.add_argument("--margin", type=float, default=0.02, help="accuracy loss the paired interval may reach")
    parser.add_argument("--window", type=int, default=32, help="group-confidence window of the weighted vote")
    parser.add_argument("--ks", help="vote sizes to report, e.g. 4,5,6,8 (default 1,2,4,...,N)")
    parser.add_argument("--limit", type=int, help="the first P banked problems only")
    parser.add_argument("--quick", action="store_true", help="10 problems, 20 orders")
    args = parser.parse_args()
    limit, orders = (10, 20) if args.quick else (args.limit, args.orders)
    started = time.perf_counter()
    runs = load_runs(args.bank, args.benchmark, args.data, limit, args.window)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    figures = analyse(runs, orders, args.target, margin=args.margin, ks=ks)
    figures["seconds"] = round(time.perf_counter() - started, 2)

    n = figures["n"]
    sc = figures["sc"]
    assert isinstance(sc, dict)
    base = sc[n]["tokens"]
    table = Table(title=f"{args.bank}: {figures['problems']} problems x {n} traces, {orders} orders")
    for column in ("rule", "accuracy", "tokens", "tokens vs SC@N", "diff vs SC@N (median interval)", "runs above"):
        table.add_column(column, justify="left" if column == "rule" else "right")
    for kind, label in (
        ("sc", "SC@{}"),
        ("weighted", "SC@{} weighted"),
        ("oracle", "any of {} right (selector ceiling)"),
    ):
        rows = figures[kind] or {}
        assert isinstance(rows, dict)
        for k, row in rows.items():
            table.add_row(
                label.format(k),
                f"{row['accuracy']:.1%}",
                f"{row['tokens']:,.0f}",
                f"{row['tokens'] / base:.2f}",
                f"{row['accuracy_diff']:+.1%} [{row['ci_low_median']:+.1%}, {row['ci_high_median']:+.1%}]",
                f"{row['share_above_margin']:.0%}",
            )
    exact = figures["exact_stop"]
    assert isinstance(exact, dict)
    for label, tokens in (
        (f"exact stop, 1 per request ({exact['traces_per_problem']:.1f} traces)", exact["tokens"]),
        ("exact stop, prompt once (floor)", exact["tokens_prompt_once"]),
    ):
        table.add_row(label, f"{sc[n]['accuracy']:.1%}", f"{tokens:,.0f}", f"{tokens / base:.2f}", "+0.0% (same)", "")
    Console(width=160).print(table)
    print(
        f"mean agreement with the SC@{n} answer: {figures['agreement_mean']:.1%}; "
        f"most traces within {1 - args.target:.0%} of SC@{n}'s tokens: k = {figures['k_at_target']}; "
        f"'runs above': share of runs whose paired 95% interval lies above -{args.margin:.0%}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
