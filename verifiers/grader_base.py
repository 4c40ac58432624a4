"""What every grader shares: `GradeResult`, the `Grader` protocol, and `BaseGrader` (sync work, async wrappers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = ["NO_ANSWER", "BaseGrader", "GoldAnswer", "GradeResult", "Grader", "as_golds"]

GoldAnswer = str | Sequence[str]
"""One accepted answer, or several (any of them counts as a match)."""


@dataclass(frozen=True, slots=True)
class GradeResult:
    """The verdict on one prediction.

    Attributes:
        correct: whether the prediction is accepted.
        score: a graded score in [0, 1] (1/0 for exact graders, token F1 for QA).
        detail: how the verdict was reached ("numeric", "math-verify", "exact", "timeout", "no answer", ...).
    """

    correct: bool
    score: float
    detail: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ConfigError(f"GradeResult.score must be in [0, 1], got {self.score}")


@runtime_checkable
class Grader(Protocol):
    """What strategies and evals need from a grader."""

    name: str

    async def grade(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one extracted prediction against the gold answer(s) without blocking the event loop."""
        ...

    def equivalent(self, a: str, b: str) -> bool:
        """Whether two answers mean the same (used to cluster sampled answers)."""
        ...


def as_golds(gold: GoldAnswer) -> tuple[str, ...]:
    if isinstance(gold, str):
        return (gold,)
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):  # loaders often hand over raw numbers
        return (str(gold),)
    golds = tuple(str(g) for g in gold)
    if not golds:
        raise ConfigError("gold must be an answer or a non-empty list of accepted answers")
    return golds


NO_ANSWER = GradeResult(False, 0.0, "no answer")


class BaseGrader(ABC):
    """Shared plumbing: a synchronous `grade_sync` does the work; `grade` and `grade_many` wrap it.

    Graders whose work is cheap (microseconds) run it inline in `grade`; `MathGrader` overrides `grade` to
    await a worker process instead.
    """

    name: str = ""

    @abstractmethod
    def grade_sync(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one prediction, blocking the calling thread until done."""

    def equivalent(self, a: str, b: str) -> bool:
        """Whether ``b`` is accepted when ``a`` is the gold answer."""
        return self.grade_sync(b, a).correct

    async def grade(self, prediction: str | None, gold: GoldAnswer) -> GradeResult:
        """Grade one prediction (inline: cheap graders never block the loop for long)."""
        return self.grade_sync(prediction, gold)

    async def aequivalent(self, a: str, b: str) -> bool:
        """Async `equivalent`."""
        return (await self.grade(b, a)).correct

    def grade_many(self, pairs: Iterable[tuple[str | None, GoldAnswer]]) -> list[GradeResult]:
        """Grade many (prediction, gold) pairs, blocking; results in input order."""
        return [self.grade_sync(p, g) for p, g in pairs]

    def close(self) -> None:  # noqa: B027 - an optional hook, deliberately a no-op by default
        """Release resources held by the grader (nothing, for the cheap graders)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
