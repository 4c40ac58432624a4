"""Trace confidence from token logprobs (the DeepConf measures), computed incrementally while a trace streams.

Definitions (Fu et al., "Deep Think with Confidence", 2025), for generated tokens i = 1..n:

- **token confidence** ``C_i = -(1/k) * sum_j logprob_i(j)`` over the k alternatives the engine returned at
  position i (``TokenLogprob.top``). A peaked distribution has very unlikely alternatives, so C_i is large:
  *higher = more confident*, and C_i >= 0.
  With fewer than two alternatives the formula inverts (for k = 1 it is ``-log p(top token)``, *smallest* when
  confident), so such positions use the sampled token's logprob itself (<= 0, also higher = more confident).
  Request ``logprobs >= 2`` (DeepConf uses 20) to get the DeepConf scale; the two scales are not comparable,
  which is harmless because thresholds are calibrated per run from warm-up traces of the same engine.
- **group confidence** of position i: the mean of C over the sliding window of the last ``window`` tokens.
- **trace confidences** (all higher = more confident):

  - ``"mean"``: the mean logprob of the sampled tokens (<= 0);
  - ``"tail"``: the mean C over the last ``tail`` tokens;
  - ``"lowest_group"``: the minimum group confidence over all complete windows (the mean C over all tokens
    while the trace is shorter than one window);
  - ``"bottom_group"``: the mean of the lowest ``bottom_fraction`` of the group confidences (at least one).

Logprobs of -inf (or NaN) are clamped to `LOGPROB_FLOOR` so one impossible alternative cannot swamp a window.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal, get_args

from ..engine.types import TokenLogprob
from ..errors import ConfigError

__all__ = [
    "LOGPROB_FLOOR",
    "ConfidenceMetric",
    "ConfidenceTracker",
    "token_confidence",
    "trace_confidence",
]

ConfidenceMetric = Literal["mean", "tail", "lowest_group", "bottom_group"]
"""Which trace confidence to compute; every one is higher = more confident."""

_METRICS: tuple[str, ...] = get_args(ConfidenceMetric)

LOGPROB_FLOOR = -100.0
"""Logprobs below this (including -inf and NaN) are raised to it."""


def _clamp(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN fails the comparison too


def token_confidence(token: TokenLogprob) -> float:
    """DeepConf token confidence: minus the mean of the top-k logprobs (k >= 2), else the sampled logprob."""
    top = token.top
    if len(top) >= 2:
        return -math.fsum(_clamp(lp) for _, lp in top) / len(top)
    return _clamp(token.logprob)


class ConfidenceTracker:
    """Running DeepConf confidences of one trace, O(1) amortised per token.

    Feed it each streamed chunk's logprobs with `update`; read `current_group_confidence` to decide early
    stopping as the trace grows, and the trace-level measures at the end. Window and tail sums are kept as
    running sums (re-summed exactly once per window to stop floating-point drift); every complete window's
    group confidence is kept so `bottom_group_confidence` can be computed at any point.

    Args:
        window: tokens in a group-confidence window (DeepConf uses 2048; shorter for short answers).
        tail: tokens in the tail-confidence window.
        bottom_fraction: the share of lowest group confidences averaged by `bottom_group_confidence`.

    Example:
        >>> tracker = ConfidenceTracker(window=2)
        >>> tracker.update([TokenLogprob(1, "a", -0.1, (("a", -0.1), ("b", -3.0)))])
        >>> round(tracker.current_group_confidence, 2)
        1.55
    """

    def __init__(self, window: int = 2048, tail: int = 2048, bottom_fraction: float = 0.1) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"window must be an integer >= 1, got {window!r}")
        if isinstance(tail, bool) or not isinstance(tail, int) or tail < 1:
            raise ConfigError(f"tail must be an integer >= 1, got {tail!r}")
        if not 0.0 < bottom_fraction <= 1.0:
            raise ConfigError(f"bottom_fraction must be in (0, 1], got {bottom_fraction!r}")
        self.window = window
        self.tail = tail
        self.bottom_fraction = bottom_fraction
        self._window_values: deque[float] = deque()
        self._window_sum = 0.0
        self._tail_values: deque[float] = deque()
        self._tail_sum = 0.0
        self._groups: list[float] = []
        self._lowest = math.inf
        self._logprob_sum = 0.0
        self._num_tokens = 0

    def update(self, logprobs: Sequence[TokenLogprob]) -> None:
        """Add the next tokens of the trace (e.g. one `Delta`'s logprobs)."""
        for token in logprobs:
            self.push(token_confidence(token), token.logprob)

    def push(self, confidence: float, logprob: float) -> None:
        """Add one token given its token confidence and sampled logprob."""
        self._num_tokens += 1
        self._logprob_sum += _clamp(logprob)

        self._window_values.append(confidence)
        self._window_sum += confidence
        if len(self._window_values) > self.window:
            self._window_sum -= self._window_values.popleft()
        if self._num_tokens % self.window == 0:  # bound the drift of the running sum
            self._window_sum = math.fsum(self._window_values)

        self._tail_values.append(confidence)
        self._tail_sum += confidence
        if len(self._tail_values) > self.tail:
            self._tail_sum -= self._tail_values.popleft()
        if self._num_tokens % self.tail == 0:
            self._tail_sum = math.fsum(self._tail_values)

        if len(self._window_values) == self.window:
            group = self._window_sum / self.window
            self._groups.append(group)
            self._lowest = min(self._lowest, group)

    @property
    def num_tokens(self) -> int:
        """Tokens seen so far."""
        return self._num_tokens

    @property
    def group_confidences(self) -> tuple[float, ...]:
        """Group confidence of every complete window, in order."""
        return tuple(self._groups)

    @property
    def current_group_confidence(self) -> float | None:
        """Mean token confidence over the latest ``window`` tokens (all tokens while fewer); None if none."""
        if not self._window_values:
            return None
        return self._window_sum / len(self._window_values)

    @property
    def lowest_group_confidence(self) -> float | None:
        """Minimum group confidence over complete windows (mean over all tokens while fewer); None if none."""
        if self._groups:
            return self._lowest
        return self.current_group_confidence

    @property
    def bottom_group_confidence(self) -> float | None:
        """Mean of the lowest ``bottom_fraction`` of group confidences (at least one); None if no tokens.

        O(g log k) over the g windows seen, so read it when needed rather than on every token.
        """
        if not self._groups:
            return self.current_group_confidence
        count = max(1, int(len(self._groups) * self.bottom_fraction))
        return math.fsum(heapq.nsmallest(count, self._groups)) / count

    @property
    def mean_logprob(self) -> float | None:
        """Mean logprob of the sampled tokens (<= 0); None if no tokens."""
        if not self._num_tokens:
            return None
        return self._logprob_sum / self._num_tokens

    @property
    def tail_confidence(self) -> float | None:
        """Mean token confidence over the last ``tail`` tokens; None if no tokens."""
        if not self._tail_values:
            return None
        return self._tail_sum / len(self._tail_values)

    def value(self, metric: ConfidenceMetric) -> float | None:
        """The named trace confidence; None if no tokens were seen."""
        if metric == "mean":
            return self.mean_logprob
        if metric == "tail":
            return self.tail_confidence
        if metric == "lowest_group":
            return self.lowest_group_confidence
        if metric == "bottom_group":
            return self.bottom_group_confidence
        raise ConfigError(f"unknown confidence metric {metric!r}; expected one of {_METRICS}")

    def __repr__(self) -> str:
        return (
            f"ConfidenceTracker(window={self.window}, tail={self.tail}, bottom_fraction={self.bottom_fraction}, "
            f"num_tokens={self._num_tokens})"
        )


def trace_confidence(
    logprobs: Iterable[TokenLogprob],
    metric: ConfidenceMetric = "lowest_group",
    *,
    window: int = 2048,
    tail: int = 2048,
    bottom_fraction: float = 0.1,
) -> float | None:
    """One confidence for a finished trace (see the module docstring); None for an empty trace.

    Args:
        logprobs: the trace's per-token logprobs.
        metric: "mean", "tail", "lowest_group" or "bottom_group".
        window: group-confidence window in tokens.
        tail: tail window in tokens.
        bottom_fraction: share of group confidences averaged by "bottom_group".
    """
    if metric not in _METRICS:
        raise ConfigError(f"unknown confidence metric {metric!r}; expected one of {_METRICS}")
    tracker = ConfidenceTracker(window=window, tail=tail, bottom_fraction=bottom_fraction)
    tracker.update(list(logprobs))
    return tracker.value(metric)
