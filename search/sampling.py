"""Sampling traces through the budget, recording each one in the trace tree, and voting over their answers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob
from ..errors import BudgetExhausted, ConfigError
from ..verifiers.confidence import ConfidenceMetric, trace_confidence
from ..verifiers.grading import BaseGrader
from .base import Candidate, SearchContext, TraceNode, TraceTree

__all__ = [
    "DeltaCheck",
    "SampledTrace",
    "candidates_of",
    "close_finished",
    "cluster_votes",
    "pick_answer",
    "sample",
    "stream_trace",
]


@dataclass
class SampledTrace:
    """A trace sampled by `sample`: its tree node, text and per-token logprobs (when requested)."""

    node: TraceNode
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    clipped: bool = False
    """It finished (for "length") short of the tokens it asked for, because the budget clipped its call."""
    logprob_sum: float = 0.0

    @property
    def finished(self) -> bool:
        return self.node.status == "finished"

    def take(self, delta: Delta) -> None:
        """Count one delta of this trace: tokens, logprobs (and the node's live confidence), finish reason."""
        self.node.tokens += len(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
            self.logprob_sum += sum(t.logprob for t in delta.logprobs)
            self.node.live_confidence = self.logprob_sum / len(self.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def clipped_by_budget(ctx: SearchContext, request: GenerationRequest, finish: FinishReason | None, tokens: int) -> bool:
    """Whether a sample of ``request`` that ended with ``finish`` after ``tokens`` tokens was cut by the budget.

    It stopped for "length" before the ``max_tokens`` it asked for while a cap of the budget had lowered the
    ``max_tokens`` of some call (the model's context length is the only other way to stop short for "length").
    """
    budget = ctx.budget
    return finish == "length" and tokens < request.max_tokens and budget is not None and budget.clipped_calls > 0


def close_finished(ctx: SearchContext, request: GenerationRequest, trace: SampledTrace, tree: TraceTree) -> None:
    """Extract the answer of a trace that finished and close its node, noting a cut by the budget (``trace.clipped``)."""
    trace.node.answer = ctx.extractor.extract(trace.text)
    trace.clipped = clipped_by_budget(ctx, request, trace.finish_reason, trace.node.tokens)
    detail = f"clipped by the budget to {trace.node.tokens} tokens" if trace.clipped else None
    tree.close(trace.node, "finished", detail=detail)


async def sample(
    ctx: SearchContext,
    question: str,
    tree: TraceTree,
    *,
    n: int,
    kind: str = "sample",
    **overrides: Any,
) -> tuple[list[SampledTrace], bool]:
    """Draw ``n`` traces for ``question`` in one engine request (the prompt's KV cache is shared).

    Deltas are streamed, so when the budget runs out mid-way the samples that had already finished are kept
    and the unfinished ones are closed with status "budget". Answers are extracted from finished samples.

    Returns:
        The traces in sample order, and whether the budget stopped the request or clipped a sample short.
    """
    request = ctx.request(question, n=n, **overrides)
    traces = [SampledTrace(tree.open(kind)) for _ in range(n)]
    pieces: list[list[str]] = [[] for _ in range(n)]
    exhausted = False
    try:
        async with contextlib.aclosing(ctx.llm.stream(request)) as deltas:
            async for delta in deltas:
                pieces[delta.index].append(delta.text)
                traces[delta.index].take(delta)
    except BudgetExhausted:
        exhausted = True
    for trace, parts in zip(traces, pieces, strict=True):
        trace.text = trace.node.text = "".join(parts)
        trace.node.finish_reason = trace.finish_reason
        if trace.finish_reason in ("stop", "length"):
            close_finished(ctx, request, trace, tree)
            exhausted = exhausted or trace.clipped
        else:
            tree.close(trace.node, "budget", detail="cut by the budget before it finished")
    return traces, exhausted


async def cluster_votes(weighted: Sequence[tuple[str, float]], grader: BaseGrader) -> dict[str, float]:
    """Sum weights per answer cluster; answers the grader deems equivalent share a cluster.

    The first answer seen represents its cluster. Identical strings skip the grader.
    """
    clusters: dict[str, float] = {}
    for answer, weight in weighted:
        if answer in clusters:
            clusters[answer] += weight
            continue
        for representative in clusters:
            if await grader.aequivalent(representative, answer):
                clusters[representative] += weight
                break
        else:
            clusters[answer] = weight
    return clusters


def pick_answer(votes: dict[str, float]) -> str | None:
    """The answer with the most weight; ties go to the answer seen first."""
    best, best_weight = None, -math.inf
    for answer, weight in votes.items():
        if weight > best_weight:
            best, best_weight = answer, weight
    return best


def candidates_of(
    traces: Sequence[SampledTrace], *, confidence: ConfidenceMetric | None = None, window: int = 2048
) -> list[Candidate]:
    """Candidates from the finished traces; with ``confidence``, each gets that trace confidence (recorded in
    the trace tree too)."""
    result = []
    for trace in traces:
        if not trace.finished:
            continue
        value = None
        if confidence is not None:
            value = trace_confidence(trace.logprobs, confidence, window=window)
            if value is not None:
                trace.node.scores[f"confidence_{confidence}"] = value
        result.append(Candidate(trace.node.answer, trace.text, trace.node.id, trace.node.tokens, confidence=value))
    return result


DeltaCheck = Callable[[SampledTrace, Delta], str | None]
"""Called after each delta of a trace; returns the name of a pruning rule to abort the trace, else None."""


async def stream_trace(
    ctx: SearchContext, request: GenerationRequest, trace: SampledTrace, tree: TraceTree, check: DeltaCheck
) -> SampledTrace:
    """Stream one single-sample request into ``trace``, aborting it inside the engine when ``check`` says so.

    The trace ends "finished" (``trace.clipped`` when the budget clipped it short), "pruned" (by the rule
    ``check`` named, after the tokens it had), or "budget". `BudgetExhausted` is not raised: the trace records it.
    """
    if request.n != 1:
        raise ConfigError("stream_trace streams one sample; use sample() for n > 1")
    pieces: list[str] = []
    rule = None
    try:
        async with contextlib.aclosing(ctx.llm.stream(request)) as deltas:
            async for delta in deltas:
                pieces.append(delta.text)
                trace.take(delta)
                if delta.finish_reason is not None:
                    break
                rule = check(trace, delta)
                if rule is not None:
                    break  # leaving the block closes the stream: the engine aborts the request
    except BudgetExhausted:
        pass
    trace.text = trace.node.text = "".join(pieces)
    trace.node.finish_reason = trace.finish_reason
    if trace.finish_reason in ("stop", "length"):
        close_finished(ctx, request, trace, tree)
    elif rule is not None:
        tree.close(trace.node, "pruned", rule=rule, detail=f"aborted after {trace.node.tokens} tokens")
    else:
        tree.close(trace.node, "budget", detail="cut by the budget before it finished")
    return trace
