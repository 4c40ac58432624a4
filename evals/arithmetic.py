"""Built-in arithmetic word problems: generated, seeded, reproducible, with exact integer answers.

Each problem is a short story of ``level`` arithmetic steps (1 = one operation, up to 5) over everyday
quantities. Levels make difficulty explicit, so accuracy can be broken down by it. The same seed and
arguments always give the same problems, on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["ArithmeticProblem", "arithmetic_problems"]

_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena", "Mira")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "shells", "cards", "coins", "stamps")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One generated word problem.

    Attributes:
        id: stable identifier (``arith-<seed>-<index>``).
        question: the problem text.
        answer: the exact answer, as a string of an integer.
        level: number of arithmetic steps (difficulty).
        steps: the worked solution, one line per step.
    """

    id: str
    question: str
    answer: str
    level: int
    steps: tuple[str, ...]


# A step takes (rng, current total, item) and returns (sentence with a {who} slot, new total, worked line).
_Step = Callable[[random.Random, int, str], tuple[str, int, str]]


def _buys(rng: random.Random, total: int, item: str) -> tuple[str, int, str]:
    k = rng.randint(2, 15)
    return f"Then {{who}} gets {k} more {item}.", total + k, f"{total} + {k} = {total + k}"


def _gives(rng: random.Random, total: int, item: str) -> tuple[str, int, str]:
    k = rng.randint(1, max(1, total - 1))
    return f"{{who}} gives away {k} {item}.", total - k, f"{total} - {k} = {total - k}"


def _multiplies(rng: random.Random, total: int, item: str) -> tuple[str, int, str]:
    k = rng.randint(2, 4)
    words = {2: "doubles", 3: "triples", 4: "quadruples"}
    return f"The number of {item} {words[k]}.", total * k, f"{total} x {k} = {total * k}"


def _shares(rng: random.Random, total: int, item: str) -> tuple[str, int, str]:
    divisors = [d for d in range(2, 7) if total % d == 0]
    if not divisors:
        return _buys(rng, total, item)
    d = rng.choice(divisors)
    sentence = f"{{who}} splits the {item} equally among {d} friends and keeps one share."
    return sentence, total // d, f"{total} / {d} = {total // d}"


def _boxes(rng: random.Random, total: int, item: str) -> tuple[str, int, str]:
    boxes, per_box = rng.randint(2, 5), rng.randint(2, 9)
    extra = boxes * per_box
    sentence = f"{{who}} buys {boxes} boxes with {per_box} {item} in each box."
    return sentence, total + extra, f"{total} + {boxes} x {per_box} = {total + extra}"


_STEPS: tuple[_Step, ...] = (_buys, _gives, _multiplies, _shares, _boxes)


def arithmetic_problems(
    count: int = 20, *, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3)
) -> list[ArithmeticProblem]:
    """Generate ``count`` problems, cycling through ``levels`` (each 1 to 5 steps).

    Raises:
        ConfigError: a non-positive count or a level outside 1..5.
    """
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    if not levels or any(not 1 <= lv <= 5 for lv in levels):
        raise ConfigError(f"levels must be a non-empty tuple of integers in 1..5, got {levels}")
    rng = random.Random(seed)
    problems = []
    for index in range(count):
        level = levels[index % len(levels)]
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        total = rng.randint(3, 30)
        sentences = [f"{name} has {total} {item}."]
        worked = []
        for _ in range(level):
            sentence, total, line = rng.choice(_STEPS)(rng, total, item)
            sentences.append(sentence.format(who=name))
            worked.append(line)
        sentences.append(f"How many {item} does {name} have now?")
        problems.append(
            ArithmeticProblem(
                id=f"arith-{seed}-{index}",
                question=" ".join(sentences),
                answer=str(total),
                level=level,
                steps=tuple(worked),
            )
        )
    return problems
