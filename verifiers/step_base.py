"""The `StepScorer` interface (process reward: a score for every step of a partial solution) and `aggregate`.

Backends: `GenerativeJudgeScorer` and `ScriptedStepScorer` (`verifiers.step_scorers`), and vLLM pooling PRMs
(`verifiers.prm`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

from ..budget import Budget
from ..engine.base import Engine
from ..errors import ConfigError

__all__ = ["AGGREGATES", "Aggregate", "StepScorer", "aggregate", "check_score", "check_steps"]

Aggregate = Literal["last", "min", "prod", "mean"]
AGGREGATES: tuple[Aggregate, ...] = ("last", "min", "prod", "mean")


def aggregate(scores: Sequence[float], how: Aggregate = "last") -> float:
    """Fold a path's step scores into one score.

    Args:
        scores: per-step scores in [0, 1], first step first.
        how: "last" (the newest step's score; for PRMs trained to predict the outcome), "min" (a chain is as
            good as its weakest step), "prod" (all steps right, if independent) or "mean".

    Raises:
        ConfigError: ``scores`` is empty or ``how`` is unknown.
    """
    if how not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if not scores:
        raise ConfigError("cannot aggregate an empty list of step scores")
    if how == "last":
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if how == "prod":
        return float(math.prod(scores))
    return float(sum(scores) / len(scores))


def check_steps(steps: Sequence[str]) -> tuple[str, ...]:
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise ConfigError("steps must be a sequence of strings (one per step), not a single string")
    if not steps:
        raise ConfigError("steps must not be empty")
    if not all(isinstance(s, str) for s in steps):
        raise ConfigError("every step must be a string")
    return tuple(steps)


def check_score(value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source} returned {value!r}; a step score must be a finite number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{source} returned {value!r}; a step score must be in [0, 1]")
    return float(value)


class StepScorer(ABC):
    """Scores the steps of a partial solution; higher is better, every score in [0, 1]."""

    name: ClassVar[str] = "step_scorer"

    @abstractmethod
    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        """A score for every step prefix: element i scores step i given ``steps[:i + 1]``.

        Raises:
            ConfigError: ``steps`` is empty or not a sequence of strings.
        """

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        """The score of the newest step only (what a step-level search needs after each expansion).

        The default scores every prefix and keeps the last; backends that pay per prefix override it.
        """
        return (await self.score(problem, check_steps(steps)))[-1]

    def bind(self, engine: Engine, budget: Budget | None) -> StepScorer:
        """The scorer as a strategy uses it: model calls charged to ``budget``.

        Args:
            engine: the strategy's policy engine, for scorers told to judge with it.
            budget: the run's budget.

        The default returns the scorer itself (it makes no engine calls).
        """
        return self

    async def aclose(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release the scorer's resources (clients, engines it started). Idempotent."""
