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

from ..engine.types import Delta, GenerationRequest
from ..errors import ConfigError, EngineError
from ..verifiers.redundancy import AnswerRedundancy, RedundancyJudge, greedy_clusters
from .base import Result, SearchContext, Strategy, TraceTree
from .registry import MAX_SAMPLES, MAX_TOKENS, MAX_WIDTH, Component, register_strategy
from .sampling import SampledTrace, candidates_of, cluster_votes, enough_branches, pick_answer, stream_trace

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
        state = _PruneRun(self, ctx, ctx.request(problem, n=1))
        watcher = asyncio.create_task(state.checkpoints())
        try:
            async with asyncio.TaskGroup() as workers:
                state.workers = workers
                for _ in range(self.n):
                    workers.create_task(state.one("sample"))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if not enough_branches(len(state.dropped), self.n):
            raise state.dropped[-1]
        return await state.result()


class _PruneRun:
    """The state of one `Prune.run`: live traces, the duplicates marked for pruning and the votes they pass on."""

    def __init__(self, strategy: Prune, ctx: SearchContext, request: GenerationRequest) -> None:
        self.s, self.ctx, self.request = strategy, ctx, request
        self.tree = TraceTree()
        self.partial: dict[int, list[str]] = {}  # live trace id -> text so far
        self.doomed: dict[int, int] = {}  # trace id -> the representative it duplicates
        self.inherited: dict[int, int] = {}  # representative id -> extra votes from pruned duplicates
        self.successor: dict[int, int] = {}  # a broken trace -> the trace that replaced it
        self.due = asyncio.Event()
        self.decisions: list[dict[str, Any]] = []
        self.finished: list[SampledTrace] = []
        self.dropped: list[EngineError] = []
        self.budget_cut = False
        self.workers: asyncio.TaskGroup | None = None

    def check(self, trace: SampledTrace, delta: Delta) -> str | None:
        node = trace.node
        self.partial[node.id].append(delta.text)
        if node.id in self.doomed:
            node.detail = f"duplicates trace {self.doomed[node.id]}"
            return PRUNE_RULE
        interval = self.s.interval
        if delta.token_ids and node.tokens // interval != (node.tokens - len(delta.token_ids)) // interval:
            self.due.set()
        return None

    async def checkpoints(self) -> None:
        """At each due checkpoint, cluster the live traces; each cluster keeps its earliest traces."""
        while True:
            await self.due.wait()
            self.due.clear()
            nodes = self.tree.nodes
            live = [i for i in self.partial if i not in self.doomed and nodes[i].tokens >= self.s.min_tokens]
            if len(live) < 2:
                continue
            clusters = await greedy_clusters(self.s.judge, ["".join(self.partial[i]) for i in live])
            newly = {}
            for cluster in clusters:
                keep, drop = cluster[: self.s.keep_per_cluster], cluster[self.s.keep_per_cluster :]
                for index in drop:
                    newly[live[index]] = live[keep[0]]
            if newly:
                self.doomed.update(newly)
                self.decisions.append({"event": "prune", "traces": sorted(newly), "live": len(live)})

    async def one(self, kind: str, replaces: int | None = None) -> None:
        trace = SampledTrace(self.tree.open(kind))
        if replaces is not None:
            self.successor[replaces] = trace.node.id
        self.partial[trace.node.id] = []
        await stream_trace(self.ctx, self.request, trace, self.tree, self.check)
        del self.partial[trace.node.id]
        status = trace.node.status
        if status == "finished":
            self.finished.append(trace)
            self.budget_cut = self.budget_cut or trace.clipped
        elif status == "pruned":
            rep = self.doomed[trace.node.id]
            self.inherited[rep] = self.inherited.get(rep, 0) + 1 + self.inherited.pop(trace.node.id, 0)
            if self.s.refill and len(self.tree) < self.s.max_traces and not self.budget_cut:
                self.spawn("refill")
        elif status == "error" and trace.error is not None:
            self.broken(trace, trace.error, retried=replaces is not None)
        else:
            self.budget_cut = True

    def broken(self, trace: SampledTrace, error: EngineError, *, retried: bool) -> None:
        """A trace's stream broke: start a fresh one in its place once; a broken retry is dropped."""
        budget = self.ctx.budget
        again = not retried and not self.budget_cut and not (budget is not None and budget.exhausted)
        event = {"event": "engine_error", "error": f"{type(error).__name__}: {error}", "broken": [trace.node.id]}
        self.decisions.append({**event, "action": "retry" if again else "drop"})
        if again:
            self.spawn("retry", replaces=trace.node.id)
        elif retried:
            self.dropped.append(error)
        else:
            self.budget_cut = True  # no budget left to retry: the budget ended this branch

    def spawn(self, kind: str, replaces: int | None = None) -> None:
        assert self.workers is not None
        self.workers.create_task(self.one(kind, replaces))

    async def result(self) -> Result:
        credit: dict[int, int] = {}
        for represented, extra in self.inherited.items():
            rep = represented
            while rep in self.successor:  # duplicates of a broken trace vote with its replacement
                rep = self.successor[rep]
            credit[rep] = credit.get(rep, 0) + extra
        candidates = candidates_of(self.finished)
        ballots = [(c.answer, 1.0 + credit.get(c.trace_id, 0)) for c in candidates if c.answer is not None]
        votes = await cluster_votes(ballots, self.ctx.grader)
        pruned = self.tree.pruned()
        self.decisions.append(
            {"event": "summary", "pruned": len(pruned), "pruned_tokens": sum(p.tokens for p in pruned)}
        )
        return Result(
            self.s.name, pick_answer(votes), candidates, votes, self.tree, self.ctx.usage(), self.budget_cut,
            self.decisions,
        )  # fmt: skip
