"""Graders: is a predicted answer right, and are two answers the same?

Every grader offers the `Grader` protocol, ``async grade(prediction, gold) -> GradeResult``, plus a
synchronous ``equivalent(a, b)`` that self-consistency uses to cluster sampled answers by meaning rather than
spelling ("1/2", "0.5" and ``\\frac{1}{2}`` land in one cluster). Gold may be one string or several accepted
answers (aliases); a prediction is right if it matches any of them. Predictions are *extracted* answers
(see `verifiers.extraction`), not whole generations; a None prediction ("no answer found") is always wrong.

- `NumericGrader`: numbers compared exactly, then within a relative/absolute tolerance; commas, fractions,
  currency and percent signs understood.
- `MathGrader`: symbolic equivalence with math-verify (LaTeX, fractions, equations, intervals, sets), after a
  fast numeric path that needs no worker. math-verify runs in a `TimeoutProcessPool` because its own
  signal-based timeouts only work on a main thread and cannot stop C-level work: a stuck item is killed with
  its worker process, counts as wrong with detail "timeout", and the worker is replaced.
- `QAGrader`: SQuAD-style normalised exact match and token F1 against every accepted answer.
- `YesNoGrader`: yes/no/true/false and (A)/(B) answers.

`get_grader(name)` builds one by name ("math", "numeric", "qa", "yesno"). The graders live in `grader_base`
(result, protocol, base class), `numeric`, `math_grader` and `text_graders`; this module gathers them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._processes import TimeoutProcessPool
from ..errors import ConfigError, GraderPoolError, UnknownNameError, WorkerCrashError
from .grader_base import BaseGrader, GoldAnswer, Grader, GradeResult
from .math_grader import MathGrader, close_default_pool, default_math_pool, init_math_worker, math_verify_equal
from .numeric import NumericGrader
from .text_graders import QAGrader, YesNoGrader, normalize_qa_answer, qa_exact_match, qa_f1

__all__ = [
    "BaseGrader",
    "GoldAnswer",
    "GradeResult",
    "Grader",
    "GraderPoolError",
    "MathGrader",
    "NumericGrader",
    "QAGrader",
    "TimeoutProcessPool",
    "WorkerCrashError",
    "YesNoGrader",
    "available_graders",
    "close_default_pool",
    "default_math_pool",
    "get_grader",
    "init_math_worker",
    "math_verify_equal",
    "normalize_qa_answer",
    "qa_exact_match",
    "qa_f1",
]


_GRADERS: dict[str, Callable[..., BaseGrader]] = {
    "math": MathGrader,
    "numeric": NumericGrader,
    "qa": QAGrader,
    "yesno": YesNoGrader,
}


def available_graders() -> tuple[str, ...]:
    """Names `get_grader` accepts."""
    return tuple(sorted(_GRADERS))


def get_grader(name: str, **options: Any) -> BaseGrader:
    """Build a grader by name ("math", "numeric", "qa", "yesno"), passing ``options`` to its constructor.

    Raises:
        UnknownNameError: no grader has that name (with "did you mean" suggestions).
        ConfigError: an option is invalid.
    """
    factory = _GRADERS.get(name)
    if factory is None:
        raise UnknownNameError("grader", name, list(_GRADERS))
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"invalid options for grader {name!r}: {err}") from err
