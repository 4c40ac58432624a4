"""`dvts`: Diverse Verifier Tree Search (Beeching et al., 2024, in "Scaling test-time compute with open models").

Beam search with a strong step scorer tends to collapse onto one line of reasoning: every kept beam descends from
the same few high-scoring prefixes. DVTS splits a budget of ``n`` samples per step into ``n / beam_width``
independent subtrees and runs them concurrently; each subtree is a narrow beam search (width 1 by default) that
samples ``beam_width`` next steps of its beam and keeps only the best-scored one, greedy with respect to the
scorer. Subtrees never compare scores with each other, so they explore different solutions; the final answer is
the best-scored finished leaf over all subtrees, or a score-weighted vote over them.

Every subtree is a `branchwise.search.beam.StepSearch` rooted at its own "subtree" node of the shared trace tree;
all of them run under the context's budget, and `BudgetExhausted` stops them all with the best answer so far.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..verifiers.step_scorers import Aggregate, StepScorer
from .base import Result, SearchContext, Strategy, TraceStatus, TraceTree
from .beam import BeamPath, Selection, StepSearch, _check_scorer, _check_selection, choose_answer, run_concurrently
from .registry import MAX_DEPTH, MAX_SAMPLES, MAX_TOKENS, MAX_WIDTH, Component, register_strategy

__all__ = ["DVTS"]


@register_strategy(
    maxima={
        "n": MAX_SAMPLES,
        "beam_width": MAX_WIDTH,
        "subtree_width": MAX_WIDTH,
        "max_depth": MAX_DEPTH,
        "step_tokens": MAX_TOKENS,
    },
    sources={"scorer": Component("step_scorer")},
    fan_out=lambda s: s.n,
)
class DVTS(Strategy):
    """Diverse Verifier Tree Search: ``n / beam_width`` independent greedy step searches, run concurrently.

    Args:
        scorer: scores each new step; None judges with the policy model itself (`GenerativeJudgeScorer`).
        n: next steps sampled per depth over all subtrees (the compute budget of one step).
        beam_width: next steps sampled per subtree beam at each depth; there are ``n // beam_width`` subtrees.
        subtree_width: beams each subtree keeps (1: keep only the best expansion).
        max_depth: most steps per solution.
        delimiter: what ends a step (sent as a stop string).
        aggregate: how a path's step scores fold into its score: "last", "min", "prod" or "mean".
        step_tokens: token cap per step (None: the context's ``max_tokens``).
        temperature: sampling temperature of steps (None: the context's).
        selection: "best" (the highest-scoring finished leaf) or "weighted_vote" (score-weighted vote).
        dedupe: prune repeated sibling steps without scoring them.

    Raises:
        ConfigError: bad parameters (``n`` must be a multiple of ``beam_width``).
    """

    name = "dvts"

    def __init__(
        self,
        scorer: StepScorer | None = None,
        *,
        n: int = 16,
        beam_width: int = 4,
        subtree_width: int = 1,
        max_depth: int = 8,
        delimiter: str = "\n\n",
        aggregate: Aggregate = "last",
        step_tokens: int | None = None,
        temperature: float | None = None,
        selection: Selection = "best",
        dedupe: bool = True,
    ) -> None:
        for name, value in (("n", n), ("beam_width", beam_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"dvts: {name} must be an integer >= 1, got {value!r}")
        if n % beam_width:
            raise ConfigError(f"dvts: n ({n}) must be a multiple of beam_width ({beam_width})")
        self.scorer = _check_scorer(scorer, "dvts")
        _check_selection(selection, "dvts")
        self._search = StepSearch(
            width=subtree_width,
            expansions=beam_width,
            max_depth=max_depth,
            delimiter=delimiter,
            aggregate=aggregate,
            step_tokens=step_tokens,
            temperature=temperature,
            dedupe=dedupe,
        )
        self.n, self.beam_width, self.subtree_width, self.max_depth = n, beam_width, subtree_width, max_depth
        self.delimiter, self.aggregate, self.step_tokens = delimiter, aggregate, step_tokens
        self.temperature, self.selection, self.dedupe = temperature, selection, dedupe

    @property
    def subtrees(self) -> int:
        """Number of independent subtrees."""
        return self.n // self.beam_width

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        scorer = self.scorer.bind(ctx.engine, ctx.budget)
        roots = [tree.open("subtree") for _ in range(self.subtrees)]
        outcomes = await run_concurrently([self._search.run(problem, ctx, scorer, tree, root=r.id) for r in roots])
        decisions: list[dict[str, Any]] = []
        finished: list[BeamPath] = []
        live: list[BeamPath] = []
        for index, (root, outcome) in enumerate(zip(roots, outcomes, strict=True)):
            finished.extend(outcome.finished)
            live.extend(outcome.live)
            best = max((p.score for p in outcome.finished), default=None)
            if best is not None:
                root.scores["best"] = best
            status: TraceStatus = "budget" if outcome.exhausted and not outcome.finished else "finished"
            tree.close(root, status, detail=f"{len(outcome.finished)} finished leaves")
            decisions.extend({**d, "subtree": index} for d in outcome.decisions)
            decisions.append(
                {"event": "subtree", "subtree": index, "root": root.id, "finished": len(outcome.finished), "best": best}
            )
        exhausted = any(o.exhausted for o in outcomes)
        answer, candidates, votes = await choose_answer(
            finished or live, ctx, tree, self.selection, self._search.delimiter
        )
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), exhausted, decisions)
