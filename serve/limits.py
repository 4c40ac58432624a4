"""What a server lets one request ask for, and how many runs it takes on at once (`ServerLimits`), with the check
of a pipeline spec against them (`spec_over_limits`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError, UnknownNameError
from ..orchestrator.spec import PipelineSpec
from ..search.base import Strategy
from ..search.registry import strategy_info

__all__ = ["ServerLimits", "spec_over_limits"]


@dataclass(frozen=True)
class ServerLimits:
    """A server's bounds. Pipelines loaded at startup must fit them (the budget caps they leave unset are filled
    in); a request asking for more is refused with 400, one arriving when too many are running or waiting with 429.

    Attributes:
        max_tokens: token cap per trace (``thought.max_tokens``); a request's ``max_tokens`` is clipped to it.
        max_run_tokens: tokens (prompt + completion) one run may spend (``budget.max_tokens``).
        max_run_seconds: wall clock of one run (``budget.wall_clock_s``).
        max_samples: traces a run's strategy may start (its fan-out: ``thought.n``, a beam's width x expansions).
        max_body_bytes: size of a request body (413 beyond it).
        max_query_chars: characters in a request's messages together.
        max_concurrent_runs: runs at once, over all clients.
        max_queued: requests waiting for a run slot; one more gets 429 with ``Retry-After``.
        max_runs_per_key: runs running or waiting for one API key (all clients share one key when no keys are set).
        drain_timeout_s: after SIGTERM or Ctrl-C, seconds in-flight runs get to finish before they are cancelled.
        max_traces: run traces kept in the trace folder (and served by ``/v1/traces``); the oldest run's is deleted
            when a run beyond it starts, so the folder's size is bounded.
        keepalive_s: seconds between SSE comments on a stream whose run is still working (keeps proxies from timing
            out the connection, and finds a client that left).
    """

    max_tokens: int = 4096
    max_run_tokens: int = 200_000
    max_run_seconds: float = 600.0
    max_samples: int = 64
    max_body_bytes: int = 1_000_000
    max_query_chars: int = 100_000
    max_concurrent_runs: int = 4
    max_queued: int = 32
    max_runs_per_key: int = 8
    drain_timeout_s: float = 30.0
    max_traces: int = 10_000
    keepalive_s: float = 15.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "max_queued" else 1 if f.type == "int" else 0.001
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise ConfigError(f"server limit {f.name} must be a number >= {low}, got {value!r}")


def spec_over_limits(spec: PipelineSpec, strategy: Strategy, limits: ServerLimits) -> tuple[str, str] | None:
    """The first way a (server-filled) spec exceeds ``limits``, as (spec path, message); None when it fits."""
    thought = spec.thought
    if thought.max_tokens > limits.max_tokens:
        return "thought.max_tokens", f"{thought.max_tokens} is above this server's limit of {limits.max_tokens}"
    verifier = spec.verifiers.verifier
    if verifier is not None and verifier.max_tokens > limits.max_tokens:
        return "verifiers.verifier.max_tokens", f"{verifier.max_tokens} is above this server's limit of " + str(
            limits.max_tokens
        )
    budget = spec.budget
    if budget.max_tokens is None or budget.max_tokens > limits.max_run_tokens:
        return "budget.max_tokens", f"must be at most this server's limit of {limits.max_run_tokens}"
    if budget.wall_clock_s is None or budget.wall_clock_s > limits.max_run_seconds:
        return "budget.wall_clock_s", f"must be at most this server's limit of {limits.max_run_seconds:g} s"
    try:
        info = strategy_info(strategy.name)
    except UnknownNameError:
        return None
    traces = info.fan_out(strategy) if info.fan_out is not None and info.cls is type(strategy) else 1
    if traces > limits.max_samples:
        return "thought", (
            f"{strategy.name} starts {traces} traces, more than this server's limit of {limits.max_samples}"
        )
    return None
