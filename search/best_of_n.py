"""`best_of_n`: sample N traces, score each with a verifier, keep the best one.

The scorer is any async function of (problem, candidate) returning a score, higher is better — a PRM, a
generative judge, a unit-test runner — or "confidence" for the trace's confidence from logprobs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Literal

from ..errors import ConfigError
from ..verifiers.confidence import ConfidenceMetric
from .base import Candidate, Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, MAX_TOKENS, Component, register_strategy
from .sampling import candidates_of, sample

__all__ = ["BestOfN", "Scorer"]

Scorer = Callable[[str, Candidate], Awaitable[float]]


@register_strategy(
    maxima={"n": MAX_SAMPLES, "window": MAX_TOKENS},
    sources={"scorer": Component("verifier", selector="verifier", values=("confidence",))},
    fan_out=lambda s: s.n,
)
class BestOfN(Strategy):
    """Keep the highest-scoring of N samples.

    Args:
        n: number of samples.
        scorer: "confidence" or an async ``scorer(problem, candidate) -> float``.
        confidence: which trace confidence "confidence" scoring uses.
        window: group-confidence window in tokens.
    """

    name = "best_of_n"

    def __init__(
        self,
        n: int = 8,
        *,
        scorer: Literal["confidence"] | Scorer = "confidence",
        confidence: ConfidenceMetric = "lowest_group",
        window: int = 256,
    ) -> None:
        if n < 1:
            raise ConfigError(f"best_of_n: n must be >= 1, got {n}")
        if scorer != "confidence" and not callable(scorer):
            raise ConfigError("best_of_n: scorer must be 'confidence' or an async callable")
        self.n = n
        self.scorer = scorer
        self.confidence = confidence
        self.window = window

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        by_confidence = self.scorer == "confidence"
        extra: dict[str, Any] = {"logprobs": 5} if by_confidence else {}
        decisions: list[dict[str, Any]] = []
        traces, exhausted = await sample(ctx, problem, tree, n=self.n, decisions=decisions, **extra)
        candidates = candidates_of(traces, confidence=self.confidence if by_confidence else None, window=self.window)
        if by_confidence:
            scored = [replace(c, score=c.confidence) for c in candidates]
        else:
            assert callable(self.scorer)
            scores = await asyncio.gather(*(self.scorer(problem, c) for c in candidates))
            scored = [replace(c, score=s) for c, s in zip(candidates, scores, strict=True)]
        for c in scored:
            if c.score is not None:
                tree.nodes[c.trace_id].scores["verifier"] = c.score
        ranked = [c for c in scored if c.answer is not None and c.score is not None]
        best = max(ranked, key=lambda c: c.score or 0.0, default=None)
        answer = best.answer if best else None
        votes: dict[str, float] = {}
        for c in ranked:  # an answer's vote is its best score
            assert c.answer is not None and c.score is not None
            votes[c.answer] = max(votes.get(c.answer, c.score), c.score)
        return Result(self.name, answer, scored, votes, tree, ctx.usage(), exhausted, decisions)
