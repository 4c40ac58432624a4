"""Sampling traces through the budget, recording each one in the trace tree, and voting over their answers.

A branch whose stream breaks with an engine error (a reset connection, a server gone silent, a crashed engine:
any `EngineError` except `EngineRequestError`, which means the request itself is wrong and fails the run at once)
is not the end of the run. Its partial text was never shown to anyone, so it is closed with status "error" and,
unless the budget stopped the run, sampled again once from scratch as a new trace; if that retry breaks too,
the branch is dropped. Each such event is recorded as a decision (``{"event": "engine_error", ...}``). The rule
for when a run fails: it re-raises the engine error only when more than half of the branches it asked for were
dropped (`enough_branches`), so self-consistency with n=4 survives one lost branch and n=1 fails if its only
branch breaks twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob
from ..errors import BudgetExhausted, ConfigError, EngineError, EngineRequestError
from ..verifiers.confidence import ConfidenceMetric, trace_confidence
from ..verifiers.grading import BaseGrader
from .base import Candidate, SearchContext, TraceNode, TraceTree

__all__ = [
    "DeltaCheck",
    "SampledTrace",
    "branch_error",
    "candidates_of",
    "close_finished",
    "cluster_votes",
    "enough_branches",
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
    error: EngineError | None = None
    """The engine error that broke its stream (status "error")."""

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
    """Extract the answer of a finished trace and close its node, noting a cut by the budget (``trace.clipped``)."""
    trace.node.answer = ctx.extractor.extract(trace.text)
    trace.clipped = clipped_by_budget(ctx, request, trace.finish_reason, trace.node.tokens)
    detail = f"clipped by the budget to {trace.node.tokens} tokens" if trace.clipped else None
    tree.close(trace.node, "finished", detail=detail)


def enough_branches(dropped: int, asked: int) -> bool:
    """The branch-failure rule: a run goes on while at most half of the ``asked`` branches were ``dropped``."""
    return 2 * dropped <= asked


def branch_error(err: EngineError) -> EngineError:
    """``err`` if it is a broken stream a branch may survive; re-raises a rejected request (HTTP 4xx, replay miss)."""
    if isinstance(err, EngineRequestError):
        raise err
    return err


async def _draw(
    ctx: SearchContext, request: GenerationRequest, traces: list[SampledTrace]
) -> tuple[bool, EngineError | None]:
    """Stream ``request`` (one sample per trace) into ``traces``; returns (budget stopped it, the engine error)."""
    pieces: list[list[str]] = [[] for _ in traces]
    exhausted, error = False, None
    try:
        async with contextlib.aclosing(ctx.llm.stream(request)) as deltas:
            async for delta in deltas:
                pieces[delta.index].append(delta.text)
                traces[delta.index].take(delta)
    except BudgetExhausted:
        exhausted = True
    except EngineError as err:
        error = branch_error(err)
    for trace, parts in zip(traces, pieces, strict=True):
        trace.text = trace.node.text = "".join(parts)
        trace.node.finish_reason = trace.finish_reason
    return exhausted, error


def _close_broken(tree: TraceTree, trace: SampledTrace, error: EngineError, *, then: str) -> None:
    trace.error = error
    tree.close(trace.node, "error", detail=f"stream broke ({type(error).__name__}: {error}); {then}")


async def sample(
    ctx: SearchContext,
    question: str,
    tree: TraceTree,
    *,
    n: int,
    kind: str = "sample",
    decisions: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> tuple[list[SampledTrace], bool]:
    """Draw ``n`` traces for ``question`` in one engine request (the prompt's KV cache is shared).

    Deltas are streamed, so when the budget runs out mid-way the samples that had already finished are kept
    and the unfinished ones are closed with status "budget". Answers are extracted from finished samples. A
    stream that breaks is handled as the module documentation says: the unfinished samples are retried once in
    one request, then dropped; ``decisions`` (when given) receives the record.

    Returns:
        The traces in sample order (a retried sample's position holds its retry), and whether the budget stopped
        the request or clipped a sample short.

    Raises:
        EngineError: more than half of the ``n`` samples were dropped after engine errors, or the engine rejected
            the request (`EngineRequestError`).
    """
    request = ctx.request(question, n=n, **overrides)
    traces = [SampledTrace(tree.open(kind)) for _ in range(n)]
    exhausted, error = await _draw(ctx, request, traces)
    if error is not None:
        exhausted = await _recover(
            ctx, request, tree, traces, error, exhausted=exhausted, kind=kind, decisions=decisions
        )
    for trace in traces:
        if trace.node.status != "running":
            continue  # broken and dropped
        if trace.finish_reason in ("stop", "length"):
            close_finished(ctx, request, trace, tree)
            exhausted = exhausted or trace.clipped
        else:
            tree.close(trace.node, "budget", detail="cut by the budget before it finished")
    return traces, exhausted


async def _recover(
    ctx: SearchContext,
    request: GenerationRequest,
    tree: TraceTree,
    traces: list[SampledTrace],
    error: EngineError,
    *,
    exhausted: bool,
    kind: str,
    decisions: list[dict[str, Any]] | None,
) -> bool:
    """The stream of ``traces`` broke: retry the unfinished ones once (in place), drop what breaks again."""
    broken = [i for i, t in enumerate(traces) if t.finish_reason not in ("stop", "length")]
    budget = ctx.budget
    retry = not exhausted and not (budget is not None and budget.exhausted)
    for i in broken:
        _close_broken(tree, traces[i], error, then="sampled again" if retry else "dropped (no budget to retry)")
    record: dict[str, Any] = {"event": "engine_error", "error": f"{type(error).__name__}: {error}"}
    record["broken"] = [traces[i].node.id for i in broken]
    dropped = list(broken)
    last = error
    if retry:
        again = [SampledTrace(tree.open(kind)) for _ in broken]
        stopped, second = await _draw(ctx, request.replace(n=len(broken)), again)
        exhausted = exhausted or stopped
        record["retries"] = [t.node.id for t in again]
        for i, trace in zip(broken, again, strict=True):
            traces[i] = trace
        dropped = []
        if second is not None:
            last = second
            for i in broken:
                if traces[i].finish_reason not in ("stop", "length"):
                    _close_broken(tree, traces[i], second, then="dropped")
                    dropped.append(i)
    record["dropped"] = [traces[i].node.id for i in dropped]
    if decisions is not None:
        decisions.append(record)
    if not retry:
        return True  # the budget, not the engine, ended these branches: the run is marked, not failed
    if not enough_branches(len(dropped), len(traces)):
        raise last
    return exhausted


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
    ``check`` named, after the tokens it had), "budget", or "error" when its stream broke (``trace.error``; the
    strategy decides whether to start another trace, see the module documentation). `BudgetExhausted` and broken
    streams are not raised: the trace records them. An `EngineRequestError` is raised.
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
    except EngineError as err:
        trace.error = branch_error(err)
    trace.text = trace.node.text = "".join(pieces)
    trace.node.finish_reason = trace.finish_reason
    if trace.error is not None and trace.finish_reason not in ("stop", "length"):
        _close_broken(tree, trace, trace.error, then="left to the strategy")
    elif trace.finish_reason in ("stop", "length"):
        close_finished(ctx, request, trace, tree)
    elif rule is not None:
        why = f"{trace.node.detail}; " if trace.node.detail else ""  # the check's note, e.g. what it duplicates
        tree.close(trace.node, "pruned", rule=rule, detail=f"{why}aborted after {trace.node.tokens} tokens")
    else:
        tree.close(trace.node, "budget", detail="cut by the budget before it finished")
    return trace
