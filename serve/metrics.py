"""The server's figures in the Prometheus text format (``GET /metrics``), kept in memory since it started.

=======================================================  =========  =============================================
metric                                                   type       labels
=======================================================  =========  =============================================
``branchwise_requests_total``                            counter    ``model``, ``status`` (the HTTP status sent)
``branchwise_runs_total``                                counter    ``model``, ``outcome``: ok, error,
                                                                    disconnected (the client left), shutdown
``branchwise_runs_in_flight``                            gauge
``branchwise_queue_depth``                               gauge      requests waiting for a run slot
``branchwise_rejected_total``                            counter    ``reason``: queue_full, key_limit, draining
``branchwise_tokens_total``                              counter    ``model``, ``kind``: prompt, completion,
                                                                    aborted (part of completion)
``branchwise_budget_exhausted_total``                    counter    ``model``
``branchwise_run_seconds``                               histogram  ``model``: run time, from start to its end
``branchwise_queue_wait_seconds``                        histogram  time from arrival to a run slot
``branchwise_engine_requests``                           gauge      ``engine`` (its index), ``model``, ``state``:
                                                                    unfinished (tracked by the engine's front
                                                                    end), running, waiting (its scheduler)
``branchwise_engine_kv_cache_usage``                     gauge      ``engine``, ``model``: fraction in use
=======================================================  =========  =============================================

The engine gauges are read from engines that report their own state (the embedded vLLM engine) when the metrics
are asked for.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..budget import UsageSnapshot

__all__ = ["BUCKETS", "EngineGauges", "Histogram", "Metrics"]

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Histogram bucket bounds in seconds (``+Inf`` is added)."""

Labels = tuple[tuple[str, str], ...]


@dataclass
class Histogram:
    """Cumulative-bucket histogram of one label set."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value


@dataclass(frozen=True)
class EngineGauges:
    """One engine's own view of its work, as the metrics show it."""

    labels: Labels
    unfinished: int
    running: int
    waiting: int
    kv_cache_usage: float


class Metrics:
    """Counters, gauges and histograms of one server.

    Args:
        in_flight: the number of runs running now.
        queued: the number of requests waiting for a slot.
    """

    def __init__(self, *, in_flight: Callable[[], int], queued: Callable[[], int]) -> None:
        self._in_flight = in_flight
        self._queued = queued
        self.requests: Counter[Labels] = Counter()
        self.runs: Counter[Labels] = Counter()
        self.rejected: Counter[Labels] = Counter()
        self.tokens: Counter[Labels] = Counter()
        self.budget_exhausted: Counter[Labels] = Counter()
        self.run_seconds: dict[Labels, Histogram] = {}
        self.queue_wait: dict[Labels, Histogram] = {}

    def request(self, model: str, status: int) -> None:
        self.requests[(("model", model), ("status", str(status)))] += 1

    def rejection(self, reason: str) -> None:
        self.rejected[(("reason", reason),)] += 1

    def waited(self, seconds: float) -> None:
        self.queue_wait.setdefault((), Histogram()).observe(seconds)

    def run(self, model: str, outcome: str, usage: UsageSnapshot, seconds: float, *, exhausted: bool) -> None:
        """Count one finished run (whatever its outcome) and the tokens it spent."""
        self.runs[(("model", model), ("outcome", outcome))] += 1
        for kind, value in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("aborted", usage.aborted_tokens),
        ):
            self.tokens[(("model", model), ("kind", kind))] += value
        if exhausted:
            self.budget_exhausted[(("model", model),)] += 1
        self.run_seconds.setdefault((("model", model),), Histogram()).observe(seconds)

    def render(self, engines: Iterable[EngineGauges] = ()) -> str:
        """Everything, with ``engines``' gauges, in the Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        _counter(lines, "branchwise_requests_total", "HTTP requests answered, by model and status.", self.requests)
        _counter(lines, "branchwise_runs_total", "Pipeline runs ended, by model and outcome.", self.runs)
        _gauge(lines, "branchwise_runs_in_flight", "Pipeline runs running now.", self._in_flight())
        _gauge(lines, "branchwise_queue_depth", "Requests waiting for a run slot.", self._queued())
        _counter(lines, "branchwise_rejected_total", "Requests refused for load (429/503).", self.rejected)
        _counter(lines, "branchwise_tokens_total", "Tokens spent by runs, by model and kind.", self.tokens)
        _counter(lines, "branchwise_budget_exhausted_total", "Runs a budget cap cut short.", self.budget_exhausted)
        _histogram(lines, "branchwise_run_seconds", "Run time in seconds.", self.run_seconds)
        _histogram(lines, "branchwise_queue_wait_seconds", "Wait for a run slot in seconds.", self.queue_wait)
        engines = list(engines)
        if engines:
            requests = {
                (*e.labels, ("state", state)): float(value)
                for e in engines
                for state, value in (("unfinished", e.unfinished), ("running", e.running), ("waiting", e.waiting))
            }
            _gauges(lines, "branchwise_engine_requests", "Requests an engine holds, by state.", requests)
            usage = {e.labels: e.kv_cache_usage for e in engines}
            _gauges(lines, "branchwise_engine_kv_cache_usage", "Fraction of an engine's KV cache in use.", usage)
        return "\n".join(lines) + "\n"


def _labels(labels: Iterable[tuple[str, str]], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _counter(lines: list[str], name: str, help_text: str, values: Counter[Labels]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
    lines += [f"{name}{_labels(labels)} {value}" for labels, value in sorted(values.items())]


def _gauge(lines: list[str], name: str, help_text: str, value: float) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]


def _gauges(lines: list[str], name: str, help_text: str, values: dict[Labels, float]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in sorted(values.items())]


def _histogram(lines: list[str], name: str, help_text: str, values: dict[Labels, Histogram]) -> None:
    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for labels, hist in sorted(values.items()):
        running = 0
        for bound, count in zip((*BUCKETS, None), hist.counts, strict=True):
            running += count
            le = 'le="+Inf"' if bound is None else f'le="{bound:g}"'
            lines.append(f"{name}_bucket{_labels(labels, le)} {running}")
        lines.append(f"{name}_sum{_labels(labels)} {hist.total:.6f}")
        lines.append(f"{name}_count{_labels(labels)} {running}")
