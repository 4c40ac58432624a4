"""`adaptive`: spend compute where the problem needs it.

Probe with a few samples; if they agree strongly (the top answer's share of the vote reaches ``stop_agreement``)
the problem is easy and the run stops. Otherwise escalate through ``stages`` — more samples, voted together with
the earlier ones — and, if agreement is still low after the last stage, hand the problem to a heavier strategy
(``escalate_to``, e.g. beam search or PDR). Difficulty is estimated as 1 - agreement; every decision is recorded.
"""

from __future__ import annotations

import itertools
from typing import Any

from ..errors import ConfigError
from .base import Candidate, Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, NestedStrategy, register_strategy
from .sampling import candidates_of, cluster_votes, pick_answer, sample

__all__ = ["Adaptive"]


@register_strategy(
    maxima={"probe": MAX_SAMPLES, "stages": MAX_SAMPLES, "min_votes": MAX_SAMPLES},
    sources={"escalate_to": NestedStrategy()},
    fan_out=lambda s: s.stages[-1] if s.stages else s.probe,
)
class Adaptive(Strategy):
    """Probe, stop early on agreement, escalate otherwise.

    Args:
        probe: samples in the first stage.
        stages: total sample counts of the following stages (increasing), e.g. (8, 16).
        stop_agreement: stop once the top answer holds at least this share of the votes.
        min_votes: answers needed before agreement is trusted.
        escalate_to: a strategy to run when the last stage still disagrees (its answer wins).
    """

    name = "adaptive"

    def __init__(
        self,
        probe: int = 4,
        *,
        stages: tuple[int, ...] = (8, 16),
        stop_agreement: float = 0.75,
        min_votes: int = 2,
        escalate_to: Strategy | None = None,
    ) -> None:
        sizes = (probe, *stages)
        if probe < 1 or any(b <= a for a, b in itertools.pairwise(sizes)):
            raise ConfigError(f"adaptive: probe >= 1 and strictly increasing stages needed, got {sizes}")
        if not 0 < stop_agreement <= 1 or min_votes < 1:
            raise ConfigError("adaptive: stop_agreement must be in (0, 1] and min_votes >= 1")
        self.probe, self.stages, self.stop_agreement, self.min_votes = probe, tuple(stages), stop_agreement, min_votes
        self.escalate_to = escalate_to

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        candidates: list[Candidate] = []
        decisions: list[dict[str, Any]] = []
        votes: dict[str, float] = {}
        drawn = 0
        for stage, total in enumerate((self.probe, *self.stages)):
            traces, exhausted = await sample(
                ctx, problem, tree, n=total - drawn, kind=f"stage{stage}", decisions=decisions
            )
            drawn = total
            candidates.extend(candidates_of(traces))
            votes = await cluster_votes([(c.answer, 1.0) for c in candidates if c.answer is not None], ctx.grader)
            count = sum(votes.values())
            agreement = max(votes.values()) / count if count else 0.0
            decision = {"stage": stage, "samples": total, "agreement": round(agreement, 4), "votes": int(count)}
            decision["difficulty"] = round(1 - agreement, 4)
            if exhausted:
                decisions.append({**decision, "action": "stop_budget"})
                return self._result(candidates, votes, tree, ctx, decisions, exhausted=True)
            if count >= self.min_votes and agreement >= self.stop_agreement:
                decisions.append({**decision, "action": "stop_agreed"})
                return self._result(candidates, votes, tree, ctx, decisions)
            decisions.append({**decision, "action": "escalate"})
        if self.escalate_to is None:
            decisions[-1]["action"] = "stop_last_stage"
            return self._result(candidates, votes, tree, ctx, decisions)
        heavy = await self.escalate_to.run(problem, ctx)
        decisions.append({"action": "delegated", "strategy": heavy.strategy, "answer": heavy.answer})
        for node in heavy.trace.nodes:  # graft the heavy strategy's traces under this run's tree
            grafted = tree.open(f"{heavy.strategy}:{node.kind}")
            for key in ("status", "tokens", "text", "answer", "scores", "finish_reason", "pruned_by", "detail"):
                setattr(grafted, key, getattr(node, key))
        answer = heavy.answer if heavy.answer is not None else pick_answer(votes)
        return Result(
            self.name, answer, candidates + heavy.candidates, heavy.votes or votes, tree, ctx.usage(),
            heavy.budget_exhausted, decisions,
        )  # fmt: skip

    def _result(
        self,
        candidates: list[Candidate],
        votes: dict[str, float],
        tree: TraceTree,
        ctx: SearchContext,
        decisions: list[dict[str, Any]],
        *,
        exhausted: bool = False,
    ) -> Result:
        return Result(self.name, pick_answer(votes), candidates, votes, tree, ctx.usage(), exhausted, decisions)
