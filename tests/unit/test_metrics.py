"""Metrics: Wilson intervals, unbiased pass@k, maj@k / weighted@k from one sample pool (checked against brute
force), summaries and paired comparisons."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from branchwise.errors import ConfigError
from branchwise.evals.metrics import (
    EXACT_SUBSETS,
    compare,
    default_ks,
    mcnemar_p,
    paired_difference_interval,
    pass_at_k,
    sample_curves,
    subset_vote_accuracy,
    summarize,
    wilson_interval,
)
from branchwise.evals.store import ResultRow


def test_wilson_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ConfigError):
        wilson_interval(3, 2)


def brute_pass(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
@settings(max_examples=60, deadline=None)
def test_pass_at_k_is_the_unbiased_estimator(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass(n, c, k))


def test_pass_at_k_bounds() -> None:
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 5, 1) == 1.0
    with pytest.raises(ConfigError):
        pass_at_k(3, 1, 4)


def cands(spec: str, confidences: list[float] | None = None) -> list[dict[str, Any]]:
    """'AABx' -> candidates in clusters A (right), B, C... (wrong); 'x' = no answer."""
    out = []
    for i, ch in enumerate(spec):
        cluster = None if ch == "x" else ord(ch) - ord("A")
        out.append(
            {
                "answer": None if ch == "x" else ch,
                "cluster": cluster,
                "correct": ch == "A",
                "confidence": None if confidences is None else confidences[i],
            }
        )
    return out


def brute_vote(candidates: list[dict[str, Any]], k: int, weighted: bool) -> float:
    total, count = 0.0, 0
    for subset in itertools.combinations(candidates, k):
        votes: dict[int, float] = {}
        for c in subset:
            if c["cluster"] is None:
                continue
            w = 1.0
            if weighted and c["confidence"] is not None:
                w = c["confidence"] if c["confidence"] > 0 else math.exp(c["confidence"])
            votes[c["cluster"]] = votes.get(c["cluster"], 0.0) + w
        count += 1
        if votes:
            top = max(votes.values())
            winners = [cl for cl, w in votes.items() if math.isclose(w, top)]
            total += sum(cl == 0 for cl in winners) / len(winners)
    return total / count


@pytest.mark.parametrize("spec", ["A", "AB", "AAB", "ABBx", "ABCD", "AABBBx", "xxxx", "AxBxCA"])
def test_majority_exact_matches_brute_force(spec: str) -> None:
    pool = cands(spec)
    for k in range(1, len(pool) + 1):
        assert subset_vote_accuracy(pool, k) == pytest.approx(brute_vote(pool, k, False)), (spec, k)


def test_maj_at_1_is_share_of_right_samples_and_ties_split() -> None:
    pool = cands("AABx")
    assert subset_vote_accuracy(pool, 1) == pytest.approx(2 / 4)
    assert subset_vote_accuracy(cands("AB"), 2) == pytest.approx(0.5)  # a tie: half credit
    assert subset_vote_accuracy(cands("xx"), 2) == 0.0


def test_weighted_votes_follow_confidence() -> None:
    pool = cands("ABB", confidences=[-0.01, -3.0, -3.0])  # one confident right vs two unsure wrong
    assert subset_vote_accuracy(pool, 3) == 0.0
    assert subset_vote_accuracy(pool, 3, weighted=True) == 1.0
    for k in (1, 2, 3):
        assert subset_vote_accuracy(pool, k, weighted=True) == pytest.approx(brute_vote(pool, k, True))


def test_large_pools_are_sampled_deterministically_and_close_to_exact() -> None:
    rng = random.Random(1)
    spec = "".join(rng.choice("AAABBCx") for _ in range(14))
    pool = cands(spec)
    k = 7
    assert math.comb(14, k) > EXACT_SUBSETS
    estimate = subset_vote_accuracy(pool, k, seed="p1")
    assert estimate == subset_vote_accuracy(pool, k, seed="p1")
    assert estimate == pytest.approx(brute_vote(pool, k, False), abs=0.06)


def row(pid: str, correct: bool, spec: str = "", *, level: str | None = None, run: int = 1, **kw: Any) -> ResultRow:
    base: dict[str, Any] = {
        "config_id": "c",
        "problem_id": pid,
        "level": level,
        "gold": ("A",),
        "answer": "A" if correct else "B",
        "correct": correct,
        "score": float(correct),
        "candidates": cands(spec),
        "votes": {},
        "usage": {"prompt_tokens": 10, "completion_tokens": 100, "aborted_tokens": 5, "calls": 2},
        "latency_s": 1.0,
        "started_at": 0.0,
        "finished_at": 1.0,
        "run_id": run,
    }
    base.update(kw)
    return ResultRow(**base)


def test_curves_from_one_pool() -> None:
    rows = [row("p1", True, "AAAB"), row("p2", False, "ABBB"), row("p3", True, "AA")]
    curves = sample_curves(rows)
    assert sorted(curves["pass@k"]) == [1, 2, 4]
    assert curves["count@k"] == {1: 3.0, 2: 3.0, 4: 2.0}
    assert curves["pass@k"][1] == pytest.approx((3 / 4 + 1 / 4 + 1) / 3)
    assert curves["maj@k"][4] == pytest.approx((1 + 0) / 2)
    assert curves["pass@k"][4] == pytest.approx(1.0)
    assert sample_curves([row("p", True)]) == {"pass@k": {}, "maj@k": {}, "weighted@k": {}, "count@k": {}}
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


def test_summarize() -> None:
    rows = [
        row("p1", True, "A", level="1", latency_s=1.0, started_at=0.0, finished_at=2.0),
        row("p2", False, "B", level="1", latency_s=2.0, started_at=0.5, finished_at=3.0),
        row("p3", True, "A", level="2", latency_s=3.0, started_at=10.0, finished_at=11.0, run=2),
        row("p4", False, "", level="2", latency_s=4.0, error="EngineTimeout: x", budget_exhausted=True, run=2,
            started_at=11.0, finished_at=14.0),
    ]  # fmt: skip
    m = summarize(rows)
    assert (m.n, m.correct, m.accuracy) == (4, 2, 0.5)
    assert m.ci == wilson_interval(2, 4)
    assert (m.prompt_tokens, m.completion_tokens, m.aborted_tokens, m.calls) == (40, 400, 20, 8)
    assert m.wall_time_s == pytest.approx(3.0 + 4.0)  # two invocations: 0..3 and 10..14
    assert m.tokens_per_s == pytest.approx(400 / 7) and m.problems_per_min == pytest.approx(60 * 4 / 7)
    assert m.latency_mean_s == 2.5 and m.latency_p50_s == 2.5 and m.latency_p90_s == pytest.approx(3.7)
    assert (m.errors, m.budget_exhausted) == (1, 1)
    assert m.samples_per_problem == 0.75
    assert list(m.by_level) == ["1", "2"] and m.by_level["2"].accuracy == 0.5 and m.by_level["1"].n == 2
    d = m.to_dict()
    assert d["curves"]["pass@k"]["1"] == pytest.approx(2 / 3) and d["by_level"]["1"]["ci"] == list(m.by_level["1"].ci)


def test_mcnemar() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p(3, 7) == mcnemar_p(7, 3)
    assert mcnemar_p(5, 5) == 1.0


def test_compare_pairs_shared_problems() -> None:
    a = [row(f"p{i}", i < 15) for i in range(20)]
    b = [row(f"p{i}", i < 5) for i in range(18)] + [row("extra", True)]
    c = compare(a, b)
    assert c.shared == 18
    assert c.a_only_right == 10 and c.b_only_right == 0
    assert c.diff == pytest.approx(10 / 18) and c.ci[0] > 0 and c.significant
    assert c.accuracy_a == pytest.approx(15 / 18) and c.accuracy_b == pytest.approx(5 / 18)
    assert c.ci == paired_difference_interval(5, 10, 0, 3)
    same = compare(a, a)
    assert same.diff == 0 and same.p_value == 1.0 and not same.significant
    # No discordant problem is not proof of equality: the interval still has width.
    assert same.ci[0] < -0.1 and same.ci[1] > 0.1
    with pytest.raises(ConfigError, match="share no problem"):
        compare(a, [row("zzz", True)])


def test_paired_interval_matches_wald_for_large_tables() -> None:
    both, a_only, b_only, neither = 4000, 1500, 1000, 3500
    m = both + a_only + b_only + neither
    diffs = [1] * a_only + [-1] * b_only + [0] * (both + neither)
    mean = (a_only - b_only) / m
    half = 1.959963984540054 * statistics.stdev(diffs) / math.sqrt(m)
    lo, hi = paired_difference_interval(both, a_only, b_only, neither)
    assert lo == pytest.approx(mean - half, abs=2e-3) and hi == pytest.approx(mean + half, abs=2e-3)


@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30), st.integers(0, 30))
def test_paired_interval_properties(both: int, a_only: int, b_only: int, neither: int) -> None:
    assume(both + a_only + b_only + neither > 0)
    lo, hi = paired_difference_interval(both, a_only, b_only, neither)
    diff = (a_only - b_only) / (both + a_only + b_only + neither)
    assert -1.0 <= lo <= diff <= hi <= 1.0 and lo < hi
    swapped = paired_difference_interval(both, b_only, a_only, neither)
    assert swapped == pytest.approx((-hi, -lo))


def test_paired_interval_rejects_bad_tables() -> None:
    with pytest.raises(ConfigError, match="all zero"):
        paired_difference_interval(0, 0, 0, 0)
    with pytest.raises(ConfigError, match=">= 0"):
        paired_difference_interval(1, -1, 0, 0)


def test_comparison_times_and_speedup_on_the_shared_problems() -> None:
    a = [row("p1", True, latency_s=1.0), row("p2", True, latency_s=2.0), row("p9", True, latency_s=50.0)]
    b = [row("p1", True, latency_s=4.0), row("p2", False, latency_s=5.0)]
    c = compare(a, b)
    assert (c.latency_a, c.latency_b) == (3.0, 9.0)  # p9 is not shared
    assert c.speedup == 3.0
    untimed = compare([row("p1", True, latency_s=0.0)], [row("p1", True, latency_s=1.0)])
    assert math.isnan(untimed.speedup)
