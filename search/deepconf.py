"""`deepconf`: confidence-filtered self-consistency with online early stopping (Fu et al., 2025, "Deep Think
with Confidence").

Online: ``warmup`` traces are sampled in full; the ``keep`` quantile of their lowest group confidences sets a
threshold (keep=0.9 keeps traces at least as confident as the least confident 90% of the warm-up — DeepConf-high;
keep=0.1 — DeepConf-low — is aggressive). The remaining traces are streamed one request each and aborted inside
the engine as soon as their sliding-window group confidence falls below the threshold; the survivors and the
warm-up traces vote, weighted by confidence. Sampling also stops early once one answer holds ``consensus`` of the
vote weight. Offline: all N traces are sampled in full, the least confident are filtered out, the rest vote.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Literal

from ..engine.types import Delta, GenerationRequest
from ..errors import ConfigError, EngineError
from ..verifiers.confidence import ConfidenceMetric, ConfidenceTracker
from .base import Candidate, Result, SearchContext, Strategy, TraceTree
from .registry import MAX_CONCURRENCY, MAX_SAMPLES, MAX_TOKENS, MAX_TOP_LOGPROBS, register_strategy
from .sampling import (
    SampledTrace,
    candidates_of,
    cluster_votes,
    enough_branches,
    pick_answer,
    sample,
    stream_trace,
)

__all__ = ["DeepConf"]

PRUNE_RULE = "deepconf_low_group_confidence"


@register_strategy(
    maxima={
        "n": MAX_SAMPLES,
        "warmup": MAX_SAMPLES,
        "window": MAX_TOKENS,
        "top_logprobs": MAX_TOP_LOGPROBS,
        "concurrency": MAX_CONCURRENCY,
    },
    fan_out=lambda s: s.n,
)
class DeepConf(Strategy):
    """DeepConf, online (early stopping) or offline (filter after sampling).

    Args:
        n: total traces, warm-up included.
        warmup: traces sampled in full to set the threshold (online mode).
        keep: quantile of warm-up confidences used as the threshold; traces below it are stopped (online) or
            the least confident ``1 - keep`` share is dropped (offline).
        window: sliding-window size in tokens for group confidence.
        metric: trace confidence used for filtering and voting weights ("lowest_group", "bottom_group",
            "tail", "mean").
        mode: "online" or "offline".
        consensus: stop launching traces once one answer holds this share of the weighted vote (online),
            None to always run all N.
        top_logprobs: alternatives per token (DeepConf's token confidence needs >= 2).
        concurrency: traces streamed at once after the warm-up.
    """

    name = "deepconf"

    def __init__(
        self,
        n: int = 16,
        *,
        warmup: int = 4,
        keep: float = 0.9,
        window: int = 256,
        metric: ConfidenceMetric = "lowest_group",
        mode: Literal["online", "offline"] = "online",
        consensus: float | None = 0.95,
        top_logprobs: int = 5,
        concurrency: int = 8,
    ) -> None:
        if n < 1 or not 1 <= warmup <= n:
            raise ConfigError(f"deepconf: need n >= 1 and 1 <= warmup <= n, got n={n}, warmup={warmup}")
        if not 0 < keep <= 1:
            raise ConfigError(f"deepconf: keep must be in (0, 1], got {keep}")
        if mode not in ("online", "offline"):
            raise ConfigError(f"deepconf: mode must be 'online' or 'offline', got {mode!r}")
        if consensus is not None and not 0.5 < consensus <= 1:
            raise ConfigError(f"deepconf: consensus must be in (0.5, 1] or None, got {consensus}")
        if window < 1 or not 2 <= top_logprobs <= 20 or concurrency < 1:
            raise ConfigError("deepconf: window and concurrency must be >= 1, top_logprobs in 2..20")
        self.n, self.warmup, self.keep, self.window, self.metric = n, warmup, keep, window, metric
        self.mode, self.consensus, self.top_logprobs, self.concurrency = mode, consensus, top_logprobs, concurrency

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        if self.mode == "offline":
            return await self._offline(problem, ctx)
        return await self._online(problem, ctx)

    # -- offline ----------------------------------------------------------------------------------------------
    async def _offline(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        decisions: list[dict[str, Any]] = []
        traces, exhausted = await sample(ctx, problem, tree, n=self.n, decisions=decisions, logprobs=self.top_logprobs)
        candidates = candidates_of(traces, confidence=self.metric, window=self.window)
        kept, threshold = _filter(candidates, self.keep)
        votes = await _vote(kept, ctx)
        decisions.append({"event": "offline_filter", "threshold": threshold, "kept": len(kept), "of": len(candidates)})
        return Result(self.name, pick_answer(votes), candidates, votes, tree, ctx.usage(), exhausted, decisions)

    # -- online -----------------------------------------------------------------------------------------------
    async def _online(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        decisions: list[dict[str, Any]] = []
        warm, exhausted = await sample(
            ctx, problem, tree, n=self.warmup, kind="warmup", decisions=decisions, logprobs=self.top_logprobs
        )
        candidates = candidates_of(warm, confidence=self.metric, window=self.window)
        confidences = [c.confidence for c in candidates if c.confidence is not None]
        threshold = _quantile(confidences, 1 - self.keep) if confidences else None
        decisions.append({"event": "threshold", "value": threshold, "from_warmup": len(confidences), "keep": self.keep})
        remaining = self.n - self.warmup
        if not exhausted and remaining > 0 and threshold is not None:
            phase = _Online(self, ctx, ctx.request(problem, n=1, logprobs=self.top_logprobs), tree, threshold)
            phase.candidates, phase.decisions = candidates, decisions
            async with asyncio.TaskGroup() as tg:
                for _ in range(remaining):
                    tg.create_task(phase.one())
            if not enough_branches(len(phase.dropped), self.n):
                raise phase.dropped[-1]
            exhausted = exhausted or "budget" in phase.halted or any(node.status == "budget" for node in tree.nodes)
            pruned = [node for node in tree.nodes if node.status == "pruned"]
            decisions.append({"event": "pruned", "count": len(pruned), "tokens": sum(node.tokens for node in pruned)})
            candidates.sort(key=lambda c: c.trace_id)  # sample order, not finishing order: timing-independent ties
        votes = await _vote(candidates, ctx)
        return Result(self.name, pick_answer(votes), candidates, votes, tree, ctx.usage(), exhausted, decisions)


class _Online:
    """The streaming phase of online DeepConf: traces stopped when their group confidence drops below the cutoff."""

    def __init__(
        self, strategy: DeepConf, ctx: SearchContext, request: GenerationRequest, tree: TraceTree, cutoff: float
    ) -> None:
        self.s, self.ctx, self.request, self.tree, self.cutoff = strategy, ctx, request, tree, cutoff
        self.halted: list[str] = []  # why no more traces start: "consensus" (in-flight ones stop too) or "budget"
        self.gate = asyncio.Semaphore(strategy.concurrency)
        self.trackers: dict[int, ConfidenceTracker] = {}
        self.candidates: list[Candidate] = []
        self.decisions: list[dict[str, Any]] = []
        self.dropped: list[EngineError] = []

    def check(self, trace: SampledTrace, delta: Delta) -> str | None:
        if self.halted and self.halted[0] == "consensus":
            return "deepconf_consensus_reached"
        tracker = self.trackers[trace.node.id]
        tracker.update(delta.logprobs or ())
        current = tracker.current_group_confidence
        if tracker.num_tokens >= self.s.window and current is not None and current < self.cutoff:
            trace.node.scores["group_confidence_at_prune"] = current
            return PRUNE_RULE
        return None

    async def one(self) -> None:
        async with self.gate:
            trace = await self.stream("sample")
            if trace is not None and trace.node.status == "error":
                trace = await self.stream("retry") if self.retry(trace, first=True) else None
                if trace is not None and trace.node.status == "error":
                    self.retry(trace, first=False)
                    trace = None
            if trace is None:
                return
            if trace.node.status == "budget" or trace.clipped:
                self.halted.append("budget")
            if trace.finished:
                await self.finished(trace)

    async def stream(self, kind: str) -> SampledTrace | None:
        if self.halted:
            return None
        trace = SampledTrace(self.tree.open(kind))
        self.trackers[trace.node.id] = ConfidenceTracker(window=self.s.window, tail=self.s.window)
        return await stream_trace(self.ctx, self.request, trace, self.tree, self.check)

    def retry(self, trace: SampledTrace, *, first: bool) -> bool:
        """Record a broken stream; whether to sample that branch again (once, while the budget lasts)."""
        assert trace.error is not None
        budget = self.ctx.budget
        again = first and not (budget is not None and budget.exhausted)
        error = f"{type(trace.error).__name__}: {trace.error}"
        self.decisions.append(
            {"event": "engine_error", "error": error, "broken": [trace.node.id], "action": "retry" if again else "drop"}
        )
        if not first:
            self.dropped.append(trace.error)
        elif not again:
            self.halted.append("budget")
        return again

    async def finished(self, trace: SampledTrace) -> None:
        self.candidates.extend(candidates_of([trace], confidence=self.s.metric, window=self.s.window))
        consensus = self.s.consensus
        if consensus is not None and await _has_consensus(self.candidates, self.ctx, consensus, self.s.n):
            if not self.halted:
                self.decisions.append({"event": "consensus", "after_traces": len(self.tree)})
            self.halted.append("consensus")


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1])."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _filter(candidates: list[Candidate], keep: float) -> tuple[list[Candidate], float | None]:
    scored = [c.confidence for c in candidates if c.confidence is not None]
    if not scored:
        return candidates, None
    threshold = _quantile(scored, 1 - keep)
    return [c for c in candidates if c.confidence is not None and c.confidence >= threshold], threshold


def _weight(c: Candidate) -> float:
    # Group confidences (top-k >= 2) are positive, higher is better.
    return max(c.confidence or 0.0, 0.0)


async def _vote(candidates: list[Candidate], ctx: SearchContext) -> dict[str, float]:
    return await cluster_votes([(c.answer, _weight(c)) for c in candidates if c.answer is not None], ctx.grader)


async def _has_consensus(candidates: list[Candidate], ctx: SearchContext, share: float, n: int) -> bool:
    votes = await _vote(candidates, ctx)
    total = sum(votes.values())
    # Require a few votes before trusting a share: at least half the warm-up-sized sample of the run.
    return total > 0 and len(candidates) >= max(2, n // 4) and max(votes.values()) / total >= share
