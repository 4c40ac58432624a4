"""Estimated compute of generation: `CostModel` (FLOPs plus KV-cache traffic) and its presets."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ..errors import ConfigError, UnknownNameError

__all__ = ["DEFAULT_MEMORY_WEIGHT", "CostEstimate", "CostModel", "positive"]

DEFAULT_MEMORY_WEIGHT: Final = 300.0
"""FLOP-equivalents per byte of KV cache read, by default.

Decoding is memory-bound: while a byte is streamed from accelerator memory, the compute units could have done
``peak FLOP/s / memory bandwidth`` operations, the hardware's arithmetic intensity. For an H100 SXM that is
about 989e12 dense BF16 FLOP/s over 3.35e12 B/s, roughly 295, rounded to 300. Pass ``memory_weight`` to model
other hardware (a CPU's ratio is typically 5-20).
"""


def positive(name: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Estimated compute of some tokens.

    Attributes:
        flops: forward-pass FLOPs.
        kv_bytes: KV-cache bytes read while decoding.
        cost: ``flops + memory_weight * kv_bytes`` (FLOP-equivalents).
    """

    flops: float
    kv_bytes: float
    cost: float


@dataclass(frozen=True, slots=True)
class CostModel:
    """Estimated compute of generation: FLOPs plus KV-cache memory traffic, in FLOP-equivalents.

    - FLOPs: a forward pass costs about ``2 * parameters`` FLOPs per token, for prompt tokens (once per call,
      the n samples share the prefill) and for every completion token.
    - KV traffic: producing a sample's completion token k (1-based) attends over the ``P + k - 1`` positions
      before it (P prompt tokens), reading ``kv_bytes_per_token`` bytes for each, where ``kv_bytes_per_token =
      2 (K and V) * layers * kv_heads * head_dim * dtype_bytes``. A sample of T tokens reads
      ``kv_bytes_per_token * (T * P + T * (T - 1) / 2)``; n samples sharing a prompt each read the shared prompt
      KV plus their own tokens, so the traffic grows with context length times live samples (the argument of the
      Kinetics test-time scaling law). Prefill's own attention reads are not counted (prefill is compute-bound).
    - cost = ``flops + memory_weight * kv_bytes`` (see `DEFAULT_MEMORY_WEIGHT`).

    Attributes:
        parameters: model parameter count.
        kv_bytes_per_token: KV-cache bytes per token position over all layers.
        memory_weight: FLOP-equivalents per KV byte read.
        name: a label (the preset name, if any).
    """

    parameters: float
    kv_bytes_per_token: int
    memory_weight: float = DEFAULT_MEMORY_WEIGHT
    name: str = ""

    PRESETS: ClassVar[Mapping[str, tuple[float, int, int, int]]] = {
        "smollm2-135m-instruct": (135e6, 30, 3, 64),
        "qwen2.5-coder-0.5b-instruct": (494e6, 24, 2, 64),
    }
    """name -> (parameters, layers, kv_heads, head_dim); dtype is bf16 (2 bytes)."""

    def __post_init__(self) -> None:
        positive("CostModel parameters", self.parameters)
        positive("CostModel kv_bytes_per_token", self.kv_bytes_per_token, integer=True)
        if isinstance(self.memory_weight, bool) or not isinstance(self.memory_weight, (int, float)):
            raise ConfigError(f"CostModel memory_weight must be a number, got {self.memory_weight!r}")
        if not math.isfinite(self.memory_weight) or self.memory_weight < 0:
            raise ConfigError(f"CostModel memory_weight must be a finite number >= 0, got {self.memory_weight!r}")

    @classmethod
    def for_model(
        cls,
        parameters: float,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype_bytes: int = 2,
        *,
        memory_weight: float = DEFAULT_MEMORY_WEIGHT,
        name: str = "",
    ) -> CostModel:
        """A cost model from a transformer's shape.

        Args:
            parameters: parameter count.
            layers: transformer layers.
            kv_heads: key/value heads per layer (fewer than query heads with grouped-query attention).
            head_dim: dimension of one head.
            dtype_bytes: bytes per KV-cache element (2 for bf16/fp16, 1 for fp8).
            memory_weight: FLOP-equivalents per KV byte read.
            name: a label.
        """
        positive("parameters", parameters)
        for arg, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            positive(arg, value, integer=True)
        positive("dtype_bytes", dtype_bytes, integer=True)
        return cls(
            parameters=float(parameters),
            kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
            memory_weight=memory_weight,
            name=name,
        )

    @classmethod
    def preset(cls, name: str, *, memory_weight: float = DEFAULT_MEMORY_WEIGHT) -> CostModel:
        """The cost model of a known model (`PRESETS`); raises `UnknownNameError` for others."""
        key = name.strip().lower()
        if key not in cls.PRESETS:
            raise UnknownNameError("cost model preset", name, list(cls.PRESETS))
        parameters, layers, kv_heads, head_dim = cls.PRESETS[key]
        return cls.for_model(parameters, layers, kv_heads, head_dim, memory_weight=memory_weight, name=key)

    @classmethod
    def find(cls, model: str) -> CostModel | None:
        """The preset for ``model`` (a registry name, or a path/id ending in one), or None."""
        key = model.strip().lower().rstrip("/").rsplit("/", 1)[-1]
        return cls.preset(key) if key in cls.PRESETS else None

    # -- arithmetic -----------------------------------------------------------------------------------------
    def prompt_flops(self, prompt_tokens: int) -> float:
        """FLOPs of the prefill of ``prompt_tokens`` tokens."""
        return 2.0 * self.parameters * prompt_tokens

    def decode_flops(self, tokens: int) -> float:
        """FLOPs of producing ``tokens`` completion tokens."""
        return 2.0 * self.parameters * tokens

    def decode_kv_bytes(self, prompt_tokens: int, generated: int, new_tokens: int) -> int:
        """KV bytes read to produce a sample's next ``new_tokens`` tokens after ``generated`` ones."""
        m = new_tokens
        # sum over k = generated+1 .. generated+m of (P + k - 1)
        positions = m * (prompt_tokens + generated) + m * (m - 1) // 2
        return self.kv_bytes_per_token * positions

    def cost(self, flops: float, kv_bytes: float) -> float:
        """FLOP-equivalents of ``flops`` FLOPs and ``kv_bytes`` KV bytes read."""
        return flops + self.memory_weight * kv_bytes

    def estimate(self, prompt_tokens: int, completion_tokens: int | Sequence[int]) -> CostEstimate:
        """Estimated compute of one call.

        Args:
            prompt_tokens: prompt length (prefilled once for all samples).
            completion_tokens: the length of each sample (an int for a single sample).
        """
        lengths = [completion_tokens] if isinstance(completion_tokens, int) else list(completion_tokens)
        flops = self.prompt_flops(prompt_tokens) + self.decode_flops(sum(lengths))
        kv = sum(self.decode_kv_bytes(prompt_tokens, 0, t) for t in lengths)
        return CostEstimate(flops=flops, kv_bytes=float(kv), cost=self.cost(flops, kv))

    def max_tokens_within(self, cost: float, n: int = 1, prompt_tokens: int = 0) -> int:
        """The largest per-sample length T such that n samples of T tokens cost at most ``cost`` to decode."""
        if cost <= 0:
            return 0

        def spend(t: int) -> float:
            return n * self.cost(self.decode_flops(t), self.decode_kv_bytes(prompt_tokens, 0, t))

        a = n * self.memory_weight * self.kv_bytes_per_token / 2
        b = n * (2 * self.parameters + self.memory_weight * self.kv_bytes_per_token * (prompt_tokens - 0.5))
        guess = cost / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * cost)) / (2 * a)
        t = max(0, math.floor(guess))
        while t > 0 and spend(t) > cost:  # float rounding of the closed form
            t -= 1
        while spend(t + 1) <= cost:
            t += 1
        return t
