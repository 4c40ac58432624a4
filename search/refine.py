"""`refine`: sequential self-refinement — draft an answer, then repeatedly critique and improve it.

Round 0 samples a draft from the problem. Each later round shows the model the problem and its previous attempt
and asks it to check the attempt, point out mistakes and write a corrected complete solution; every round is a
trace node whose parent is the attempt it revised (kinds "draft", then "refine"), so the trace tree is a chain.

A round whose output has no extractable answer is kept in the tree but not built on: the next round revises the
last attempt that had an answer. With ``patience`` the loop stops early once the answer has stayed the same
(by the context's grader) for that many consecutive rounds. The final answer is the last attempt's, or a vote
over every round's answer. When the budget runs out the best answer so far is returned, marked
``budget_exhausted``.
"""

from __future__ import annotations

from typing import Any, Literal

from ..engine.types import ChatMessage
from ..errors import ConfigError
from .base import Result, SearchContext, Strategy, TraceTree
from .registry import MAX_ROUNDS, register_strategy
from .sampling import SampledTrace, candidates_of, cluster_votes, pick_answer, sample

__all__ = ["DEFAULT_CRITIQUE", "Refine"]

DEFAULT_CRITIQUE = (
    "Review your solution above step by step. Point out any mistake in the reasoning or the arithmetic, then "
    "write a corrected, complete solution (keep it if it is already right). "
    "Finish with: The answer is <answer>."
)
"""The user turn that asks for a critique and an improved attempt (it follows the problem and the attempt)."""

FinalChoice = Literal["last", "vote"]


@register_strategy(maxima={"rounds": MAX_ROUNDS, "patience": MAX_ROUNDS}, fan_out=lambda s: s.rounds + 1)
class Refine(Strategy):
    """Sequential refinement: one draft, then ``rounds`` critique-and-improve rounds.

    Each refinement request is the context's prompt for the problem, the previous attempt as the assistant's
    turn, and ``critique`` as the next user turn, so the model revises its own answer in a normal chat.

    Args:
        rounds: refinement rounds after the draft (0 gives a single draft).
        patience: stop early once the extracted answer has not changed for this many consecutive rounds
            (None: always run every round).
        final: "last" takes the last attempt's answer; "vote" takes a majority vote over the answers of the
            draft and every refinement.
        critique: the user turn asking for a critique and an improved solution.
        temperature: sampling temperature of the refinement rounds (None: the context's).
    """

    name = "refine"

    def __init__(
        self,
        rounds: int = 3,
        *,
        patience: int | None = None,
        final: FinalChoice = "last",
        critique: str = DEFAULT_CRITIQUE,
        temperature: float | None = None,
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ConfigError(f"refine: rounds must be an integer >= 0, got {rounds!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"refine: patience must be an integer >= 1 or None, got {patience!r}")
        if final not in ("last", "vote"):
            raise ConfigError(f"refine: final must be 'last' or 'vote', got {final!r}")
        if not isinstance(critique, str) or not critique.strip():
            raise ConfigError("refine: critique must be a non-empty string")
        if temperature is not None and temperature < 0:
            raise ConfigError(f"refine: temperature must be >= 0, got {temperature}")
        self.rounds = rounds
        self.patience = patience
        self.final = final
        self.critique = critique
        self.temperature = temperature

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        tree = TraceTree()
        decisions: list[dict[str, Any]] = []
        attempts: list[SampledTrace] = []  # every finished round, in order

        drafts, exhausted = await sample(ctx, problem, tree, n=1, kind="draft")
        draft = drafts[0]
        base: SampledTrace | None = draft if draft.finished else None
        if base is not None:
            attempts.append(base)
        unchanged = 0
        overrides: dict[str, Any] = {} if self.temperature is None else {"temperature": self.temperature}

        for round_no in range(1, self.rounds + 1):
            if exhausted or base is None:
                break
            messages = (
                *ctx.prompt.messages(problem),
                ChatMessage("assistant", base.text),
                ChatMessage("user", self.critique),
            )
            (attempt,), exhausted = await sample(ctx, problem, tree, n=1, kind="refine", messages=messages, **overrides)
            attempt.node.parent = base.node.id
            if not attempt.finished:
                decisions.append({"event": "budget", "round": round_no, "best_so_far": base.node.answer})
                break
            attempts.append(attempt)
            previous = base.node.answer
            answer = attempt.node.answer
            if answer is None:
                # Building on an attempt without an answer would likely compound the damage.
                decisions.append({"event": "kept_previous", "round": round_no, "reason": "no answer extracted"})
                unchanged = 0
                continue
            same = previous is not None and await ctx.grader.aequivalent(previous, answer)
            unchanged = unchanged + 1 if same else 0
            decisions.append({"event": "round", "round": round_no, "answer": answer, "changed": not same})
            base = attempt
            if self.patience is not None and unchanged >= self.patience:
                decisions.append({"event": "early_stop", "after_round": round_no, "unchanged_rounds": unchanged})
                break

        candidates = candidates_of(attempts)
        if self.final == "vote":
            ballots = [(c.answer, 1.0) for c in candidates if c.answer is not None]
            votes = await cluster_votes(ballots, ctx.grader)
            answer = pick_answer(votes)
        else:
            answer = base.node.answer if base is not None else None
            votes = {answer: 1.0} if answer is not None else {}
        decisions.append({"event": "final", "mode": self.final, "answer": answer, "refinements": len(tree) - 1})
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), exhausted, decisions)
