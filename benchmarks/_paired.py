"""What the benchmark scripts share: the order in which compared sides run in each round.

A shared, noisy machine changes speed while a benchmark runs, and an engine warms up (caches, prefix cache) as
it goes, so the side that always runs first or last would be favoured. Every script runs its sides in rounds,
in the order `alternating` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def alternating(sides: Sequence[T], round_index: int) -> list[T]:
    """``sides`` in their order for round ``round_index``: as given in even rounds, reversed in odd ones.

    A B, B A, A B, ... for two sides; for more, every side's mean position is the same over each pair of rounds.
    """
    return list(sides) if round_index % 2 == 0 else list(reversed(sides))
