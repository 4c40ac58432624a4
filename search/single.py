"""`single`: one trace, greedy or sampled — the baseline every other strategy is measured against."""

from __future__ import annotations

from typing import Any

from .base import Result, SearchContext, Strategy, TraceTree
from .registry import register_strategy
from .sampling import candidates_of, sample

__all__ = ["Single"]


@register_strategy(fan_out=lambda s: 1)
class Single(Strategy):
    """One sample.

    Args:
        greedy: decode greedily (temperature 0) instead of sampling at the context's temperature.
    """

    name = "single"

    def __init__(self, *, greedy: bool = True) -> None:
        self.greedy = greedy

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        overrides: dict[str, Any] = {"temperature": 0.0} if self.greedy else {}
        decisions: list[dict[str, Any]] = []
        traces, exhausted = await sample(ctx, problem, tree, n=1, decisions=decisions, **overrides)
        candidates = candidates_of(traces)
        answer = candidates[0].answer if candidates else None
        votes = {answer: 1.0} if answer is not None else {}
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), exhausted, decisions)
