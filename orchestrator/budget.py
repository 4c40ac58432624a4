"""The compute `Budget`: hard caps on tokens, calls, wall clock and estimated compute, shared by a whole run.

Everything that runs under one budget (strategies, DAG nodes, nested strategies) calls its engine through a
`BudgetedEngine` bound to that budget, or to a `Budget.child` of it. Every call is admitted, clipped, metered and,
when a cap is reached, aborted inside the engine, by the same object, so the caps hold for the run as a whole:

```python
budget = Budget(max_completion_tokens=20_000, max_calls=40, wall_clock_s=120)
engine = budget.bind(raw_engine)              # or BudgetedEngine(raw_engine, budget)
node_engine = budget.child("node-3").bind(raw_engine)   # its own Usage, charged to the run's as well
```

What is counted, and when (per call):

- **calls**: when the call is admitted, before the engine sees it. The call that would exceed ``max_calls``
  raises `BudgetExhausted` instead; ``max_calls`` never aborts running calls.
- **completion tokens** (and their FLOPs, KV-cache traffic and cost): when the engine delivers a `Delta`,
  synchronously, before the delta is handed to the consumer. A background task per call pulls deltas from the
  engine as soon as they are produced, so charging does not wait for a slow consumer.
- **prompt tokens** (and their FLOPs): as soon as the backend reports them, which is checked at each delivered
  delta (vLLM and the test engines report them before the first delta), otherwise when the call ends (e.g. an
  HTTP backend that sends usage last, or a call aborted before its first delta). The KV-cache traffic of
  completion tokens charged before the prompt length was known is corrected at that moment.
- **aborted tokens**: when a call ends without finishing (cancelled or closed by its consumer, or aborted by
  the budget), its completion tokens are added to ``aborted_tokens`` (they stay in ``completion_tokens``).
  Calls that fail with an engine error are not counted as aborted.

Admission: a call is refused (`BudgetExhausted`, the engine is not called) once any cap of its budget or of an
ancestor has been reached. Otherwise its per-sample ``max_tokens`` is clipped to what remains: for ``n``
samples, ``min(max_tokens, allowance // n)`` but at least 1, where ``allowance`` is the smallest remaining
completion-token or total-token allowance along the budget chain; with a cost cap, also to the most tokens per
sample the remaining cost could pay for (a lower-bound cost, since the prompt length is not known yet).
`Budget.clipped_calls` counts the calls clipped this way; a sample that then stops for "length" short of the
``max_tokens`` it asked for was cut by the budget, and strategies mark their result ``budget_exhausted`` even
when no cap was reached (n samples sharing what is left each get ``allowance // n``).

Exhaustion: a cap is *reached* when usage >= cap (calls, tokens, cost) or the deadline has passed. Reaching a
token, cost or wall-clock cap aborts, at once, every in-flight call under that budget (its descendants
included) that still has an unfinished sample: the call's engine task is cancelled, which closes the backend's
stream and so aborts the request inside the engine, and its consumer gets `BudgetExhausted` at its next read
(immediately if it is waiting), even if deltas are still buffered. A call whose samples have all delivered their
final delta is complete and is not aborted. The wall clock is enforced by a ``loop.call_later`` timer, armed
only while calls are in flight, that fires the abort at the deadline; nothing polls.

Guarantee (for every budget in a tree, and each of its caps). Charges are made synchronously as deltas arrive
and the caps are checked right after every charge; when a cap is crossed, every other affected call is cancelled
before any task runs again (a cancelled task never receives the delta it was about to get) and the crossing
call stops pulling, so no delta of an aborted call is received, let alone charged, after the crossing:

- ``usage.completion_tokens <= max_completion_tokens + d - 1``, where ``d`` is the token count of the one delta
  whose charge crossed the cap. With one token per delta (the test engines; vLLM while the loop keeps up with
  its output, since it merges steps into one delta only when they pile up) the cap is never exceeded at all.
  Tokens a backend computed but never delivered because of the abort are not counted (the engine's own usage
  hooks do not count them either).
- ``usage.total_tokens <= max_tokens + d - 1 + p + q``: as above, plus ``p``, the prompt charged in the crossing
  step (when that delta was its call's first), plus ``q``, the prompts of aborted calls whose backend had
  counted their prompt but that had not delivered a delta yet (charged when they end, because that compute was
  spent).
- ``usage.estimated_cost <= max_cost + c + r``: ``c`` is the cost charged in the crossing step (one delta, plus
  its call's prompt when charged in that step), ``r`` the prompt cost of aborted calls as in ``q``.
- ``usage.calls <= max_calls`` exactly.
- wall clock: no call is admitted after the deadline, and every in-flight call is aborted when the timer fires
  (the first loop iteration at or after the deadline); no delta is charged to an aborted call after that.

These bounds assume backends honour the `Engine` contract: nothing is yielded for a sample after its final
delta, and a cancelled stream yields nothing more.

Threading: all budget state changes happen on the event loop thread (admission, charging, timers); there are no
awaits between a check and its charge, so no locks are needed. Do not share a budget across event loops that
run at the same time; using it from one loop after another is fine. `Budget.start` may be called from
synchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Final

from ..engine.base import CallMeter, Engine
from ..engine.types import Capabilities, Delta, GenerationRequest
from ..errors import BudgetExhausted, ConfigError, UnknownNameError

__all__ = [
    "DEFAULT_MEMORY_WEIGHT",
    "Budget",
    "BudgetedEngine",
    "CostEstimate",
    "CostModel",
    "Remaining",
    "Usage",
    "UsageSnapshot",
]

logger = logging.getLogger(__name__)

# Caps whose reaching aborts the calls in flight (max_calls only refuses new calls).
_ABORTING_CAPS: Final = frozenset({"max_tokens", "max_completion_tokens", "max_cost", "wall_clock_s"})

DEFAULT_MEMORY_WEIGHT: Final = 300.0
"""FLOP-equivalents per byte of KV cache read, by default.

Decoding is memory-bound: while a byte is streamed from accelerator memory, the compute units could have done
``peak FLOP/s / memory bandwidth`` operations, the hardware's arithmetic intensity. For an H100 SXM that is
about 989e12 dense BF16 FLOP/s over 3.35e12 B/s, roughly 295, rounded to 300. Pass ``memory_weight`` to model
other hardware (a CPU's ratio is typically 5-20).
"""


# ---------------------------------------------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------------------------
def _positive(name: str, value: Any, *, integer: bool = False) -> None:
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
        _positive("CostModel parameters", self.parameters)
        _positive("CostModel kv_bytes_per_token", self.kv_bytes_per_token, integer=True)
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
        _positive("parameters", parameters)
        for arg, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            _positive(arg, value, integer=True)
        _positive("dtype_bytes", dtype_bytes, integer=True)
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


# ---------------------------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------------------------
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


def _cap(name: str, value: Any, *, integer: bool) -> Any:
    if value is None:
        return None
    _positive(name, value, integer=integer)
    return value


def _min(a: Any, b: Any) -> Any:
    if a is None:
        return b
    return a if b is None else min(a, b)


class Budget:
    """Hard caps on what a run may spend, shared by everything that runs under it.

    See the module documentation for what is counted when, how calls are clipped and aborted, and the exact
    guarantee. A budget with no caps is valid: it only meters.

    Args:
        max_tokens: cap on prompt plus completion tokens.
        max_completion_tokens: cap on generated tokens.
        max_calls: cap on engine calls.
        wall_clock_s: seconds from the budget's start (its first call, or `start`) to its deadline.
        max_cost: cap on estimated compute (FLOP-equivalents, see `CostModel`); needs a cost model, from
            ``cost_model`` here or on an ancestor, given to `bind`, or a preset matching the engine's model.
        cost_model: the `CostModel` (or a preset name) for calls under this budget, unless a binding gives one.
        name: a label; a child's `path` joins the names from the root.

    Attributes:
        name: the label.
        parent: the budget this is a child of, or None for a root.
        children: the children, in creation order.
    """

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        max_calls: int | None = None,
        wall_clock_s: float | None = None,
        max_cost: float | None = None,
        cost_model: CostModel | str | None = None,
        name: str = "run",
    ) -> None:
        self.max_tokens: int | None = _cap("max_tokens", max_tokens, integer=True)
        self.max_completion_tokens: int | None = _cap("max_completion_tokens", max_completion_tokens, integer=True)
        self.max_calls: int | None = _cap("max_calls", max_calls, integer=True)
        self.wall_clock_s: float | None = _cap("wall_clock_s", wall_clock_s, integer=False)
        self.max_cost: float | None = _cap("max_cost", max_cost, integer=False)
        if isinstance(cost_model, str):
            cost_model = CostModel.preset(cost_model)
        elif cost_model is not None and not isinstance(cost_model, CostModel):
            raise ConfigError(f"cost_model must be a CostModel or a preset name, got {cost_model!r}")
        self.cost_model: CostModel | None = cost_model
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.parent: Budget | None = None
        self.children: list[Budget] = []
        self._chain: tuple[Budget, ...] = (self,)
        self._usage = Usage()
        self._inflight: set[_Call] = set()
        self._exhausted_cap: str | None = None
        self._clipped_calls = 0
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []

    def add_listener(self, listener: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        """Observe this budget: ``listener(kind, data)`` gets a "budget_charge" event when a call under it
        (or a descendant) leaves the engine, and "budget_exhausted" when one of its caps is reached.

        Returns:
            A function that removes the listener.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, data)
            except Exception:  # an observer must not break metering
                logger.exception("budget listener %r failed", listener)

    # -- tree ---------------------------------------------------------------------------------------------------
    def child(
        self,
        name: str,
        *,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        max_calls: int | None = None,
        wall_clock_s: float | None = None,
        max_cost: float | None = None,
        cost_model: CostModel | str | None = None,
    ) -> Budget:
        """A budget for a part of the run (a DAG node, a nested strategy) with its own `Usage`.

        Everything charged to the child is charged to this budget (and its ancestors) too, and the child obeys
        their caps: reaching a cap here aborts the child's calls as well. The child's own caps, if given, apply
        to it (and its descendants) only; its wall clock starts at its own first call. Without a cost model of
        its own it uses its ancestors'.
        """
        kid = Budget(
            max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens,
            max_calls=max_calls,
            wall_clock_s=wall_clock_s,
            max_cost=max_cost,
            cost_model=cost_model,
            name=name,
        )
        kid.parent = self
        kid._chain = (kid, *self._chain)
        self.children.append(kid)
        return kid

    @property
    def path(self) -> str:
        """The names from the root to this budget, joined by "/"."""
        return "/".join(b.name for b in reversed(self._chain))

    def bind(self, engine: Engine, *, cost_model: CostModel | None = None) -> BudgetedEngine:
        """``BudgetedEngine(engine, self, cost_model=cost_model)``: ``engine`` with every call under this budget."""
        return BudgetedEngine(engine, self, cost_model=cost_model)

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def usage(self) -> Usage:
        """The live total of everything charged to this budget and its descendants."""
        self._usage.wall_time_s = self.elapsed
        return self._usage

    @property
    def elapsed(self) -> float:
        """Seconds since the budget started (0 before), up to now or to `stop`."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return end - self._started_at

    @property
    def in_flight(self) -> int:
        """Calls running under this budget (its descendants' included)."""
        return len(self._inflight)

    @property
    def clipped_calls(self) -> int:
        """Calls under this budget (its descendants' included) whose ``max_tokens`` a cap lowered at admission.

        A sample of such a call that stops for "length" before the ``max_tokens`` it asked for was cut short by
        the budget, even if no cap was reached when it ended (with ``n`` samples each gets ``allowance // n``).
        """
        return self._clipped_calls

    @property
    def exhausted(self) -> bool:
        """True once a cap of this budget or of an ancestor has been reached."""
        return self.exhausted_cap is not None

    @property
    def exhausted_cap(self) -> str | None:
        """The cap reached ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s", "max_cost").

        The first cap reached, looking at this budget before its ancestors; None if none was.
        """
        for b in self._chain:
            if b._exhausted_cap is not None:
                return b._exhausted_cap
            if b._past_deadline():
                return "wall_clock_s"
        return None

    def remaining(self) -> Remaining:
        """What is left before a cap of this budget or an ancestor is reached (never negative)."""
        tokens = completion = calls = None
        seconds = cost = None
        for b in self._chain:
            u = b._usage
            if b.max_tokens is not None:
                tokens = _min(tokens, max(0, b.max_tokens - u.total_tokens))
            if b.max_completion_tokens is not None:
                completion = _min(completion, max(0, b.max_completion_tokens - u.completion_tokens))
            if b.max_calls is not None:
                calls = _min(calls, max(0, b.max_calls - u.calls))
            if b.wall_clock_s is not None:
                seconds = _min(seconds, max(0.0, b.wall_clock_s - b.elapsed))
            if b.max_cost is not None:
                cost = _min(cost, max(0.0, b.max_cost - u.estimated_cost))
        return Remaining(tokens=tokens, completion_tokens=completion, calls=calls, seconds=seconds, cost=cost)

    def start(self) -> None:
        """Start the wall clock of this budget and its ancestors now (otherwise their first call does). Idempotent."""
        now = time.monotonic()
        for b in self._chain:
            if b._started_at is None:
                b._started_at = now

    def stop(self) -> None:
        """Freeze this budget's wall clock (``wall_time_s``) and drop its timer: the run it meters is over.

        Calls made afterwards are still admitted and metered against the other caps; the wall-clock cap no
        longer applies.
        """
        if self._started_at is None:
            self._started_at = time.monotonic()
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._disarm()

    def __repr__(self) -> str:
        caps = {
            k: v
            for k, v in (
                ("max_tokens", self.max_tokens),
                ("max_completion_tokens", self.max_completion_tokens),
                ("max_calls", self.max_calls),
                ("wall_clock_s", self.wall_clock_s),
                ("max_cost", self.max_cost),
            )
            if v is not None
        }
        inner = ", ".join(f"{k}={v}" for k, v in caps.items())
        return f"Budget({self.path!r}{', ' if inner else ''}{inner})"

    # -- internals: the chain of budgets a call is charged to ---------------------------------------------------
    def _resolve_cost_model(self) -> CostModel | None:
        for b in self._chain:
            if b.cost_model is not None:
                return b.cost_model
        return None

    def _past_deadline(self, now: float | None = None) -> bool:
        if self.wall_clock_s is None or self._started_at is None or self._stopped_at is not None:
            return False
        return (time.monotonic() if now is None else now) - self._started_at >= self.wall_clock_s

    def _blocking_cap(self, now: float) -> str | None:
        """The cap of this budget (not its ancestors) that forbids a new call, if any."""
        if self._exhausted_cap is not None:
            return self._exhausted_cap
        if self._past_deadline(now):
            return "wall_clock_s"
        u = self._usage
        if self.max_calls is not None and u.calls >= self.max_calls:
            return "max_calls"
        if self.max_tokens is not None and u.total_tokens >= self.max_tokens:
            return "max_tokens"
        if self.max_completion_tokens is not None and u.completion_tokens >= self.max_completion_tokens:
            return "max_completion_tokens"
        if self.max_cost is not None and u.estimated_cost >= self.max_cost:
            return "max_cost"
        return None

    def _reached_cap(self) -> str | None:
        """The token or cost cap this budget has reached, if any (checked after every charge)."""
        u = self._usage
        if self.max_completion_tokens is not None and u.completion_tokens >= self.max_completion_tokens:
            return "max_completion_tokens"
        if self.max_tokens is not None and u.total_tokens >= self.max_tokens:
            return "max_tokens"
        if self.max_cost is not None and u.estimated_cost >= self.max_cost:
            return "max_cost"
        return None

    def _describe(self, cap: str) -> str:
        u = self._usage
        if cap == "max_tokens":
            figures = f"{u.total_tokens} of {self.max_tokens} tokens"
        elif cap == "max_completion_tokens":
            figures = f"{u.completion_tokens} of {self.max_completion_tokens} completion tokens"
        elif cap == "max_calls":
            figures = f"{u.calls} of {self.max_calls} calls"
        elif cap == "wall_clock_s":
            figures = f"{self.elapsed:.3f} of {self.wall_clock_s} s"
        else:
            figures = f"{u.estimated_cost:.4g} of {self.max_cost} estimated cost"
        return f"budget {self.path!r} exhausted: {cap} ({figures})"

    def _error(self, cap: str) -> BudgetExhausted:
        return BudgetExhausted(cap, self._describe(cap))

    def _exhaust(self, cap: str) -> None:
        """Record that ``cap`` was reached; for token, cost and time caps, abort the unfinished calls in flight."""
        if self._exhausted_cap is None:
            self._exhausted_cap = cap
            logger.info("%s", self._describe(cap))
            if self._listeners:
                self._notify("budget_exhausted", {"budget": self.path, "cap": cap, "detail": self._describe(cap)})
        if cap not in _ABORTING_CAPS:
            return
        for call in list(self._inflight):
            if call.unfinished and call.abort is None and not call.done:
                call.abort_by(self, cap)

    def _arm(self) -> None:
        if self.wall_clock_s is None or self._timer is not None or self._stopped_at is not None:
            return
        assert self._started_at is not None
        delay = self._started_at + self.wall_clock_s - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_deadline(self) -> None:
        self._timer = None
        if self._stopped_at is None:
            self._exhaust("wall_clock_s")

    # -- internals: admission and charging (synchronous: no awaits between check and charge) --------------------
    def _admit(self, request: GenerationRequest, cost_model: CostModel | None) -> _Call:
        chain = self._chain
        now = time.monotonic()
        for b in chain:
            if b._started_at is None:
                b._started_at = now
        for b in chain:
            cap = b._blocking_cap(now)
            if cap is not None:
                b._exhaust(cap)
                raise b._error(cap)
        n = request.n
        left = self.remaining()
        per_sample = request.max_tokens
        allowance = _min(left.tokens, left.completion_tokens)
        if allowance is not None:
            per_sample = min(per_sample, max(1, allowance // n))
        if left.cost is not None and cost_model is not None:
            per_sample = min(per_sample, max(1, cost_model.max_tokens_within(left.cost, n)))
        if per_sample < request.max_tokens:
            request = request.replace(max_tokens=per_sample, min_tokens=min(request.min_tokens, per_sample))
            for b in chain:
                b._clipped_calls += 1
        call = _Call(chain, request, cost_model)
        for b in chain:
            b._usage.calls += 1
            b._inflight.add(call)
            b._arm()
        for b in chain:
            if b.max_calls is not None and b._usage.calls >= b.max_calls:
                b._exhaust("max_calls")
        return call

    def _charge_prompt(self, call: _Call) -> None:
        p = call.meter.prompt_tokens
        call.prompt_charged = True
        flops = kv = 0.0
        model = call.cost_model
        if model is not None:
            flops = model.prompt_flops(p)
            # completion tokens charged before the prompt length was known were charged with P = 0
            kv = float(model.kv_bytes_per_token * p * call.completion_tokens)
        cost = model.cost(flops, kv) if model is not None else 0.0
        for b in call.chain:
            u = b._usage
            u.prompt_tokens += p
            u.estimated_flops += flops
            u.estimated_kv_bytes += kv
            u.estimated_cost += cost

    def _charge(self, call: _Call, delta: Delta) -> None:
        """Charge one delivered delta (and the prompt, once known) to the chain, then enforce the caps."""
        if not call.prompt_charged and call.meter.prompt_tokens:
            self._charge_prompt(call)
        m = len(delta.token_ids)
        i = delta.index
        known = 0 <= i < len(call.sample_tokens)
        if m:
            generated = call.sample_tokens[i] if known else 0
            if known:
                call.sample_tokens[i] = generated + m
            call.completion_tokens += m
            model = call.cost_model
            flops = kv = cost = 0.0
            if model is not None:
                prompt = call.meter.prompt_tokens if call.prompt_charged else 0
                flops = model.decode_flops(m)
                kv = float(model.decode_kv_bytes(prompt, generated, m))
                cost = model.cost(flops, kv)
            for b in call.chain:
                u = b._usage
                u.completion_tokens += m
                u.estimated_flops += flops
                u.estimated_kv_bytes += kv
                u.estimated_cost += cost
        if delta.finish_reason is not None and known and not call.finished[i]:
            call.finished[i] = True
            call.unfinished -= 1
        self._enforce(call.chain)

    @staticmethod
    def _enforce(chain: tuple[Budget, ...]) -> None:
        for b in chain:
            cap = b._reached_cap()
            if cap is not None:
                b._exhaust(cap)

    def _settle(self, call: _Call, *, aborted: bool) -> None:
        """The call has left the engine: unregister it, charge a prompt reported late, count aborted tokens."""
        if call.settled:
            return
        call.settled = True
        for b in call.chain:
            b._inflight.discard(call)
            if not b._inflight:
                b._disarm()
        if aborted and call.completion_tokens:
            for b in call.chain:
                b._usage.aborted_tokens += call.completion_tokens
        if not call.prompt_charged and call.meter.prompt_tokens:
            self._charge_prompt(call)
            self._enforce(call.chain)
        for b in call.chain:
            if b._listeners:
                b._notify(
                    "budget_charge",
                    {
                        "budget": b.path,
                        "prompt_tokens": call.meter.prompt_tokens,
                        "completion_tokens": call.completion_tokens,
                        "aborted": aborted,
                        "usage": b.usage.to_dict(),
                        "remaining": {k: v for k, v in asdict(b.remaining()).items() if v is not None},
                    },
                )


class _Call:
    """One engine call in flight under a budget: its accounting, its engine task and its delivery buffer."""

    __slots__ = (
        "abort",
        "buffer",
        "chain",
        "completed",
        "completion_tokens",
        "cost_model",
        "done",
        "error",
        "finished",
        "meter",
        "prompt_charged",
        "request",
        "sample_tokens",
        "settled",
        "task",
        "unfinished",
        "waiter",
    )

    def __init__(self, chain: tuple[Budget, ...], request: GenerationRequest, cost_model: CostModel | None) -> None:
        self.chain = chain
        self.request = request
        self.cost_model = cost_model
        self.meter = CallMeter()
        self.prompt_charged = False
        self.sample_tokens = [0] * request.n
        self.finished = [False] * request.n
        self.unfinished = request.n
        self.completion_tokens = 0
        self.buffer: deque[Delta] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.abort: BudgetExhausted | None = None
        self.error: Exception | None = None
        self.done = False
        self.completed = False
        self.settled = False

    def abort_by(self, budget: Budget, cap: str) -> None:
        self.abort = budget._error(cap)
        task = self.task
        # The call whose own charge crossed the cap is running right now: it stops pulling by itself. Cancelling
        # it too would interrupt the backend's own clean-up awaits (e.g. vLLM's abort) in its aclose.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class BudgetedEngine(Engine):
    """An `Engine` whose every call runs under a `Budget`: admitted, clipped, metered and abortable.

    ``capabilities``, ``model`` and ``backend`` are the wrapped engine's. Each call's request is admitted and
    clipped by the budget, then the wrapped engine's stream runs in a task owned by the call, which charges
    every delta as it arrives and hands it to the consumer; the budget cancels that task to abort the call.
    `generate` collects the stream (the base class default), so it is metered the same way. The wrapped
    engine's usage hooks still see every call (with the clipped request); this wrapper's own hooks see the
    caller's request.

    Wrapping an engine already bound to this budget or to one of its ancestors re-binds the underlying engine
    instead of charging twice. `aclose` does not close the wrapped engine, which may be shared.

    Args:
        engine: the engine to wrap.
        budget: the budget every call runs under.
        cost_model: how to estimate compute for this engine; by default the budget's (or its ancestors'),
            else the preset matching the engine's model name, else none (compute is then not estimated).

    Raises:
        ConfigError: the budget (or an ancestor) caps cost but no cost model is known for this engine, or the
            engine is bound to a budget of the same tree that is not an ancestor of ``budget``.
    """

    engine: Engine
    budget: Budget
    cost_model: CostModel | None
    _own_cost_model: CostModel | None

    def __init__(self, engine: Engine, budget: Budget, *, cost_model: CostModel | None = None) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must be an Engine, got {type(engine).__name__}")
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget must be a Budget, got {type(budget).__name__}")
        if isinstance(engine, BudgetedEngine) and engine.budget._chain[-1] is budget._chain[-1]:
            if engine.budget not in budget._chain:
                raise ConfigError(
                    f"engine is already bound to budget {engine.budget.path!r}, which is not an ancestor of "
                    f"{budget.path!r}; bind the unwrapped engine instead"
                )
            cost_model = cost_model or engine._own_cost_model
            engine = engine.engine
        self.engine = engine
        self.budget = budget
        self._own_cost_model = cost_model
        super().__init__(model=engine.model)
        self.backend = engine.backend
        self.cost_model = cost_model or budget._resolve_cost_model() or CostModel.find(engine.model)
        if self.cost_model is None and any(b.max_cost is not None for b in budget._chain):
            raise ConfigError(
                f"max_cost of budget {budget.path!r} needs a cost model for engine model {engine.model!r}: pass "
                f"cost_model= to the Budget or to bind() (presets: {', '.join(CostModel.PRESETS)})"
            )

    @property
    def model(self) -> str:
        return self.engine.model

    @model.setter
    def model(self, value: str) -> None:
        # Engine.__init__ assigns it; the wrapped engine's name always wins.
        pass

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    async def start(self) -> None:
        await self.engine.start()

    async def aclose(self) -> None:
        """Nothing to release: the wrapped engine is not closed (it may be shared)."""

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        budget = self.budget
        call = budget._admit(request, self.cost_model)  # raises BudgetExhausted before the engine is called
        try:
            call.task = asyncio.get_running_loop().create_task(self._pump(call), name=f"budgeted-call[{budget.path}]")
            while True:
                if call.abort is not None:
                    raise BudgetExhausted(call.abort.cap, str(call.abort))
                if call.buffer:
                    delta = call.buffer.popleft()
                    meter.prompt_tokens = call.meter.prompt_tokens
                    yield delta
                    continue
                if call.done:
                    if call.error is not None:
                        raise call.error
                    break
                await call.wait()
        finally:
            await self._close(call)
            meter.prompt_tokens = call.meter.prompt_tokens

    async def _close(self, call: _Call) -> None:
        task = call.task
        if task is not None and not task.done():
            task.cancel()
            # Wait for the abort to reach the engine even if we are cancelled meanwhile, then pass that on.
            interrupted = False
            while not task.done():
                try:
                    await asyncio.wait((task,))
                except asyncio.CancelledError:
                    interrupted = True
            if interrupted:
                raise asyncio.CancelledError
        # A task cancelled before it ran never got to settle (and the engine never saw the call).
        self.budget._settle(call, aborted=not call.completed and call.error is None)

    async def _pump(self, call: _Call) -> None:
        """Pull the wrapped engine's deltas as soon as they exist, charge them, and buffer them for the consumer."""
        inner, request, meter = self.engine, call.request, call.meter
        try:
            try:
                # Our own meter lets us see the prompt length as soon as the backend knows it; we report to
                # the wrapped engine's usage hooks ourselves.
                async with contextlib.aclosing(inner._metered(request, meter)) as deltas:
                    async for delta in deltas:
                        call.buffer.append(delta)
                        self.budget._charge(call, delta)
                        call.wake()
                        if call.abort is not None:
                            break
            except Exception as err:
                inner._report(request, meter, err)
                call.error = err
                return
            except BaseException as err:  # cancelled by the budget or by the consumer going away
                inner._report(request, meter, err)
                raise
            if call.abort is not None:
                inner._emit(request, meter.usage(request, aborted=True))
            else:
                call.completed = True
                inner._emit(request, meter.usage(request))
        finally:
            call.done = True
            self.budget._settle(call, aborted=not call.completed and call.error is None)
            call.wake()

    def __repr__(self) -> str:
        return f"BudgetedEngine({self.engine!r}, {self.budget!r})"
