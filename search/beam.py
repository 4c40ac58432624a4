"""`beam`: step-level beam search guided by a step scorer (a PRM or a generative judge).

A solution grows one step at a time; a step ends at a delimiter (a blank line by default), which is sent to the
engine as a stop string. At each depth every live beam is extended by ``expansions`` sampled next steps, drawn in
one request per beam whose prompt is the chat plus an assistant turn holding the beam's text so far, continued
with ``continue_final_message`` (so the engine's prefix cache holds the shared prefix once, and the samples of
a beam share it). The new prefixes are scored by the `StepScorer` (the step scores of a path are folded with
`aggregate`), the ``beam_width`` best candidates overall are kept and the rest are pruned.

A beam finishes when its step ended the generation (end of sequence, or the per-step token cap), when its text
holds a final answer (a boxed answer, ``####``, "the answer is ..."; a bare last number does not count), when
it produced an empty step (the model had nothing to add), or at ``max_depth``. The answer is the best finished
beam's (or a vote weighted by beam scores). `BudgetExhausted`, from a policy or a judge call, ends the search
with the best answer so far. A step's stream that breaks with an engine error follows the branch rule of
`branchwise.search.sampling` (sampled again once; the search fails only when most of a beam's steps are lost).

Knowing why a step stopped: an engine reports ``finish_reason == "stop"`` both for the delimiter and for the end
of sequence. When a backend says which stop string ended a sample (``stop_reason``), a stop other than the
delimiter ends the beam at once; otherwise the step is assumed to end at the delimiter, and a solution that had
in fact ended shows up as an empty next step (one extra short request), which finishes the beam.

The search itself (`StepSearch`) is shared with `branchwise.search.dvts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from ..engine.types import ChatMessage, FinishReason, GenerationRequest
from ..errors import BudgetExhausted, ConfigError, EngineError
from ..verifiers.extraction import AnswerExtractor
from ..verifiers.step_scorers import AGGREGATES, Aggregate, GenerativeJudgeScorer, StepScorer, aggregate
from .base import Candidate, Result, SearchContext, Strategy, TraceNode, TraceTree
from .registry import MAX_DEPTH, MAX_TOKENS, MAX_WIDTH, Component, register_strategy
from .sampling import branch_error, clipped_by_budget, cluster_votes, enough_branches, pick_answer

__all__ = [
    "PRUNE_DUPLICATE",
    "PRUNE_EMPTY",
    "PRUNE_LOW_SCORE",
    "Beam",
    "BeamPath",
    "SearchOutcome",
    "Selection",
    "StepEnd",
    "StepSearch",
    "choose_answer",
    "has_final_answer",
    "run_concurrently",
    "step_end",
]

logger = logging.getLogger(__name__)

PRUNE_LOW_SCORE = "beam_low_score"
PRUNE_DUPLICATE = "beam_duplicate"
PRUNE_EMPTY = "beam_empty_step"

Selection = Literal["best", "weighted_vote"]
StepEnd = Literal["delimiter", "eos", "length", "incomplete"]
EndedBy = Literal["eos", "length", "answer", "empty", "max_depth"]

T = TypeVar("T")


def step_end(finish_reason: FinishReason | None, stop_reason: str | int | None, delimiter: str) -> StepEnd:
    """Why a sampled step stopped.

    Args:
        finish_reason: the engine's finish reason (None if the sample never finished).
        stop_reason: the stop string or token that ended it, if the backend reported one.
        delimiter: the step delimiter sent as a stop string.

    Returns:
        "delimiter" (the step is complete and the solution goes on), "eos" (the model ended the solution, or
        another stop string/token did), "length" (the per-step token cap cut it) or "incomplete" (aborted,
        failed, or cut by the budget). A "stop" without a reported reason counts as "delimiter" (see the module
        docstring).
    """
    if finish_reason == "length":
        return "length"
    if finish_reason != "stop":
        return "incomplete"
    if stop_reason is None or stop_reason == delimiter:
        return "delimiter"
    return "eos"


@dataclass(frozen=True)
class BeamPath:
    """A partial or finished solution: its steps, their scores, and where it sits in the trace tree.

    Attributes:
        steps: the generated steps, as sampled (without the delimiter).
        scores: one step score per step.
        node: the trace node of its last expansion (the subtree root, or None, before the first step).
        tokens: completion tokens along the path.
        score: the aggregated step scores (0 before the first step).
        ended_by: why it finished ("eos", "length", "answer", "empty", "max_depth"), None while live.
        answer: the answer extracted from its text, once finished.
    """

    steps: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    node: int | None = None
    tokens: int = 0
    score: float = 0.0
    ended_by: EndedBy | None = None
    answer: str | None = None

    @property
    def finished(self) -> bool:
        return self.ended_by is not None

    def text(self, delimiter: str) -> str:
        """The solution text: the steps joined by the delimiter."""
        return delimiter.join(self.steps)


@dataclass
class SearchOutcome:
    """What one `StepSearch` run produced.

    Attributes:
        finished: beams that finished, in the order they finished.
        live: beams still open when the search stopped early (budget); empty otherwise.
        exhausted: a budget cap stopped the search.
        decisions: one record per depth (expanded, kept, pruned, finished).
    """

    finished: list[BeamPath] = field(default_factory=list)
    live: list[BeamPath] = field(default_factory=list)
    exhausted: bool = False
    decisions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Expansion:
    """One sampled next step of a beam."""

    parent: BeamPath
    node: TraceNode
    text: str = ""
    end: StepEnd = "incomplete"


@dataclass
class _Candidate:
    """A scored (or to-be-scored) successor of a beam, competing for a place in the beam."""

    path: BeamPath
    node: TraceNode
    end: StepEnd


async def run_concurrently(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently in a task group; a single failure cancels the others and is re-raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise
    return [t.result() for t in tasks]


def has_final_answer(extractor: AnswerExtractor, text: str) -> bool:
    """Whether ``text`` states a final answer (boxed, ``####``, "the answer is ..."; a bare number does not)."""
    found = extractor.extract_with_rule(text)
    # Any number would match "last_number", so it does not mean the solution is done.
    return found is not None and found.rule != "last_number"


class StepSearch:
    """One step-level beam search over a shared trace tree; the engine of `Beam` and of each `DVTS` subtree.

    Args:
        width: beams kept after each depth.
        expansions: next steps sampled per live beam (the first step: ``width * expansions`` from the root).
        max_depth: most steps per solution.
        delimiter: the step delimiter (a stop string).
        aggregate: how a path's step scores fold into its score ("last", "min", "prod", "mean").
        step_tokens: token cap per step (None: the context's ``max_tokens``).
        temperature: sampling temperature (None: the context's; must be > 0 when more than one sample is drawn).
        dedupe: prune a candidate whose step repeats a sibling's (same beam, same text) without scoring it.

    Raises:
        ConfigError: bad parameters.
    """

    def __init__(
        self,
        *,
        width: int,
        expansions: int,
        max_depth: int,
        delimiter: str = "\n\n",
        aggregate: Aggregate = "last",
        step_tokens: int | None = None,
        temperature: float | None = None,
        dedupe: bool = True,
    ) -> None:
        for name, value in (("width", width), ("expansions", expansions), ("max_depth", max_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"step search: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(delimiter, str) or not delimiter:
            raise ConfigError("step search: delimiter must be a non-empty string")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"step search: aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        if step_tokens is not None and (isinstance(step_tokens, bool) or step_tokens < 1):
            raise ConfigError(f"step search: step_tokens must be >= 1 or None, got {step_tokens!r}")
        if temperature is not None and temperature < 0:
            raise ConfigError(f"step search: temperature must be >= 0, got {temperature}")
        self.width = width
        self.expansions = expansions
        self.max_depth = max_depth
        self.delimiter = delimiter
        self.aggregate: Aggregate = aggregate
        self.step_tokens = step_tokens
        self.temperature = temperature
        self.dedupe = dedupe

    # -- requests -------------------------------------------------------------------------------------------
    def request(self, problem: str, ctx: SearchContext, path: BeamPath, n: int) -> GenerationRequest:
        """The request sampling ``n`` next steps of ``path``.

        Raises:
            ConfigError: greedy decoding (temperature 0) with ``n > 1``.
        """
        temperature = ctx.temperature if self.temperature is None else self.temperature
        if temperature == 0 and n > 1:
            raise ConfigError(f"step search samples {n} steps per beam: it needs a temperature > 0")
        overrides: dict[str, Any] = {
            "n": n,
            "temperature": temperature,
            "stop": (self.delimiter,),
            "max_tokens": self.step_tokens or ctx.max_tokens,
        }
        if path.steps:
            # The beam's text so far as an open assistant turn; ending it with the delimiter lets the model
            # start the next step exactly where the previous one stopped.
            prefix = path.text(self.delimiter) + self.delimiter
            overrides["messages"] = (*ctx.prompt.messages(problem), ChatMessage("assistant", prefix))
            overrides["continue_final_message"] = True
        return ctx.request(problem, **overrides)

    async def _draw(
        self, ctx: SearchContext, tree: TraceTree, path: BeamPath, request: GenerationRequest
    ) -> tuple[list[_Expansion], bool, EngineError | None]:
        """Sample ``request.n`` next steps of ``path``: them, whether the budget stopped the call, and the engine
        error that broke its stream (the steps it left unfinished are closed "error")."""
        expansions = [_Expansion(path, tree.open("step", parent=path.node)) for _ in range(request.n)]
        pieces: list[list[str]] = [[] for _ in expansions]
        finish: list[FinishReason | None] = [None] * len(expansions)
        stops: list[str | int | None] = [None] * len(expansions)
        exhausted, error = False, None
        try:
            async with contextlib.aclosing(ctx.llm.stream(request)) as deltas:
                async for delta in deltas:
                    pieces[delta.index].append(delta.text)
                    expansions[delta.index].node.tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        finish[delta.index] = delta.finish_reason
                        stops[delta.index] = delta.stop_reason
        except BudgetExhausted:
            exhausted = True
        except EngineError as err:
            error = branch_error(err)
        finally:
            for i, exp in enumerate(expansions):
                exp.text = exp.node.text = "".join(pieces[i])
                exp.node.finish_reason = finish[i]
                exp.end = step_end(finish[i], stops[i], self.delimiter)
                if exp.end == "length" and clipped_by_budget(ctx, request, finish[i], exp.node.tokens):
                    # The budget clipped this call's max_tokens to what was left: a budget cut, not the step cap.
                    exp.end = "incomplete"
                    exhausted = True
                if exp.end == "incomplete":
                    if error is not None:
                        why = f"stream broke ({type(error).__name__}: {error})"
                        tree.close(exp.node, "error", detail=why)
                    else:
                        status: Literal["budget", "error"] = "budget" if exhausted else "error"
                        tree.close(exp.node, status, detail="the step did not finish")
        return expansions, exhausted, error

    async def _expand(
        self,
        ctx: SearchContext,
        tree: TraceTree,
        path: BeamPath,
        request: GenerationRequest,
        decisions: list[dict[str, Any]],
    ) -> tuple[list[_Expansion], bool]:
        """Sample ``request.n`` next steps of ``path``; returns them and whether the budget stopped the call.

        A broken stream follows the branch rule of `branchwise.search.sampling`: the steps it left unfinished
        are sampled again once (unless the budget is spent), those that break again are dropped, and the engine
        error is re-raised only when more than half of the ``request.n`` steps were dropped.
        """
        expansions, exhausted, error = await self._draw(ctx, tree, path, request)
        if error is None:
            return expansions, exhausted
        broken = [e for e in expansions if e.end == "incomplete"]
        if not broken:
            return expansions, exhausted
        budget = ctx.budget
        retry = not exhausted and not (budget is not None and budget.exhausted)
        record: dict[str, Any] = {"event": "engine_error", "error": f"{type(error).__name__}: {error}"}
        record["broken"] = [e.node.id for e in broken]
        dropped, last = broken, error
        if retry:
            again, stopped, second = await self._draw(ctx, tree, path, request.replace(n=len(broken)))
            exhausted = exhausted or stopped
            record["retries"] = [e.node.id for e in again]
            expansions += again
            dropped = [e for e in again if e.end == "incomplete"] if second is not None else []
            last = second or error
        record["dropped"] = [e.node.id for e in dropped]
        decisions.append(record)
        if retry and not enough_branches(len(dropped), request.n):
            raise last
        return expansions, exhausted or not retry  # without a retry, the budget ended the broken steps

    # -- search ---------------------------------------------------------------------------------------------
    async def run(
        self,
        problem: str,
        ctx: SearchContext,
        scorer: StepScorer,
        tree: TraceTree,
        *,
        root: int | None = None,
    ) -> SearchOutcome:
        """Search from ``root`` (a node of ``tree``, or None) until every beam has finished or the budget ends.

        ``scorer`` must already be bound to the context (`StepScorer.bind`). Never raises `BudgetExhausted`.
        """
        outcome = SearchOutcome()
        live = [BeamPath(node=root)]
        for depth in range(self.max_depth):
            # Built before any call so a misconfiguration fails before spending anything.
            requests = [
                self.request(problem, ctx, p, self.width * self.expansions if not p.steps else self.expansions)
                for p in live
            ]
            results = await run_concurrently(
                [self._expand(ctx, tree, p, r, outcome.decisions) for p, r in zip(live, requests, strict=True)]
            )
            exhausted = any(flag for _, flag in results)
            expansions = [e for batch, _ in results for e in batch]
            candidates, duplicates = self._candidates(expansions, ctx, tree, last=depth == self.max_depth - 1)
            scored, unscored = await self._score(problem, scorer, candidates)
            for cand in unscored:
                tree.close(cand.node, "budget", detail="not scored: the budget ran out")
            previous, live = live, self._select(scored, ctx, tree, outcome)
            exhausted = exhausted or bool(unscored)
            outcome.decisions.append(
                {
                    "event": "depth",
                    "depth": depth,
                    "expanded": len(expansions),
                    "scored": len(scored),
                    "duplicates": duplicates,
                    "kept": [c.node.id for c in scored if c.node.status == "finished"],
                    "finished": sum(1 for c in scored if c.node.status == "finished" and c.path.finished),
                }
            )
            if exhausted:
                outcome.exhausted = True
                # When the budget cut every expansion of this depth, the beams they extended are the best so far.
                outcome.live = live or [p for p in previous if p.steps]
                break
            if not live:
                break
        return outcome

    def _candidates(
        self, expansions: list[_Expansion], ctx: SearchContext, tree: TraceTree, *, last: bool
    ) -> tuple[list[_Candidate], int]:
        """Turn finished expansions into candidate paths; prune empty first steps and duplicates."""
        seen: set[tuple[int | None, str]] = set()
        candidates: list[_Candidate] = []
        duplicates = 0
        for exp in expansions:
            if exp.end == "incomplete":
                continue
            parent, node, step = exp.parent, exp.node, exp.text
            key = (parent.node, step.strip())
            if self.dedupe and key in seen:
                duplicates += 1
                tree.close(node, "pruned", rule=PRUNE_DUPLICATE, detail="same step as a sibling")
                continue
            seen.add(key)
            tokens = parent.tokens + node.tokens
            if not step.strip():
                if not parent.steps:
                    tree.close(node, "pruned", rule=PRUNE_EMPTY, detail="empty first step")
                    continue
                # Nothing more to say: the parent's solution is complete as it stands.
                path = replace(parent, node=node.id, tokens=tokens, ended_by="empty")
                candidates.append(_Candidate(path, node, exp.end))
                continue
            path = BeamPath(steps=(*parent.steps, step), scores=parent.scores, node=node.id, tokens=tokens)
            ended_by: EndedBy | None = None
            if exp.end == "eos":
                ended_by = "eos"
            elif exp.end == "length":
                ended_by = "length"
            elif has_final_answer(ctx.extractor, path.text(self.delimiter)):
                ended_by = "answer"
            elif last:
                ended_by = "max_depth"
            candidates.append(_Candidate(replace(path, ended_by=ended_by), node, exp.end))
        return candidates, duplicates

    async def _score(
        self, problem: str, scorer: StepScorer, candidates: list[_Candidate]
    ) -> tuple[list[_Candidate], list[_Candidate]]:
        """Score every new step concurrently; returns the scored candidates and those the budget left unscored."""

        async def one(cand: _Candidate) -> float | None:
            if cand.path.ended_by == "empty":
                return None  # no new step: keeps its parent's scores
            try:
                return await scorer.score_last(problem, cand.path.steps)
            except BudgetExhausted:
                return None

        values = await run_concurrently([one(c) for c in candidates])
        scored, unscored = [], []
        for cand, value in zip(candidates, values, strict=True):
            path = cand.path
            if path.ended_by == "empty":
                cand.node.scores["beam"] = path.score
                scored.append(cand)
                continue
            if value is None:
                unscored.append(cand)
                continue
            steps_scores = (*path.scores, value)
            cand.path = replace(path, scores=steps_scores, score=aggregate(steps_scores, self.aggregate))
            cand.node.scores["step"] = value
            cand.node.scores["beam"] = cand.path.score
            scored.append(cand)
        return scored, unscored

    def _select(
        self, scored: list[_Candidate], ctx: SearchContext, tree: TraceTree, outcome: SearchOutcome
    ) -> list[BeamPath]:
        """Keep the ``width`` best candidates; finished ones leave the beam, the rest are pruned."""
        ranked = sorted(scored, key=lambda c: c.path.score, reverse=True)  # stable: earlier wins ties
        kept, dropped = ranked[: self.width], ranked[self.width :]
        cutoff = kept[-1].path.score if kept else 0.0
        for cand in dropped:
            tree.close(
                cand.node,
                "pruned",
                rule=PRUNE_LOW_SCORE,
                detail=f"score {cand.path.score:.4f} below the {self.width} best (cut-off {cutoff:.4f})",
            )
        live = []
        for cand in kept:
            path = cand.path
            if path.finished:
                answer = ctx.extractor.extract(path.text(self.delimiter))
                path = replace(path, answer=answer)
                cand.node.answer = answer
                outcome.finished.append(path)
                tree.close(cand.node, "finished", detail=f"beam finished ({path.ended_by})")
            else:
                live.append(path)
                tree.close(cand.node, "finished")
        return live


async def choose_answer(
    paths: Sequence[BeamPath], ctx: SearchContext, tree: TraceTree, selection: Selection, delimiter: str
) -> tuple[str | None, list[Candidate], dict[str, float]]:
    """The answer from scored paths, with one `Candidate` per path and the votes.

    "best" takes the highest-scoring path with an answer (votes: each answer's best score); "weighted_vote"
    sums path scores per answer cluster (by the context's grader) and takes the heaviest.
    Paths that have not finished get their answer extracted from their text so far.
    """
    candidates = []
    for path in paths:
        if path.node is None or not path.steps:
            continue
        text = path.text(delimiter)
        answer = path.answer if path.finished else ctx.extractor.extract(text)
        node = tree.nodes[path.node]
        if node.answer is None:
            node.answer = answer
        candidates.append(Candidate(answer, text, path.node, path.tokens, score=path.score))
    answered = [c for c in candidates if c.answer is not None]
    if selection == "weighted_vote":
        ballots = [(c.answer, c.score or 0.0) for c in answered if c.answer is not None]
        clusters = await cluster_votes(ballots, ctx.grader)
        return pick_answer(clusters), candidates, clusters
    votes: dict[str, float] = {}
    for c in answered:
        assert c.answer is not None and c.score is not None
        votes[c.answer] = max(votes.get(c.answer, c.score), c.score)
    best = max(answered, key=lambda c: c.score or 0.0, default=None)  # max keeps the first of equal scores
    return (best.answer if best else None), candidates, votes


def _check_selection(selection: str, strategy: str) -> None:
    if selection not in ("best", "weighted_vote"):
        raise ConfigError(f"{strategy}: selection must be 'best' or 'weighted_vote', got {selection!r}")


def _check_scorer(scorer: StepScorer | None, strategy: str) -> StepScorer:
    if scorer is None:
        return GenerativeJudgeScorer()
    if not isinstance(scorer, StepScorer):
        raise ConfigError(f"{strategy}: scorer must be a StepScorer, got {type(scorer).__name__}")
    return scorer


@register_strategy(
    maxima={"beam_width": MAX_WIDTH, "expansions": MAX_WIDTH, "max_depth": MAX_DEPTH, "step_tokens": MAX_TOKENS},
    sources={"scorer": Component("step_scorer")},
    fan_out=lambda s: s.beam_width * s.expansions,
)
class Beam(Strategy):
    """Step-level beam search with a step scorer.

    Args:
        scorer: scores each new step; None judges with the policy model itself (`GenerativeJudgeScorer`).
        beam_width: beams kept after each step.
        expansions: next steps sampled per beam (one request per beam, n = expansions).
        max_depth: most steps per solution.
        delimiter: what ends a step (sent as a stop string).
        aggregate: how a path's step scores fold into its score: "last", "min", "prod" or "mean".
        step_tokens: token cap per step (None: the context's ``max_tokens``).
        temperature: sampling temperature of steps (None: the context's).
        selection: "best" (the highest-scoring finished beam) or "weighted_vote" (score-weighted vote over the
            finished beams' answers).
        dedupe: prune repeated sibling steps without scoring them.

    Raises:
        ConfigError: bad parameters.
    """

    name = "beam"

    def __init__(
        self,
        scorer: StepScorer | None = None,
        *,
        beam_width: int = 4,
        expansions: int = 4,
        max_depth: int = 8,
        delimiter: str = "\n\n",
        aggregate: Aggregate = "last",
        step_tokens: int | None = None,
        temperature: float | None = None,
        selection: Selection = "best",
        dedupe: bool = True,
    ) -> None:
        self.scorer = _check_scorer(scorer, "beam")
        _check_selection(selection, "beam")
        self._search = StepSearch(
            width=beam_width,
            expansions=expansions,
            max_depth=max_depth,
            delimiter=delimiter,
            aggregate=aggregate,
            step_tokens=step_tokens,
            temperature=temperature,
            dedupe=dedupe,
        )
        self.beam_width, self.expansions, self.max_depth = beam_width, expansions, max_depth
        self.delimiter, self.aggregate, self.step_tokens = delimiter, aggregate, step_tokens
        self.temperature, self.selection, self.dedupe = temperature, selection, dedupe

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        scorer = self.scorer.bind(ctx.engine, ctx.budget)
        outcome = await self._search.run(problem, ctx, scorer, tree)
        paths = outcome.finished or outcome.live  # best so far when the budget stopped every beam early
        answer, candidates, votes = await choose_answer(paths, ctx, tree, self.selection, self.delimiter)
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), outcome.exhausted, outcome.decisions)
