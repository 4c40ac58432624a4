"""A generative verifier (GenRM style): ask a model whether a solution is correct, k times, and count the yeses.

For a problem and a candidate solution, `GenerativeVerifier` samples ``k`` verification rationales in one engine
request (``n=k``, so the prompt's KV cache is shared), each asked to check the solution and end with
``Verdict: Yes`` or ``Verdict: No``. The score is the fraction of rationales that judge the solution correct
(Zhang et al., 2024, "Generative Verifiers": the mean verdict over sampled rationales). A rationale whose verdict
cannot be parsed counts as No and is recorded as unparsed (``None``) in the result.

The verifier is also a `best_of_n` scorer: ``BestOfN(n=8, scorer=GenerativeVerifier(engine))``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Protocol

from ..budget import Budget
from ..engine.base import Engine
from ..engine.types import CallUsage, ChatMessage, FinishReason, GenerationRequest
from ..errors import BudgetExhausted, ConfigError

__all__ = ["DEFAULT_VERIFY_PROMPT", "GenerativeVerifier", "Solution", "VerificationResult", "parse_verdict"]

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_PROMPT = (
    "Problem:\n{problem}\n\n"
    "Proposed solution:\n{solution}\n\n"
    "Is this solution correct? Check each step of the reasoning and the arithmetic carefully, explain briefly, "
    "then end with exactly 'Verdict: Yes' if the solution and its final answer are correct, or 'Verdict: No' "
    "otherwise."
)
"""The verification request; ``{problem}`` and ``{solution}`` are filled in."""

_VERDICT_RE = re.compile(r"verdict\s*\**\s*[:\-\u2013]?\s*[*\"'`]*\s*(yes|no)\b", re.IGNORECASE)
_SLOT_RE = re.compile(r"\{(problem|solution)\}")


class Solution(Protocol):
    """What the verifier reads of a candidate (a search `Candidate` is one): its generated text."""

    @property
    def text(self) -> str: ...


def parse_verdict(text: str) -> bool | None:
    """The last "Verdict: Yes/No" in ``text`` (case and markdown emphasis tolerated): True, False, or None."""
    found = _VERDICT_RE.findall(text)
    if not found:
        return None
    return str(found[-1]).lower() == "yes"


@dataclass(frozen=True)
class VerificationResult:
    """The verdicts of one verification.

    Attributes:
        score: fraction of the finished rationales that judged the solution correct (unparsed ones count as
            No); 0.0 when none finished.
        verdicts: one per rationale: True (Yes), False (No) or None (no verdict could be parsed, or the
            rationale was cut by the budget).
        rationales: the generated rationales, in sample order.
        finish_reasons: the engine's finish reason per rationale ("abort" when cut by the budget).
        usage: what the verification call cost, as reported to the engine's usage hooks.
        budget_exhausted: the budget refused or cut the call; the score covers the rationales that finished.
    """

    score: float
    verdicts: tuple[bool | None, ...]
    rationales: tuple[str, ...]
    finish_reasons: tuple[FinishReason, ...]
    usage: CallUsage | None = None
    budget_exhausted: bool = False

    @property
    def yes(self) -> int:
        """Rationales that judged the solution correct."""
        return sum(1 for v in self.verdicts if v is True)

    @property
    def unparsed(self) -> int:
        """Finished rationales without a parseable verdict (counted as No)."""
        return sum(
            1 for v, r in zip(self.verdicts, self.finish_reasons, strict=True) if v is None and r in ("stop", "length")
        )

    @property
    def finished(self) -> int:
        """Rationales that ran to the end (the score's denominator)."""
        return sum(1 for r in self.finish_reasons if r in ("stop", "length"))


class GenerativeVerifier:
    """Scores a solution by the share of k sampled verification rationales that end in "Verdict: Yes".

    Args:
        engine: the verifier model's engine (it may be the policy's engine).
        k: rationales per verification, sampled in one request.
        temperature: sampling temperature (must be > 0 when k > 1: greedy samples are all the same).
        max_tokens: cap on each rationale's tokens.
        budget: when given, every call is charged to it (the engine is bound with `Budget.bind`).
        prompt: the user turn; must contain ``{problem}`` and ``{solution}``.
        system: an optional system turn.
        top_p: nucleus sampling mass.

    Raises:
        ConfigError: an invalid setting.
    """

    def __init__(
        self,
        engine: Engine,
        k: int = 4,
        temperature: float = 0.7,
        max_tokens: int = 512,
        *,
        budget: Budget | None = None,
        prompt: str = DEFAULT_VERIFY_PROMPT,
        system: str | None = None,
        top_p: float = 1.0,
    ) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"GenerativeVerifier: engine must be an Engine, got {type(engine).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"GenerativeVerifier: k must be an integer >= 1, got {k!r}")
        if temperature < 0 or (k > 1 and temperature == 0):
            raise ConfigError(
                f"GenerativeVerifier: temperature must be > 0 for k > 1 (>= 0 for k = 1), got {temperature}"
            )
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"GenerativeVerifier: max_tokens must be an integer >= 1, got {max_tokens!r}")
        if "{problem}" not in prompt or "{solution}" not in prompt:
            raise ConfigError("GenerativeVerifier: prompt must contain '{problem}' and '{solution}'")
        self.engine: Engine = engine if budget is None else budget.bind(engine)
        self.k = k
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.system = system
        self.top_p = top_p

    def request(self, problem: str, solution: str) -> GenerationRequest:
        """The verification request for one solution (k rationales in one request)."""
        values = {"problem": problem, "solution": solution}
        # One pass, so braces inside the problem or the solution (LaTeX) are never read as placeholders.
        user = _SLOT_RE.sub(lambda m: values[m.group(1)], self.prompt)
        messages = [ChatMessage("user", user)]
        if self.system:
            messages.insert(0, ChatMessage("system", self.system))
        return GenerationRequest(
            messages=tuple(messages),
            n=self.k,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
        )

    async def score(self, problem: str, solution: str) -> VerificationResult:
        """Sample k rationales on ``solution`` and score it by the share of "Verdict: Yes".

        Never raises `BudgetExhausted`: a call refused or cut by the budget gives a result marked
        ``budget_exhausted`` whose score covers the rationales that finished.
        """
        request = self.request(problem, solution)
        pieces: list[list[str]] = [[] for _ in range(self.k)]
        reasons: list[FinishReason] = ["abort"] * self.k
        usage: list[CallUsage] = []

        def record(req: GenerationRequest, call: CallUsage) -> None:
            if req is request:  # the engine may be serving other calls at the same time
                usage.append(call)

        remove = self.engine.add_usage_hook(record)
        exhausted = False
        try:
            async with contextlib.aclosing(self.engine.stream(request)) as deltas:
                async for delta in deltas:
                    pieces[delta.index].append(delta.text)
                    if delta.finish_reason is not None:
                        reasons[delta.index] = delta.finish_reason
        except BudgetExhausted:
            exhausted = True
        finally:
            remove()
        rationales = tuple("".join(p) for p in pieces)
        verdicts = tuple(
            parse_verdict(text) if reason in ("stop", "length") else None
            for text, reason in zip(rationales, reasons, strict=True)
        )
        finished = sum(1 for r in reasons if r in ("stop", "length"))
        yes = sum(1 for v in verdicts if v is True)
        result = VerificationResult(
            score=yes / finished if finished else 0.0,
            verdicts=verdicts,
            rationales=rationales,
            finish_reasons=tuple(reasons),
            usage=usage[-1] if usage else None,
            budget_exhausted=exhausted,
        )
        if result.unparsed:
            logger.debug("%d of %d verification rationales had no parseable verdict", result.unparsed, finished)
        return result

    async def __call__(self, problem: str, candidate: Solution) -> float:
        """The score of ``candidate``'s text, as a `best_of_n` scorer."""
        return (await self.score(problem, candidate.text)).score

    def __repr__(self) -> str:
        return f"GenerativeVerifier(engine={self.engine!r}, k={self.k}, temperature={self.temperature})"
