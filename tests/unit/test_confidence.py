"""DeepConf confidences: token confidence, sliding-window groups, trace measures, incremental == naive."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from branchwise.engine.types import TokenLogprob
from branchwise.errors import ConfigError
from branchwise.verifiers import LOGPROB_FLOOR, ConfidenceTracker, token_confidence, trace_confidence


def tok(logprob: float, *top: float) -> TokenLogprob:
    return TokenLogprob(0, "t", logprob, tuple((f"t{i}", lp) for i, lp in enumerate(top)))


def tokens_with_confidences(values: list[float]) -> list[TokenLogprob]:
    """Tokens whose DeepConf confidence is exactly ``values[i]`` (two alternatives, both at -value)."""
    return [tok(-0.5, -v, -v) for v in values]


# -- token confidence ----------------------------------------------------------------------------------


def test_token_confidence_is_minus_mean_of_top_k() -> None:
    assert token_confidence(tok(-0.1, -0.1, -3.0)) == pytest.approx(1.55)
    assert token_confidence(tok(-0.2, -0.2, -2.0, -4.0, -5.8)) == pytest.approx(3.0)


def test_token_confidence_without_alternatives_uses_the_sampled_logprob() -> None:
    # -log p would rank a sure token (p ~ 1) as least confident, so the sampled logprob is used instead
    assert token_confidence(tok(-0.25)) == -0.25
    assert token_confidence(tok(-0.25, -0.01)) == -0.25  # k = 1 inverts the DeepConf formula too
    assert token_confidence(tok(-0.01)) > token_confidence(tok(-2.0))


def test_impossible_logprobs_are_clamped() -> None:
    assert token_confidence(tok(-math.inf)) == LOGPROB_FLOOR
    assert token_confidence(tok(-0.1, -0.1, -math.inf)) == pytest.approx((0.1 - LOGPROB_FLOOR) / 2)
    assert token_confidence(tok(math.nan)) == LOGPROB_FLOOR


def test_higher_means_more_confident() -> None:
    peaked = [tok(-0.01, -0.01, -9.0, -10.0) for _ in range(8)]
    flat = [tok(-1.1, -1.0, -1.1, -1.2) for _ in range(8)]
    for metric in ("mean", "tail", "lowest_group", "bottom_group"):
        sure = trace_confidence(peaked, metric, window=4, tail=4)
        unsure = trace_confidence(flat, metric, window=4, tail=4)
        assert sure is not None and unsure is not None
        assert sure > unsure, metric


# -- tracker -------------------------------------------------------------------------------------------


def test_tracker_on_a_worked_example() -> None:
    tracker = ConfidenceTracker(window=2, tail=3, bottom_fraction=0.34)
    tracker.update(tokens_with_confidences([1.0, 3.0]))
    assert tracker.group_confidences == pytest.approx((2.0,))
    tracker.update(tokens_with_confidences([2.0, 6.0]))
    assert tracker.num_tokens == 4
    assert tracker.group_confidences == pytest.approx((2.0, 2.5, 4.0))
    assert tracker.current_group_confidence == pytest.approx(4.0)
    assert tracker.lowest_group_confidence == pytest.approx(2.0)
    assert tracker.bottom_group_confidence == pytest.approx(2.0)  # lowest 1 of 3 windows
    assert tracker.tail_confidence == pytest.approx((3.0 + 2.0 + 6.0) / 3)
    assert tracker.mean_logprob == pytest.approx(-0.5)
    everything = ConfidenceTracker(window=2, bottom_fraction=1.0)
    everything.update(tokens_with_confidences([1.0, 3.0, 2.0, 6.0]))
    assert everything.bottom_group_confidence == pytest.approx((2.0 + 2.5 + 4.0) / 3)


def test_tracker_shorter_than_window_uses_mean_over_all() -> None:
    tracker = ConfidenceTracker(window=10)
    tracker.update(tokens_with_confidences([1.0, 2.0, 6.0]))
    assert tracker.group_confidences == ()
    assert tracker.current_group_confidence == pytest.approx(3.0)
    assert tracker.lowest_group_confidence == pytest.approx(3.0)
    assert tracker.bottom_group_confidence == pytest.approx(3.0)


def test_empty_tracker_reports_none() -> None:
    tracker = ConfidenceTracker()
    tracker.update([])
    assert tracker.num_tokens == 0
    for metric in ("mean", "tail", "lowest_group", "bottom_group"):
        assert tracker.value(metric) is None
    assert tracker.current_group_confidence is None
    assert trace_confidence([], "mean") is None


def test_lowest_group_catches_a_local_dip() -> None:
    # a confident trace with one shaky stretch: the mean hides it, the lowest window exposes it
    values = [8.0] * 20 + [0.5] * 4 + [8.0] * 20
    tracker = ConfidenceTracker(window=4, tail=4)
    tracker.update(tokens_with_confidences(values))
    assert tracker.lowest_group_confidence == pytest.approx(0.5)
    assert tracker.tail_confidence == pytest.approx(8.0)
    assert tracker.current_group_confidence == pytest.approx(8.0)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ConfigError):
        ConfidenceTracker(window=0)
    with pytest.raises(ConfigError):
        ConfidenceTracker(tail=0)
    with pytest.raises(ConfigError):
        ConfidenceTracker(bottom_fraction=0.0)
    with pytest.raises(ConfigError):
        ConfidenceTracker(window=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        trace_confidence([tok(-1.0)], "median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ConfidenceTracker().value("median")  # type: ignore[arg-type]


def test_running_sums_do_not_drift_on_long_traces() -> None:
    rng = random.Random(7)
    window = 64
    tracker = ConfidenceTracker(window=window, tail=100)
    values = [rng.uniform(0.0, 1e4) if i % 1000 == 0 else rng.uniform(0.0, 1.0) for i in range(60_000)]
    for v in values:
        tracker.push(v, -0.5)
    assert tracker.current_group_confidence == pytest.approx(math.fsum(values[-window:]) / window, rel=1e-12)
    assert tracker.tail_confidence == pytest.approx(math.fsum(values[-100:]) / 100, rel=1e-12)
    assert len(tracker.group_confidences) == len(values) - window + 1


# -- incremental == naive ------------------------------------------------------------------------------


def naive_token_confidence(t: TokenLogprob) -> float:
    def clamp(x: float) -> float:
        return max(x, LOGPROB_FLOOR) if not math.isnan(x) else LOGPROB_FLOOR

    if len(t.top) >= 2:
        return -sum(clamp(lp) for _, lp in t.top) / len(t.top)
    return clamp(t.logprob)


def naive_measures(tokens: list[TokenLogprob], window: int, tail: int, fraction: float) -> dict[str, float]:
    conf = [naive_token_confidence(t) for t in tokens]
    groups = [statistics.fmean(conf[i - window + 1 : i + 1]) for i in range(window - 1, len(conf))]
    overall = statistics.fmean(conf)
    bottom = sorted(groups)[: max(1, int(len(groups) * fraction))]
    return {
        "current": statistics.fmean(conf[-window:]),
        "lowest_group": min(groups) if groups else overall,
        "bottom_group": statistics.fmean(bottom) if groups else overall,
        "tail": statistics.fmean(conf[-tail:]),
        "mean": statistics.fmean(max(t.logprob, LOGPROB_FLOOR) for t in tokens),
    }


logprob = st.floats(min_value=-30.0, max_value=0.0, allow_nan=False)
token = st.builds(
    lambda lp, top: TokenLogprob(1, "x", lp, tuple(("y", v) for v in top)),
    logprob,
    st.one_of(st.just([]), st.lists(logprob, min_size=1, max_size=6)),
)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(token, min_size=1, max_size=60),
    window=st.integers(min_value=1, max_value=12),
    tail=st.integers(min_value=1, max_value=12),
    fraction=st.floats(min_value=0.01, max_value=1.0),
    chunk_seed=st.integers(min_value=0, max_value=2**16),
)
def test_incremental_tracker_matches_naive_recomputation(
    tokens: list[TokenLogprob], window: int, tail: int, fraction: float, chunk_seed: int
) -> None:
    tracker = ConfidenceTracker(window=window, tail=tail, bottom_fraction=fraction)
    rng = random.Random(chunk_seed)
    seen = 0
    while seen < len(tokens):  # feed in random chunks, checking after every chunk like a live stream
        step = rng.randint(1, 5)
        tracker.update(tokens[seen : seen + step])
        seen = min(seen + step, len(tokens))
        expected = naive_measures(tokens[:seen], window, tail, fraction)
        assert tracker.num_tokens == seen
        assert tracker.current_group_confidence == pytest.approx(expected["current"], abs=1e-9)
        assert tracker.lowest_group_confidence == pytest.approx(expected["lowest_group"], abs=1e-9)
        assert tracker.bottom_group_confidence == pytest.approx(expected["bottom_group"], abs=1e-9)
        assert tracker.tail_confidence == pytest.approx(expected["tail"], abs=1e-9)
        assert tracker.mean_logprob == pytest.approx(expected["mean"], abs=1e-9)
    for metric in ("mean", "tail", "lowest_group", "bottom_group"):
        offline = trace_confidence(tokens, metric, window=window, tail=tail, bottom_fraction=fraction)
        assert offline == pytest.approx(expected[metric], abs=1e-9)
