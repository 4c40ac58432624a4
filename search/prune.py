"""`prune`: redundancy pruning of in-flight traces (DeepPrune-style; Tu et al., 2025, idea).

N traces stream concurrently, one engine request each. At checkpoints (every ``interval`` tokens of any trace)
the live traces that have at least ``min_tokens`` are compared with a redundancy judge and greedily clustered;
each cluster keeps its ``keep_per_cluster`` earliest traces and the others are aborted inside the engine — so
the kept traces still cover every distinct line of reasoning. A pruned trace's vote goes to the trace that
represents its cluster (it was saying the same thing), so majority voting keeps its meaning. With ``refill``,
each prune frees room for a fresh trace, up to ``max_traces`` in all, while the budget lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..engine.types import Delta
from ..errors import ConfigError
from ..verifiers.redundancy import AnswerRedundancy, RedundancyJudge, greedy_clusters
from .base import Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, MAX_TOKENS, MAX_WIDTH, Component, register_strategy
from .sampling import SampledTrace, candidates_of, cluster_votes, pick_answer, stream_trace

__all__ = ["Prune"]

PRUNE_RULE = "redundant_with_trace"


@register_strategy(
    maxima={
        "n": MAX_SAMPLES,
        "interval": MAX_TOKENS,
        "min_tokens": MAX_TOKENS,
        "keep_per_cluster": MAX_WIDTH,
        "max_traces": 2 * MAX_SAMPLES,
    },
    sources={"judge": Component("redundancy_judge")},
    fan_out=lambda s: s.n,
)
class Prune(Strategy):
    """Self-consistency with redundant in-flight traces aborted.

    Args:
        n: traces started at once.
        judge: the redundancy judge (default: equivalence of current answers).
        interval: run a checkpoint each time a trace passes a multiple of this many tokens.
        min_tokens: a trace joins comparisons only after this many tokens.
        keep_per_cluster: traces kept in each redundant cluster (>= 1).
        refill: start a new trace for each pruned one, up to ``max_traces`` traces in all.
        max_traces: cap on traces started when refilling (default 2 x n).
    """

    name = "prune"

    def __init__(
        self,
        n: int = 8,
        *,
        judge: RedundancyJudge | None = None,
        interval: int = 64,
        min_tokens: int = 64,
        keep_per_cluster: int = 1,
        refill: bool = False,
        max_traces: int | None = None,
    ) -> None:
        if n < 1 or interval < 1 or min_tokens < 0 or keep_per_cluster < 1:
            raise ConfigError("prune: need n >= 1, interval >= 1, min_tokens >= 0, keep_per_cluster >= 1")
        if max_traces is not None and max_traces < n:
            raise ConfigError(f"prune: max_traces must be >= n={n}, got {max_traces}")
        self.n, self.interval, self.min_tokens, self.keep_per_cluster = n, interval, min_tokens, keep_per_cluster
        self.judge = judge or AnswerRedundancy()
        self.refill = refill
        self.max_traces = max_traces if max_traces is not None else 2 * n

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        request = ctx.request(problem, n=1)
        partial: dict[int, list[str]] = {}  # live trace id -> text so far
        doomed: dict[int, int] = {}  # trace id -> the representative it duplicates
        inherited: dict[int, int] = {}  # representative id -> extra votes from pruned duplicates
        due = asyncio.Event()
        decisions: list[dict[str, Any]] = []
        finished: list[SampledTrace] = []
        budget_cut = False

        def check(trace: SampledTrace, delta: Delta) -> str | None:
            node = trace.node
            partial[node.id].append(delta.text)
            if node.id in doomed:
                node.detail = f"duplicates trace {doomed[node.id]}"
                return PRUNE_RULE
            if (
                delta.token_ids
                and node.tokens // self.interval != (node.tokens - len(delta.token_ids)) // self.interval
            ):
                due.set()
            return None

        async def checkpoint() -> None:
            while True:
                await due.wait()
                due.clear()
                live = [
                    i for i, parts in partial.items() if i not in doomed and tree.nodes[i].tokens >= self.min_tokens
                ]
                if len(live) < 2:
                    continue
                clusters = await greedy_clusters(self.judge, ["".join(partial[i]) for i in live])
                newly = {}
                for cluster in clusters:
                    keep, drop = cluster[: self.keep_per_cluster], cluster[self.keep_per_cluster :]
                    for index in drop:
                        newly[live[index]] = live[keep[0]]
                if newly:
                    doomed.update(newly)
                    decisions.append({"event": "prune", "traces": sorted(newly), "live": len(live)})

        async def one(kind: str) -> None:
            nonlocal budget_cut
            trace = SampledTrace(tree.open(kind))
            partial[trace.node.id] = []
            await stream_trace(ctx, request, trace, tree, check)
            del partial[trace.node.id]
            status = trace.node.status
            if status == "finished":
                finished.append(trace)
                budget_cut = budget_cut or trace.clipped
            elif status == "pruned":
                rep = doomed[trace.node.id]
                inherited[rep] = inherited.get(rep, 0) + 1 + inherited.pop(trace.node.id, 0)
                if self.refill and len(tree) < self.max_traces and not budget_cut:
                    workers.create_task(one("refill"))
            else:
                budget_cut = True

        watcher = asyncio.create_task(checkpoint())
        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(self.n):
                    workers.create_task(one("sample"))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

        candidates = candidates_of(finished)
        ballots = []
        for c in candidates:
            if c.answer is not None:
                ballots.append((c.answer, 1.0 + inherited.get(c.trace_id, 0)))
        votes = await cluster_votes(ballots, ctx.grader)
        pruned = tree.pruned()
        decisions.append({"event": "summary", "pruned": len(pruned), "pruned_tokens": sum(p.tokens for p in pruned)})
        return Result(self.name, pick_answer(votes), candidates, votes, tree, ctx.usage(), budget_cut, decisions)
