"""The event channel of a run: a context-local sink that library code emits ``(kind, data)`` events to.

A `Pipeline` run installs its recorder with `use_sink`; everything running in that context (strategies, trace
trees, engine-call hooks, tasks they spawn, which inherit the context) reports through `emit`. Outside a run
there is no sink and `emit` costs one context-variable lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["EventSink", "LiveRef", "current_sink", "emit", "use_sink"]

logger = logging.getLogger(__name__)

EventSink = Callable[[str, dict[str, Any]], None]
"""Receives one event: its kind (e.g. "trace_start") and a JSON-ready mapping."""

_SINK: ContextVar[EventSink | None] = ContextVar("branchwise_event_sink", default=None)


class LiveRef:
    """A live object riding along with an event (e.g. the `TraceNode` a trace_start opened).

    Recorders keep it out of the recorded data (it is not JSON) and hand it to in-process listeners, so a live
    view can read a trace's token count while it grows.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"LiveRef({type(self.value).__name__})"


def current_sink() -> EventSink | None:
    """The sink of the run this code runs in, if any."""
    return _SINK.get()


def emit(kind: str, data: dict[str, Any]) -> None:
    """Send an event to the current run's sink; a failing sink is logged, never raised into the caller."""
    sink = _SINK.get()
    if sink is None:
        return
    try:
        sink(kind, data)
    except Exception:
        logger.exception("event sink failed on %r", kind)


@contextmanager
def use_sink(sink: EventSink | None) -> Iterator[None]:
    """Make ``sink`` the current sink inside the ``with`` block (and tasks created in it)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)
