"""`self_consistency`: sample N traces and vote over their answers (Wang et al., 2022).

Answers are clustered by the context's grader (math or QA equivalence, not string equality). Votes are plain
counts, or weighted by each trace's confidence from logprobs (DeepConf's confidence-weighted voting).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from ..errors import ConfigError
from ..verifiers.confidence import ConfidenceMetric
from .base import Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, MAX_TOKENS, MAX_TOP_LOGPROBS, register_strategy
from .sampling import candidates_of, cluster_votes, pick_answer, sample

__all__ = ["SelfConsistency"]

Voting = Literal["majority", "confidence"]


@register_strategy(
    maxima={"n": MAX_SAMPLES, "window": MAX_TOKENS, "top_logprobs": MAX_TOP_LOGPROBS}, fan_out=lambda s: s.n
)
class SelfConsistency(Strategy):
    """Majority (or confidence-weighted) vote over N samples.

    Args:
        n: number of samples (one engine request, so the prompt's KV cache is shared).
        voting: "majority" (one vote per answer) or "confidence" (votes weighted by trace confidence).
        confidence: the trace confidence used for weighting ("mean", "tail", "lowest_group", "bottom_group").
        window: group-confidence window in tokens.
        top_logprobs: alternatives requested per token for confidence (DeepConf's token confidence needs >= 2).
    """

    name = "self_consistency"

    def __init__(
        self,
        n: int = 8,
        *,
        voting: Voting = "majority",
        confidence: ConfidenceMetric = "lowest_group",
        window: int = 256,
        top_logprobs: int = 5,
    ) -> None:
        if n < 1:
            raise ConfigError(f"self_consistency: n must be >= 1, got {n}")
        if voting not in ("majority", "confidence"):
            raise ConfigError(f"self_consistency: voting must be 'majority' or 'confidence', got {voting!r}")
        if window < 1 or not 2 <= top_logprobs <= 20:
            raise ConfigError("self_consistency: window must be >= 1 and top_logprobs in 2..20")
        self.n = n
        self.voting = voting
        self.confidence = confidence
        self.window = window
        self.top_logprobs = top_logprobs

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        weighted = self.voting == "confidence"
        extra: dict[str, Any] = {"logprobs": self.top_logprobs} if weighted else {}
        decisions: list[dict[str, Any]] = []
        traces, exhausted = await sample(ctx, problem, tree, n=self.n, decisions=decisions, **extra)
        candidates = candidates_of(traces, confidence=self.confidence if weighted else None, window=self.window)
        ballots = [(c.answer, _weight(c.confidence) if weighted else 1.0) for c in candidates if c.answer is not None]
        votes = await cluster_votes(ballots, ctx.grader)
        return Result(self.name, pick_answer(votes), candidates, votes, tree, ctx.usage(), exhausted, decisions)


def _weight(confidence: float | None) -> float:
    # Group confidences are positive and higher is better; a mean logprob is <= 0, so map it through exp.
    if confidence is None or math.isnan(confidence):
        return 0.0
    return confidence if confidence > 0 else math.exp(confidence)
