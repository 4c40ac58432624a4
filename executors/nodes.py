"""What the executor records and decides per node: `NodeResult`, the `RetryPolicy`, and thought strategy specs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from ..errors import BranchwiseError, BudgetExhausted, ConfigError, ToolArgumentError
from ..search import Strategy, get_strategy

__all__ = ["FailurePolicy", "NodeResult", "NodeStatus", "RetryPolicy", "ThoughtSpec", "resolve_strategy", "summarize"]

NodeStatus = Literal["pending", "running", "ok", "error", "skipped", "cancelled"]
FailurePolicy = Literal["fail_fast", "continue"]
ThoughtSpec: TypeAlias = Strategy | str | tuple[str, Mapping[str, Any]] | Mapping[str, Any] | None
"""A thought strategy: a `Strategy`, a name, ``(name, params)`` or ``{"strategy": name, **params}``; None: "single"."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often a node is tried and how long to wait between tries.

    Attributes:
        max_attempts: tries per node (1: no retry).
        backoff_s: wait before the second try; multiplied by ``multiplier`` for each further try.
        multiplier: backoff growth factor.
        retry_on: exception types worth retrying. Usage errors (`ConfigError`, e.g. a bad argument) and
            `BudgetExhausted` are never retried.
    """

    max_attempts: int = 1
    backoff_s: float = 0.0
    multiplier: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (BranchwiseError, TimeoutError, OSError)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if self.backoff_s < 0 or self.multiplier < 1:
            raise ConfigError("RetryPolicy.backoff_s must be >= 0 and multiplier >= 1")

    def retryable(self, err: BaseException) -> bool:
        if isinstance(err, (ConfigError, BudgetExhausted, ToolArgumentError)):
            return False
        return isinstance(err, self.retry_on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        return float(self.backoff_s * self.multiplier ** (attempt - 1))


@dataclass
class NodeResult:
    """What happened to one node.

    Attributes:
        id: the node id.
        kind: "tool", "thought" or "join".
        name: the tool name, "think" or "join".
        status: "pending", "running", "ok", "error", "skipped" (a dependency failed) or "cancelled".
        output: the node's output (a tool's return value; a thought's answer).
        error: the error message, when it failed or was skipped.
        error_type: the exception type name.
        attempts: tries made.
        started_at, ended_at: `time.perf_counter` stamps (None if it never started / ended).
        detail: extra results: a thought's strategy `Result`, the resolved arguments.
    """

    id: int
    kind: str
    name: str
    status: NodeStatus = "pending"
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        """Seconds from start to end (None until both are known)."""
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def observation(self, limit: int = 600) -> str:
        """The result as text for a prompt: the output, or the error."""
        if self.status == "ok":
            text = self.output if isinstance(self.output, str) else repr(self.output)
        else:
            text = f"ERROR ({self.error_type or self.status}): {self.error}"
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the output as text)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "output": summarize(self.output),
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "duration_s": self.duration_s,
        }


def summarize(value: Any, limit: int = 200) -> str:
    """A short text rendering of a node output for events and records."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_strategy(spec: ThoughtSpec) -> Strategy:
    """A search/ `Strategy` from a strategy, a name, ``(name, params)`` or ``{"strategy": name, **params}``.

    Raises:
        ConfigError: an unusable spec; UnknownNameError for an unknown strategy name.
    """
    if spec is None:
        return get_strategy("single")
    if isinstance(spec, Strategy):
        return spec
    if isinstance(spec, str):
        return get_strategy(spec)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        return get_strategy(spec[0], **dict(spec[1]))
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("strategy", None) or params.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(f"a thought spec mapping needs a 'strategy' name, got {dict(spec)!r}")
        return get_strategy(name, **params)
    raise ConfigError(f"cannot make a strategy from {spec!r}: give a Strategy, a name or {{'strategy': name, ...}}")
