"""What a run has spent, `Usage` (live, mutable) and `UsageSnapshot` (frozen), and what it has left, `Remaining`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .cost import positive

__all__ = ["Remaining", "Usage", "UsageSnapshot", "capped", "smaller"]

_USAGE_FIELDS: Final = (
    "prompt_tokens",
    "completion_tokens",
    "calls",
    "wall_time_s",
    "aborted_tokens",
    "estimated_flops",
    "estimated_kv_bytes",
    "estimated_cost",
)


class _UsageFields:
    """Behaviour shared by `Usage` and `UsageSnapshot` (fields are declared by the dataclasses)."""

    __slots__ = ()

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, float | int]:
        """Every field, plus ``total_tokens``, as a plain dict (for JSON traces and reports)."""
        out: dict[str, float | int] = {name: getattr(self, name) for name in _USAGE_FIELDS}
        out["total_tokens"] = self.total_tokens
        return out

    def _summed(self, other: object) -> dict[str, Any] | None:
        if not isinstance(other, _UsageFields):
            return None
        return {name: getattr(self, name) + getattr(other, name) for name in _USAGE_FIELDS}


@dataclass(slots=True)
class Usage(_UsageFields):
    """What has been spent: a mutable accumulator (the live figures of a `Budget`).

    ``a + b`` adds every field (wall times add too, as for runs done one after another); `snapshot` gives a
    frozen copy to keep in results.

    Attributes:
        prompt_tokens: prompt tokens, once per call (n samples share their prompt).
        completion_tokens: generated tokens of all samples, aborted ones included.
        calls: engine calls admitted.
        wall_time_s: seconds since the budget started (its first call or `Budget.start`) until now, or until
            `Budget.stop`. Per budget, not summed over children.
        aborted_tokens: completion tokens of calls that were cancelled or aborted before they finished.
        estimated_flops: FLOPs by the call's `CostModel` (0 without one).
        estimated_kv_bytes: KV-cache bytes read while decoding, by the `CostModel`.
        estimated_cost: ``flops + memory_weight * kv_bytes``.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    wall_time_s: float = 0.0
    aborted_tokens: int = 0
    estimated_flops: float = 0.0
    estimated_kv_bytes: float = 0.0
    estimated_cost: float = 0.0

    def snapshot(self) -> UsageSnapshot:
        """A frozen copy of the current figures."""
        return UsageSnapshot(**{name: getattr(self, name) for name in _USAGE_FIELDS})

    def __add__(self, other: object) -> Usage:
        summed = self._summed(other)
        if summed is None:
            return NotImplemented
        return Usage(**summed)


@dataclass(frozen=True, slots=True)
class UsageSnapshot(_UsageFields):
    """A frozen copy of a `Usage` (same fields), as returned by `Usage.snapshot`; supports ``+``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    wall_time_s: float = 0.0
    aborted_tokens: int = 0
    estimated_flops: float = 0.0
    estimated_kv_bytes: float = 0.0
    estimated_cost: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UsageSnapshot:
        """The inverse of `to_dict` (``total_tokens`` and unknown keys are ignored)."""
        return cls(**{name: data[name] for name in _USAGE_FIELDS if name in data})

    def __add__(self, other: object) -> UsageSnapshot:
        summed = self._summed(other)
        if summed is None:
            return NotImplemented
        return UsageSnapshot(**summed)


@dataclass(frozen=True, slots=True)
class Remaining:
    """What a budget has left, counting its ancestors' caps too; None means uncapped.

    Attributes:
        tokens: total (prompt + completion) tokens.
        completion_tokens: completion tokens.
        calls: engine calls.
        seconds: wall-clock seconds.
        cost: estimated compute (FLOP-equivalents).
    """

    tokens: int | None
    completion_tokens: int | None
    calls: int | None
    seconds: float | None
    cost: float | None


N = TypeVar("N", int, float)


def capped(name: str, value: N | None, *, integer: bool) -> N | None:
    """A cap as given, after checking it is a positive (integer) number; None means uncapped."""
    if value is None:
        return None
    positive(name, value, integer=integer)
    return value


def smaller(a: N | None, b: N | None) -> N | None:
    """The smaller of two allowances, None meaning unlimited."""
    if a is None:
        return b
    return a if b is None else min(a, b)
