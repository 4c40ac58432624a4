"""What one pipeline run records: its event sink, trace file, listeners, and how its end is written.

A `RunRecording` is the sink a run installs on the event channel (`branchwise.events.use_sink`). Everything the
run does reports through it: strategies and trace trees, the planner and executor, the budget, and engines,
whose ``engine_call`` events carry the engine itself so the recording names the role this run gave it. Nothing
is attached to the engines, so one engine serves any number of pipelines and runs, each call recorded once, by
the run it belongs to.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..budget import Budget, UsageSnapshot
from ..engine.base import Engine
from ..events import LiveRef
from ..executors.agent import AgentResult
from ..search.base import Result, Strategy, TraceNode
from .tracing import Event, EventListener, Recorder, TraceSpool, TraceWriter

__all__ = ["RunEnd", "RunRecording", "describe_strategy", "strategy_records"]


@dataclass(frozen=True)
class RunEnd:
    """How a run ended, as recorded in its ``run_end`` event."""

    status: str
    answer: str | None
    usage: UsageSnapshot
    pruned: int
    budget_exhausted: bool
    seconds: float


class RunRecording:
    """One run's recorder, trace writer and bookkeeping.

    Args:
        listeners: receive every event (the trace writer first, when there is one).
        secrets: strings replaced by ``***`` in every event.
        budget: the run's budget (only its own ``budget_charge`` events are recorded).
        engines: the run's engines by role, to name the role of each engine call.
        trace: the trace file to write, with its header fields; None for none.
        spool: write the trace file through this spool (a thread of its own) instead of on the caller's thread.
    """

    def __init__(
        self,
        listeners: Iterable[EventListener],
        *,
        secrets: Iterable[str],
        budget: Budget,
        engines: Mapping[str, Engine],
        trace: tuple[Path, Mapping[str, Any]] | None = None,
        spool: TraceSpool | None = None,
    ) -> None:
        self.recorder = Recorder(listeners, secrets=secrets, budget_path=budget.path)
        self.writer: TraceWriter | None = None
        if trace is not None:
            path, header = trace
            self.writer = TraceWriter(path, self.recorder.redact(dict(header)), spool=spool)
            self.recorder.listeners.insert(0, self.writer)
        # the first role wins when one engine plays several (the policy also judging)
        self._roles = {id(engine): role for role, engine in reversed(list(engines.items()))}
        self._open: dict[tuple[Any, Any], str] = {}
        self._pruned = 0
        self._status = "ok"
        self._error: str | None = None
        self._started = time.perf_counter()
        self.recorder.add(self._track)

    @property
    def events(self) -> int:
        """Events recorded so far."""
        return self.recorder.count

    def add(self, listener: EventListener) -> None:
        """Send every further event to ``listener`` too."""
        self.recorder.add(listener)

    def record(self, kind: str, data: Mapping[str, Any]) -> Event:
        """Record an event now."""
        return self.recorder(kind, data)

    def sink(self, kind: str, data: dict[str, Any]) -> None:
        """The run's `EventSink`: engine calls get the role of their engine, then the recorder takes the event."""
        if kind == "engine_call":
            ref = data.get("engine")
            engine = ref.value if isinstance(ref, LiveRef) else None
            data = {"role": self._roles.get(id(engine), "other"), **data}
        self.recorder.emit(kind, data)

    def failed(self, status: str, error: str, err: BaseException | None = None) -> None:
        """Note that the run is ending with ``status`` ("error", "cancelled"); an error is recorded now."""
        self._status, self._error = status, error
        if err is not None:
            self.record("error", {"type": type(err).__name__, "message": str(err)})

    def finish(self, outcome: Result | AgentResult | None, budget: Budget) -> RunEnd:
        """Close the traces the run left open, record ``run_end``, close the trace file; returns what it says."""
        if self._status != "ok":
            for (tree, trace), kind in list(self._open.items()):
                self.record(
                    "trace_end",
                    {"tree": tree, "trace": trace, "kind": kind, "status": self._status,
                     "detail": f"the run ended ({self._status})"},
                )  # fmt: skip
        pruned = outcome.pruned if isinstance(outcome, Result) else self._pruned
        # The strategy knows whether a cap cut its work; a cap merely reached (max_calls hit by the last call) is
        # not a cut. An agent run has no such flag: the budget's state says.
        exhausted = outcome.budget_exhausted if isinstance(outcome, Result) else budget.exhausted
        end = RunEnd(
            status=self._status,
            answer=outcome.answer if outcome is not None else None,
            usage=budget.usage.snapshot(),
            pruned=pruned,
            budget_exhausted=exhausted,
            seconds=time.perf_counter() - self._started,
        )
        data = {"status": end.status, "error": self._error, "answer": end.answer, "usage": end.usage.to_dict()}
        self.record("run_end", {**data, "pruned": pruned, "budget_exhausted": exhausted, "seconds": end.seconds})
        if self.writer is not None:
            self.writer.close()
        return end

    def _track(self, event: Event) -> None:
        """Counts prunes (an agent run reports them only as events) and which traces are still open."""
        d = event.data
        if event.kind == "trace_start":
            self._open[(d.get("tree"), d.get("trace"))] = str(d.get("kind", ""))
        elif event.kind == "trace_end":
            self._open.pop((d.get("tree"), d.get("trace")), None)
            if d.get("status") == "pruned":
                self._pruned += 1


def describe_strategy(strategy: Strategy) -> dict[str, Any]:
    """A strategy's parameters as JSON-ready values (objects by their name or type)."""
    out: dict[str, Any] = {}
    for key, value in strategy.describe().items():
        if value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = getattr(value, "name", None) or type(value).__name__
    return out


def strategy_records(result: Result) -> list[tuple[str, dict[str, Any]]]:
    """The ``strategy_end`` and ``decision`` events of a strategy's result."""
    end = {
        "strategy": result.strategy,
        "answer": result.answer,
        "votes": result.votes,
        "pruned": result.pruned,
        "budget_exhausted": result.budget_exhausted,
        "usage": result.usage.to_dict(),
        "decisions": result.decisions,
        "tree": result.trace.uid,
        "traces": [_node_record(n) for n in result.trace.nodes],
    }
    return [("strategy_end", end), *(("decision", {"strategy": result.strategy, **dict(d)}) for d in result.decisions)]


def _node_record(node: TraceNode) -> dict[str, Any]:
    return {
        "trace": node.id,
        "parent": node.parent,
        "kind": node.kind,
        "status": node.status,
        "tokens": node.tokens,
        "answer": node.answer,
        "scores": dict(node.scores),
        "rule": node.pruned_by,
        "detail": node.detail,
    }
