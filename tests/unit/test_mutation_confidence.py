"""Confidence measures in detail (gaps found by mutation testing, `make mutation`): defaults, messages, and the
exact re-summing of the window and tail sums once per window."""

from __future__ import annotations

import pytest

from branchwise.engine import TokenLogprob
from branchwise.errors import ConfigError
from branchwise.verifiers.confidence import ConfidenceTracker, trace_confidence


def _tokens(logprobs: list[float]) -> list[TokenLogprob]:
    return [TokenLogprob(1, "x", lp, (("x", lp), ("y", -5.0))) for lp in logprobs]


def test_documented_defaults() -> None:
    tracker = ConfidenceTracker()
    assert (tracker.window, tracker.tail, tracker.bottom_fraction) == (2048, 2048, 0.1)
    tokens = _tokens([-3.0] + [-0.01] * 2048)  # 2049 tokens: the default windows hold 2048
    assert trace_confidence(tokens) == trace_confidence(tokens, "lowest_group", window=2048)
    assert trace_confidence(tokens) != trace_confidence(tokens, "lowest_group", window=2049)
    assert trace_confidence(tokens, "tail") == trace_confidence(tokens, "tail", tail=2048)
    assert trace_confidence(tokens, "tail") != trace_confidence(tokens, "tail", tail=2049)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window must be an integer >= 1, got 0"),
        ({"tail": 0}, "tail must be an integer >= 1, got 0"),
        ({"tail": True}, "tail must be an integer >= 1, got True"),
        ({"tail": 1.5}, "tail must be an integer >= 1, got 1.5"),
        ({"bottom_fraction": 1.5}, "bottom_fraction must be in (0, 1], got 1.5"),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ConfidenceTracker(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_unknown_metrics_are_refused_with_their_message() -> None:
    message = "unknown confidence metric 'median'; expected one of ('mean', 'tail', 'lowest_group', 'bottom_group')"
    with pytest.raises(ConfigError) as caught:
        trace_confidence([], "median")  # type: ignore[arg-type]
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as caught:
        ConfidenceTracker().value("median")  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_window_and_tail_sums_are_exact_at_each_full_window() -> None:
    # A running float sum loses the 1.0 added to 1e16 and, once 1e16 leaves the window, reads 0.0 for the window
    # [1.0, 1.0]; the sums are added up exactly again at every multiple of the window, so that reads 2.0.
    tracker = ConfidenceTracker(window=2, tail=2)
    for value in (1e16, 1e16, 1.0, 1.0):
        tracker.push(value, 0.0)
    assert tracker.group_confidences[-1] == 1.0
    assert tracker.current_group_confidence == 1.0
    assert tracker.tail_confidence == 1.0
