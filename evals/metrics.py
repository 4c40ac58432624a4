"""Metrics over stored results: accuracy with confidence intervals, sample-reuse curves, costs, comparisons.

Sample reuse: a configuration that draws N samples per problem stores all N candidates, each graded, with the
answer cluster it belongs to (answers the grader deems equivalent share a cluster). Curves for every k <= N
then come from that one pool, without running again:

- ``pass@k``: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for a problem with n
  samples of which c are right: the probability that a random k-subset holds a right answer. Exact.
- ``maj@k``: the probability that a majority vote over a random k-subset picks a right cluster. Samples with no
  answer vote for nothing; a tie among the top clusters earns the share of right clusters among them (a random
  tie-break); a subset with no votes is wrong.
- ``weighted@k``: the same with each vote weighted by its trace confidence (a mean logprob c <= 0 counts as
  exp(c); a missing confidence as 1).

maj@k and weighted@k are averaged over all C(n, k) subsets when there are at most `EXACT_SUBSETS` of them, and
otherwise over `SAMPLED_SUBSETS` random subsets drawn with a generator seeded by the problem id and k, so the
figures are deterministic. A problem contributes to the curve at k only if it has at least k samples.

Accuracy intervals are Wilson score intervals (95%); a comparison of two runs on their shared problems reports
the paired difference with Newcombe's (1998) hybrid score interval for paired proportions (method 10: the two
marginal Wilson intervals combined with a continuity-corrected correlation; unlike a normal approximation on the
per-problem differences it does not shrink to a point when no problem is discordant) and McNemar's exact test on
the discordant pairs.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .store import ResultRow

__all__ = [
    "EXACT_SUBSETS",
    "SAMPLED_SUBSETS",
    "Comparison",
    "ConfigMetrics",
    "LevelStats",
    "compare",
    "default_ks",
    "mcnemar_p",
    "paired_difference_interval",
    "pass_at_k",
    "sample_curves",
    "subset_vote_accuracy",
    "summarize",
    "wilson_interval",
]

EXACT_SUBSETS = 400
"""maj@k / weighted@k enumerate every k-subset when there are at most this many."""
SAMPLED_SUBSETS = 400
"""Otherwise they average over this many random k-subsets (seeded per problem and k)."""

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ConfigError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; say so rather than leave rounding noise.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: the chance that k of the n samples, drawn without replacement, include a right one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _vote_weight(candidate: Mapping[str, Any], weighted: bool) -> float:
    if not weighted:
        return 1.0
    confidence = candidate.get("confidence")
    if confidence is None or (isinstance(confidence, float) and math.isnan(confidence)):
        return 1.0
    value = float(confidence)
    return value if value > 0 else math.exp(value)


def _subset_credit(members: Sequence[tuple[int | None, float]], cluster_right: Mapping[int, bool]) -> float:
    votes: dict[int, float] = defaultdict(float)
    for cluster, weight in members:
        if cluster is not None:
            votes[cluster] += weight
    if not votes:
        return 0.0
    top = max(votes.values())
    winners = [c for c, w in votes.items() if math.isclose(w, top, rel_tol=1e-12, abs_tol=1e-12)]
    return sum(cluster_right.get(c, False) for c in winners) / len(winners)


def subset_vote_accuracy(
    candidates: Sequence[Mapping[str, Any]], k: int, *, weighted: bool = False, seed: str = ""
) -> float:
    """Expected correctness of a vote over a random k-subset of one problem's candidates (maj@k / weighted@k).

    Args:
        candidates: dicts with ``cluster`` (int or None for no answer), ``correct`` and optional ``confidence``.
            A cluster is right when its first member is right.
        k: subset size, 1 <= k <= len(candidates).
        weighted: weight votes by confidence (weighted@k) instead of counting them (maj@k).
        seed: seeds the random subsets when they are sampled (use the problem id).
    """
    n = len(candidates)
    if not 1 <= k <= n:
        raise ConfigError(f"k must be in 1..{n}, got {k}")
    cluster_right: dict[int, bool] = {}
    members: list[tuple[int | None, float]] = []
    for cand in candidates:
        cluster = cand.get("cluster")
        if cluster is not None:
            cluster = int(cluster)
            cluster_right.setdefault(cluster, bool(cand.get("correct")))
        members.append((cluster, _vote_weight(cand, weighted)))
    if not cluster_right:
        return 0.0
    if math.comb(n, k) <= EXACT_SUBSETS:
        subsets: Iterable[Sequence[int]] = itertools.combinations(range(n), k)
        count = math.comb(n, k)
    else:
        rng = random.Random(zlib.crc32(f"{seed}/{k}/{int(weighted)}".encode()))
        subsets = (rng.sample(range(n), k) for _ in range(SAMPLED_SUBSETS))
        count = SAMPLED_SUBSETS
    total = sum(_subset_credit([members[i] for i in subset], cluster_right) for subset in subsets)
    return total / count


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, and ``n`` itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def sample_curves(rows: Sequence[ResultRow], ks: Sequence[int] | None = None) -> dict[str, dict[int, float]]:
    """pass@k, maj@k and weighted@k for each k, from the candidate pools of ``rows``.

    ``ks`` default to `default_ks` of the largest pool. Each point averages the problems with at least k
    samples (``count@k`` gives how many).
    """
    pools = [r.candidates for r in rows if r.candidates]
    if not pools:
        return {"pass@k": {}, "maj@k": {}, "weighted@k": {}, "count@k": {}}
    largest = max(len(p) for p in pools)
    ks = sorted(set(ks)) if ks is not None else default_ks(largest)
    out: dict[str, dict[int, float]] = {"pass@k": {}, "maj@k": {}, "weighted@k": {}, "count@k": {}}
    for k in ks:
        eligible = [(r, r.candidates) for r in rows if len(r.candidates) >= k]
        if not eligible or k < 1:
            continue
        passes = [pass_at_k(len(c), sum(bool(x.get("correct")) for x in c), k) for _, c in eligible]
        majority = [subset_vote_accuracy(c, k, seed=r.problem_id) for r, c in eligible]
        weighted = [subset_vote_accuracy(c, k, weighted=True, seed=r.problem_id) for r, c in eligible]
        out["pass@k"][k] = statistics.fmean(passes)
        out["maj@k"][k] = statistics.fmean(majority)
        out["weighted@k"][k] = statistics.fmean(weighted)
        out["count@k"][k] = float(len(eligible))
    return out


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LevelStats:
    """Accuracy on the problems of one difficulty level."""

    level: str
    n: int
    correct: int
    accuracy: float
    ci: tuple[float, float]
    mean_completion_tokens: float


@dataclass(frozen=True)
class ConfigMetrics:
    """Everything a report shows about one configuration.

    Attributes:
        n: problems with a result.
        correct: problems answered right.
        accuracy: correct / n; ``ci``: its 95% Wilson interval.
        prompt_tokens, completion_tokens, aborted_tokens, calls: totals over the problems.
        mean_completion_tokens: per problem.
        wall_time_s: time the configuration's problems took, summed over invocations (start of the first
            problem to end of the last, per invocation; concurrent problems overlap).
        latency_mean_s, latency_p50_s, latency_p90_s: per-problem latency.
        tokens_per_s: completion tokens per second of wall time.
        problems_per_min: problems per minute of wall time.
        budget_exhausted: problems cut short by a budget cap; ``errors``: problems that failed.
        samples_per_problem: mean candidates per problem.
        by_level: accuracy per difficulty level (empty when the set has none).
        curves: `sample_curves`.
    """

    n: int
    correct: int
    accuracy: float
    ci: tuple[float, float]
    prompt_tokens: int
    completion_tokens: int
    aborted_tokens: int
    calls: int
    mean_completion_tokens: float
    wall_time_s: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p90_s: float
    tokens_per_s: float
    problems_per_min: float
    budget_exhausted: int
    errors: int
    samples_per_problem: float
    by_level: dict[str, LevelStats] = field(default_factory=dict)
    curves: dict[str, dict[int, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("by_level", "curves")}
        out["ci"] = list(self.ci)
        out["by_level"] = {k: {**v.__dict__, "ci": list(v.ci)} for k, v in self.by_level.items()}
        out["curves"] = {name: {str(k): v for k, v in points.items()} for name, points in self.curves.items()}
        return out


def _level_key(level: str) -> tuple[int, float, str]:
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def summarize(rows: Sequence[ResultRow], *, ks: Sequence[int] | None = None, curves: bool = True) -> ConfigMetrics:
    """The metrics of one configuration's rows."""
    n = len(rows)
    correct = sum(r.correct for r in rows)
    completion = sum(r.usage_int("completion_tokens") for r in rows)
    spans: dict[int | None, tuple[float, float]] = {}
    for r in rows:
        lo, hi = spans.get(r.run_id, (math.inf, -math.inf))
        spans[r.run_id] = (min(lo, r.started_at), max(hi, r.finished_at))
    wall = sum(max(0.0, hi - lo) for lo, hi in spans.values())
    latencies = [r.latency_s for r in rows]
    by_level: dict[str, LevelStats] = {}
    grouped: dict[str, list[ResultRow]] = defaultdict(list)
    for r in rows:
        if r.level is not None:
            grouped[r.level].append(r)
    for level in sorted(grouped, key=_level_key):
        group = grouped[level]
        right = sum(r.correct for r in group)
        by_level[level] = LevelStats(
            level,
            len(group),
            right,
            right / len(group),
            wilson_interval(right, len(group)),
            statistics.fmean(r.usage_int("completion_tokens") for r in group),
        )
    return ConfigMetrics(
        n=n,
        correct=correct,
        accuracy=correct / n if n else math.nan,
        ci=wilson_interval(correct, n),
        prompt_tokens=sum(r.usage_int("prompt_tokens") for r in rows),
        completion_tokens=completion,
        aborted_tokens=sum(r.usage_int("aborted_tokens") for r in rows),
        calls=sum(r.usage_int("calls") for r in rows),
        mean_completion_tokens=completion / n if n else math.nan,
        wall_time_s=wall,
        latency_mean_s=statistics.fmean(latencies) if latencies else math.nan,
        latency_p50_s=_quantile(latencies, 0.5),
        latency_p90_s=_quantile(latencies, 0.9),
        tokens_per_s=completion / wall if wall > 0 else math.nan,
        problems_per_min=60 * n / wall if wall > 0 else math.nan,
        budget_exhausted=sum(r.budget_exhausted for r in rows),
        errors=sum(r.error is not None for r in rows),
        samples_per_problem=statistics.fmean(len(r.candidates) for r in rows) if rows else math.nan,
        by_level=by_level,
        curves=sample_curves(rows, ks) if curves else {},
    )


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (binomial test at p = 1/2)."""
    if b < 0 or c < 0:
        raise ConfigError("discordant counts must be >= 0")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / float(2**m)
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Comparison:
    """Run A versus run B on the problems both answered.

    Attributes:
        shared: number of shared problems.
        accuracy_a, accuracy_b: accuracies on the shared problems.
        diff: accuracy_a - accuracy_b; ``ci``: its 95% interval (paired).
        a_only_right, b_only_right: discordant pairs (A right and B wrong; the reverse).
        p_value: McNemar's exact two-sided p-value.
        significant: p_value < 0.05.
        tokens_a, tokens_b: completion tokens on the shared problems.
        total_tokens_a, total_tokens_b: prompt plus completion tokens on the shared problems (every prompt a
            strategy sent counts, re-sent ones included).
        latency_a, latency_b: summed per-problem latency on the shared problems, in seconds (modelled seconds
            for a paced replay, see `branchwise.evals.runner.EvalConfig.time_scale`).
    """

    shared: int
    accuracy_a: float
    accuracy_b: float
    diff: float
    ci: tuple[float, float]
    a_only_right: int
    b_only_right: int
    p_value: float
    significant: bool
    tokens_a: int
    tokens_b: int
    total_tokens_a: int = 0
    total_tokens_b: int = 0
    latency_a: float = 0.0
    latency_b: float = 0.0

    @property
    def token_reduction(self) -> float:
        """``1 - total_tokens_a / total_tokens_b``: the share of B's tokens that A did without (0 when B spent none)."""
        return 1 - self.total_tokens_a / self.total_tokens_b if self.total_tokens_b else 0.0

    @property
    def speedup(self) -> float:
        """``latency_b / latency_a``: how many times faster A answered the shared problems (nan without timings)."""
        return self.latency_b / self.latency_a if self.latency_a > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ci": list(self.ci)}


def paired_difference_interval(
    both: int, a_only: int, b_only: int, neither: int, z: float = Z95
) -> tuple[float, float]:
    """95% interval of accuracy(A) - accuracy(B) from the paired 2x2 table (Newcombe 1998, method 10).

    Args:
        both: problems both got right; a_only, b_only: the discordant problems; neither: both got wrong.

    Raises:
        ConfigError: a count is negative or the table is empty.
    """
    counts = (both, a_only, b_only, neither)
    if min(counts) < 0:
        raise ConfigError(f"paired counts must be >= 0, got {counts}")
    m = sum(counts)
    if m == 0:
        raise ConfigError("paired counts are all zero: no problem to compare")
    p_a, p_b = (both + a_only) / m, (both + b_only) / m
    lo_a, hi_a = wilson_interval(both + a_only, m, z)
    lo_b, hi_b = wilson_interval(both + b_only, m, z)
    # The correlation of the two outcomes, its numerator shrunk towards 0 by m/2 when positive (continuity).
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    cross = both * neither - a_only * b_only
    corrected = max(cross - m / 2, 0.0) if cross > 0 else float(cross)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    diff = p_a - p_b
    lower = diff - math.sqrt(max(0.0, (p_a - lo_a) ** 2 - 2 * phi * (p_a - lo_a) * (hi_b - p_b) + (hi_b - p_b) ** 2))
    upper = diff + math.sqrt(max(0.0, (p_b - lo_b) ** 2 - 2 * phi * (p_b - lo_b) * (hi_a - p_a) + (hi_a - p_a) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def compare(rows_a: Sequence[ResultRow], rows_b: Sequence[ResultRow]) -> Comparison:
    """Compare two configurations on their shared problems (paired by problem id).

    Raises:
        ConfigError: they share no problem.
    """
    by_id_b = {r.problem_id: r for r in rows_b}
    pairs = [(a, by_id_b[a.problem_id]) for a in rows_a if a.problem_id in by_id_b]
    if not pairs:
        raise ConfigError("the two runs share no problem: nothing to compare")
    m = len(pairs)
    both = sum(1 for a, b in pairs if a.correct and b.correct)
    only_a = sum(1 for a, b in pairs if a.correct and not b.correct)
    only_b = sum(1 for a, b in pairs if b.correct and not a.correct)
    p = mcnemar_p(only_a, only_b)
    return Comparison(
        shared=m,
        accuracy_a=(both + only_a) / m,
        accuracy_b=(both + only_b) / m,
        diff=(only_a - only_b) / m,
        ci=paired_difference_interval(both, only_a, only_b, m - both - only_a - only_b),
        a_only_right=only_a,
        b_only_right=only_b,
        p_value=p,
        significant=p < 0.05,
        tokens_a=sum(a.usage_int("completion_tokens") for a, _ in pairs),
        tokens_b=sum(b.usage_int("completion_tokens") for _, b in pairs),
        latency_a=math.fsum(a.latency_s for a, _ in pairs),
        latency_b=math.fsum(b.latency_s for _, b in pairs),
        total_tokens_a=sum(a.usage_int("completion_tokens") + a.usage_int("prompt_tokens") for a, _ in pairs),
        total_tokens_b=sum(b.usage_int("completion_tokens") + b.usage_int("prompt_tokens") for _, b in pairs),
    )
