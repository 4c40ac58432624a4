"""Run events, the JSONL trace format, and optional OpenTelemetry spans.

Trace format ``branchwise-trace`` version 1
-------------------------------------------
A trace is a UTF-8 JSON Lines file. The first line is a header::

    {"format": "branchwise-trace", "version": 1, "run_id": "...", "created": "2026-11-29T16:00:00+00:00",
     "branchwise": "0.1.0", "query": "...", "spec": {...} | null}

``spec`` is the pipeline spec as written, with ``${ENV}`` references kept and literal secrets masked. Every
following line is one event, written and flushed as it happens (a crash or Ctrl-C keeps every line written
so far)::

    {"seq": 3, "t": 0.0123, "kind": "trace_end", "data": {...}}

``seq`` counts events from 0, ``t`` is seconds since the run started. Event kinds and their data:

- ``run_start``: query, strategy and its params, planner, tools, engines by role, budget caps, budget_path
  (the run budget's path; ``budget_charge`` events of that path are the run's totals).
- ``run_end``: status ("ok", "error", "cancelled"), answer, usage, pruned, budget_exhausted, seconds.
- ``strategy_start`` / ``strategy_end``: strategy name and parameters / answer, votes, pruned, usage,
  decisions, and ``traces`` (every trace node with its final scores).
- ``trace_start``: tree, trace, parent, kind.  ``trace_end``: tree, trace, kind, status (finished, pruned,
  budget, error; "cancelled" or "error" for a trace the run left open when it was interrupted or failed),
  tokens, answer, scores, finish_reason, rule (the pruning rule), detail, seconds. ``tree`` identifies one
  strategy run's trace tree (a planner run has one per reasoning node).
- ``decision``: a strategy decision (threshold set, consensus reached, beam depth summary...).
- ``engine_call``: role, model, n, max_tokens, temperature, prompt_tokens, completion_tokens, latency_s,
  ttft_s, aborted, error.
- ``budget_charge``: budget path, the call's prompt/completion tokens, aborted, the budget's usage and what
  remains.  ``budget_exhausted``: budget, cap, detail.
- planner and executor events as the agent reports them: ``plan_node`` (node, kind, name, deps, repairs),
  ``node_start``, ``node_end`` (duration_s, attempts, output), ``node_error``, ``node_retry``, ``plan``,
  ``plan_error``, ``join``, ``replan``, ``agent_end``; data as given.
- ``error``: type, message.

Lines are separated by ``\\n`` only (a query may hold U+2028). Text that is not valid Unicode (lone surrogates,
from command-line bytes that were not UTF-8) is written as ``\\udcXX`` escapes and reads back unchanged.

Readers must reject another ``format`` or a newer ``version`` and tolerate a truncated last line (a run killed
mid-write). `read_trace` also checks the JSON type of every documented field (null is allowed for each; unknown
fields and kinds are kept, for newer writers) and refuses NaN and Infinity, so a viewer can trust what it reads.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import importlib.util
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from ..errors import ConfigError, MissingDependencyError, TraceFormatError
from ..events import LiveRef

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "Event",
    "EventListener",
    "OTelSink",
    "Recorder",
    "TraceFile",
    "TraceFormatError",
    "TraceSpool",
    "TraceWriter",
    "otel_enabled",
    "read_trace",
]

logger = logging.getLogger(__name__)

TRACE_FORMAT = "branchwise-trace"
TRACE_VERSION = 1


@dataclass(frozen=True)
class Event:
    """One thing that happened during a run.

    Attributes:
        seq: position in the run (from 0).
        t: seconds since the run started.
        kind: what happened ("run_start", "trace_end", "engine_call", ...).
        data: JSON-ready details.
    """

    seq: int
    t: float
    kind: str
    data: dict[str, Any]
    live: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """In-process objects that came with the event (never recorded), e.g. the live `TraceNode`."""

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "t": round(self.t, 6), "kind": self.kind, "data": self.data}


EventListener = Callable[[Event], None]


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: dataclasses and mappings as dicts, sequences as lists, non-finite floats
    as None, anything else unknown as its string."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    to_dict = getattr(value, "to_dict", None) or getattr(value, "model_dump", None)
    if callable(to_dict):
        return jsonable(to_dict())
    return str(value)


def _encode(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _create(path: Path) -> IO[str]:
    """``path`` opened for writing, its folder made if missing (asked only then: a server creates many traces)."""
    try:
        return path.open("w", encoding="utf-8", errors="backslashreplace")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("w", encoding="utf-8", errors="backslashreplace")


class TraceWriter:
    """Writes a trace: the header, then one event a line, flushed after each line.

    Text that is not valid Unicode (lone surrogates, e.g. a command-line argument that was not UTF-8, decoded
    with Python's ``surrogateescape``) is written as JSON ``\\udcXX`` escapes, so the file stays UTF-8 and reads
    back to the same string.

    Args:
        path: the file to create (parent folders are made).
        header: extra header fields (run_id, query, spec...).
        spool: write through this `TraceSpool` (a thread of its own) instead of on the caller's thread; the file
            is then complete once the spool has written it (`TraceSpool.written`).

    Raises:
        ConfigError: the file cannot be created (without a spool; a spool logs the failure instead).
    """

    def __init__(self, path: str | Path, header: Mapping[str, Any], *, spool: TraceSpool | None = None) -> None:
        self.path = Path(path)
        self._spool = spool
        self._file: IO[str] | None = None
        self._open = True
        if spool is not None:
            spool.open(self.path)
        else:
            try:
                self._file = _create(self.path)
            except OSError as err:
                raise ConfigError(f"cannot write trace file {self.path}: {err.strerror or err}") from None
        self._line({"format": TRACE_FORMAT, "version": TRACE_VERSION, **jsonable(dict(header))})

    def _line(self, record: Mapping[str, Any]) -> None:
        if not self._open:
            return
        if self._spool is not None:
            self._spool.write(self.path, record)
        elif self._file is not None:
            self._file.write(_encode(record))
            self._file.flush()

    def __call__(self, event: Event) -> None:
        self._line(event.to_json())

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._spool is not None:
            self._spool.close(self.path)
        elif self._file is not None:
            self._file.close()
            self._file = None


class TraceSpool:
    """Writes trace files on a thread of its own, so that the event loop of a server running many runs at once
    never waits on the disk (creating a file took 0.5 ms in a crowded ``/tmp`` here) nor encodes JSON lines.

    Writes, closes and deletions happen in the order they were asked for; lines are flushed whenever the queue
    runs dry, so a reader sees a running trace at most one batch behind. A file that cannot be created or
    written is logged once and its lines dropped: a trace is a record, never a reason for a run to fail.

    Use one spool per process that wants it (`branchwise serve` has one), pass it to `Pipeline.run`'s
    ``trace_spool``, and `stop` it when done (everything asked for before is written).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Path, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[Path, threading.Event] = {}  # files opened, not yet closed and written
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="branchwise-trace-spool", daemon=True)
        self._thread.start()

    def open(self, path: Path) -> None:
        """Start writing a new file at ``path`` (replacing one there)."""
        with self._lock:
            if self._stopped:
                raise ConfigError("the trace spool is stopped")
            self._pending.setdefault(path, threading.Event())
        self._queue.put(("open", path, None))

    def write(self, path: Path, record: Mapping[str, Any]) -> None:
        """Append ``record`` as a line of ``path`` (opened with `open`); the record must not change afterwards."""
        self._queue.put(("line", path, record))

    def close(self, path: Path) -> None:
        """Finish the file at ``path``."""
        self._queue.put(("close", path, None))

    def remove(self, path: Path) -> None:
        """Delete ``path`` once everything asked for before is done (missing is fine)."""
        self._queue.put(("remove", path, None))

    def sync(self) -> threading.Event:
        """An event set once everything asked for before has been written and flushed."""
        done = threading.Event()
        self._queue.put(("sync", Path(), done))
        return done

    def written(self, path: Path) -> threading.Event | None:
        """An event set once ``path`` is closed and written; None when the spool has nothing of it left to write."""
        with self._lock:
            return self._pending.get(path)

    def stop(self, timeout: float | None = None) -> None:
        """Write everything asked for so far, then end the thread (blocks up to ``timeout`` seconds; idempotent)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                self._queue.put(("stop", Path(), None))
        self._thread.join(timeout)

    def _work(self) -> None:
        files: dict[Path, IO[str] | None] = {}  # None: the file failed; its lines are dropped
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            touched: set[Path] = set()
            synced: list[threading.Event] = []
            for op, path, record in batch:
                if op == "stop":
                    for handle in files.values():
                        if handle is not None:
                            handle.close()
                    for done in synced:
                        done.set()
                    return
                if op == "sync":
                    synced.append(record)
                else:
                    try:
                        self._do(files, op, path, record, touched)
                    except Exception:  # e.g. a record JSON cannot encode: the spool goes on with the rest
                        logger.exception("trace spool: %s of %s failed", op, path)
            for path in touched:
                handle = files.get(path)
                if handle is not None:
                    self._guard(files, path, handle.flush)
            for done in synced:
                done.set()

    def _do(self, files: dict[Path, IO[str] | None], op: str, path: Path, record: Any, touched: set[Path]) -> None:
        if op == "open":
            old = files.pop(path, None)
            if old is not None:
                old.close()
            files[path] = None
            try:
                files[path] = _create(path)
            except OSError as err:
                logger.warning("cannot write trace file %s: %s", path, err.strerror or err)
        elif op == "line":
            out = files.get(path)
            if out is not None:
                self._guard(files, path, partial(out.write, _encode(record)))
                touched.add(path)
        elif op == "close":
            handle = files.pop(path, None)
            if handle is not None:
                self._guard(files, path, handle.close)
            touched.discard(path)
            with self._lock:
                done = self._pending.pop(path, None)
            if done is not None:
                done.set()
        elif op == "remove":
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("cannot delete trace file %s: %s", path, err.strerror or err)

    @staticmethod
    def _guard(files: dict[Path, IO[str] | None], path: Path, act: Callable[[], object]) -> None:
        """Run a file operation; a failure is logged and the file's further lines dropped."""
        try:
            act()
        except (OSError, ValueError) as err:
            logger.warning("cannot write trace file %s: %s", path, getattr(err, "strerror", None) or err)
            handle = files.get(path)
            if handle is not None:
                files[path] = None
                with contextlib.suppress(OSError, ValueError):
                    handle.close()


@dataclass
class TraceFile:
    """A trace read back: its header and events (``truncated`` if the last line was cut mid-write)."""

    path: Path
    header: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    truncated: bool = False

    def of_kind(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.kind in kinds]

    @property
    def run_end(self) -> Event | None:
        ends = self.of_kind("run_end")
        return ends[-1] if ends else None


def read_trace(path: str | Path) -> TraceFile:
    """Read a JSONL trace, checking its format, version and every record's field types.

    A last line cut mid-write (no newline at its end, and not a whole record) is tolerated: ``truncated`` is set.

    Raises:
        TraceFormatError: not UTF-8 JSON Lines, another format or a newer version, a header that is not a JSON
            object, or a record whose fields have the wrong types (the message names the file and line).
        ConfigError: the file does not exist or cannot be read.
    """
    p = Path(path)
    source = str(p)
    if not p.is_file():
        raise ConfigError(f"trace {source!r} does not exist" if not p.exists() else f"trace {source!r} is not a file")
    try:
        with p.open("rb") as handle:
            raw_lines = handle.read().split(b"\n")
    except OSError as err:
        raise ConfigError(f"cannot read trace {source}: {err.strerror or err}") from None
    complete = raw_lines[-1] == b""
    if complete:
        raw_lines.pop()
    if not raw_lines:
        raise TraceFormatError(source, f"empty file, not a {TRACE_FORMAT} trace")
    trace = TraceFile(p, _header(_decode(raw_lines[0], source, 1), source))
    last = len(raw_lines)
    for number, raw in enumerate(raw_lines[1:], start=2):
        if not raw.strip():
            continue
        try:
            trace.events.append(_event(_decode(raw, source, number), source, number))
        except TraceFormatError:
            if number == last and not complete:
                trace.truncated = True
                break
            raise
    return trace


_NUMBER = (int, float)
_HEADER_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": (str,), "created": (str,), "branchwise": (str,), "query": (str,), "spec": (dict,),
}  # fmt: skip
_EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "run_start": {"query": (str,), "strategy": (str,), "params": (dict,), "planner": (str,), "tools": (list,),
                  "engines": (dict,), "budget": (dict,), "budget_path": (str,)},
    "run_end": {"status": (str,), "error": (str,), "answer": (str,), "usage": (dict,), "pruned": (int,),
                "budget_exhausted": (bool,), "seconds": _NUMBER},
    "strategy_start": {"strategy": (str,), "params": (dict,)},
    "strategy_end": {"strategy": (str,), "answer": (str,), "votes": (dict,), "pruned": (int,),
                     "budget_exhausted": (bool,), "usage": (dict,), "decisions": (list,), "tree": (int,),
                     "traces": (list,)},
    "trace_start": {"tree": (int,), "trace": (int,), "parent": (int,), "kind": (str,)},
    "trace_end": {"tree": (int,), "trace": (int,), "kind": (str,), "status": (str,), "tokens": (int,),
                  "answer": (str,), "scores": (dict,), "finish_reason": (str,), "rule": (str,), "detail": (str,),
                  "seconds": _NUMBER},
    "engine_call": {"role": (str,), "model": (str,), "backend": (str,), "n": (int,), "max_tokens": (int,),
                    "temperature": _NUMBER, "prompt_tokens": (int,), "completion_tokens": (int,),
                    "latency_s": _NUMBER, "ttft_s": _NUMBER, "aborted": (bool,), "error": (str,)},
    "budget_charge": {"budget": (str,), "prompt_tokens": (int,), "completion_tokens": (int,), "aborted": (bool,),
                      "usage": (dict,), "remaining": (dict,)},
    "budget_exhausted": {"budget": (str,), "cap": (str,), "detail": (str,)},
    "error": {"type": (str,), "message": (str,)},
}  # fmt: skip
"""The documented fields of each event kind and their JSON types (null is allowed for every field; other
fields and kinds are accepted, for newer writers)."""
_NUMERIC_MAPS = ("usage", "remaining", "scores", "votes")
_TRACE_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "trace": (int,), "parent": (int,), "kind": (str,), "status": (str,), "tokens": (int,), "answer": (str,),
    "scores": (dict,), "rule": (str,), "detail": (str,),
}  # fmt: skip
"""The fields of each trace in a ``strategy_end`` event's ``traces``."""


def _decode(raw: bytes, source: str, number: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        message = f"not UTF-8 text: byte 0x{raw[err.start]:02x} at byte {err.start} of the line cannot be decoded"
        raise TraceFormatError(source, message, line=number) from None
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        detail = err.msg if isinstance(err, json.JSONDecodeError) else str(err) or "nested too deeply"
        raise TraceFormatError(source, f"not a JSON record ({detail})", line=number) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _header(header: Any, source: str) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise TraceFormatError(
            source, f"not a {TRACE_FORMAT} trace: the header is a JSON {_json_type(header)}, not an object", line=1
        )
    if header.get("format") != TRACE_FORMAT:
        raise TraceFormatError(source, f"not a {TRACE_FORMAT} trace (format {header.get('format')!r})", line=1)
    version = header.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= TRACE_VERSION:
        raise TraceFormatError(
            source,
            f"{TRACE_FORMAT} version {version!r} is not supported (this reader knows 1..{TRACE_VERSION})",
            line=1,
        )
    _check_fields(header, _HEADER_FIELDS, "header", source, 1)
    return header


def _event(record: Any, source: str, number: int) -> Event:
    if not isinstance(record, dict):
        raise TraceFormatError(source, f"an event must be a JSON object, got a {_json_type(record)}", line=number)
    seq, t, kind, data = record.get("seq"), record.get("t"), record.get("kind"), record.get("data", {})
    data = {} if data is None else data
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise TraceFormatError(source, f"'seq' must be an integer, got {_json_type(seq)}", line=number)
    if isinstance(t, bool) or not isinstance(t, _NUMBER):
        raise TraceFormatError(source, f"'t' must be a number, got {_json_type(t)}", line=number)
    if not isinstance(kind, str):
        raise TraceFormatError(source, f"'kind' must be a string, got {_json_type(kind)}", line=number)
    if not isinstance(data, dict):
        raise TraceFormatError(source, f"'data' must be an object, got {_json_type(data)}", line=number)
    _check_fields(data, _EVENT_FIELDS.get(kind, {}), f"{kind} event", source, number)
    _check_numbers(data, kind, source, number)
    if kind == "strategy_end":
        for i, node in enumerate(data.get("traces") or []):
            if not isinstance(node, dict):
                raise TraceFormatError(source, f"strategy_end event: traces[{i}] must be an object", line=number)
            _check_fields(node, _TRACE_RECORD_FIELDS, f"strategy_end event: traces[{i}]", source, number)
            _check_numbers(node, kind, source, number)
    return Event(seq, float(t), kind, data)


def _check_numbers(data: Mapping[str, Any], kind: str, source: str, number: int) -> None:
    """The values of the mappings of numbers (usage, remaining, scores, votes; run_start's budget caps)."""
    for name in (*_NUMERIC_MAPS, "budget") if kind == "run_start" else _NUMERIC_MAPS:
        inner = data.get(name)
        if isinstance(inner, dict):
            for key, value in inner.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, _NUMBER)):
                    message = f"{kind} event: '{name}.{key}' must be a number, got {_json_type(value)}"
                    raise TraceFormatError(source, message, line=number)


def _check_fields(
    data: Mapping[str, Any], fields: Mapping[str, tuple[type, ...]], what: str, source: str, number: int
) -> None:
    for name, types in fields.items():
        value = data.get(name)
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            message = f"{what}: {name!r} must be {expected}, got {_json_type(value)}"
            raise TraceFormatError(source, message, line=number)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
               list: "an array"}  # fmt: skip


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for cls, name in (
        (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object")
    ):  # fmt: skip
        if isinstance(value, cls):
            return name
    return type(value).__name__


class Recorder:
    """The hub of one run's events: numbers and timestamps them, then hands them to every listener.

    A listener that raises is logged and dropped from nothing else: the run goes on.

    Args:
        listeners: receive every event, in order.
        secrets: strings that must never reach a listener (replaced by ``***`` in any text).
        budget_path: the run budget's path; as an event sink (`emit`), the recorder then keeps only that budget's
            ``budget_charge`` events (the event channel also carries those of its ancestors and descendants).
    """

    def __init__(
        self, listeners: Iterable[EventListener] = (), *, secrets: Iterable[str] = (), budget_path: str | None = None
    ) -> None:
        self.listeners: list[EventListener] = list(listeners)
        self.budget_path = budget_path
        self.secrets = [s for s in secrets if s]
        self.started = time.perf_counter()
        self.count = 0

    def add(self, listener: EventListener) -> None:
        self.listeners.append(listener)

    def __call__(self, kind: str, data: Mapping[str, Any]) -> Event:
        live = {k: v.value for k, v in data.items() if isinstance(v, LiveRef)}
        payload = jsonable({k: v for k, v in data.items() if k not in live})
        if self.secrets:
            payload = self.redact(payload)
        event = Event(self.count, time.perf_counter() - self.started, kind, payload, live)
        self.count += 1
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("trace listener %r failed on %s", listener, kind)
        return event

    def emit(self, kind: str, data: Mapping[str, Any]) -> None:
        """Record an event from the event channel (the run's `EventSink`)."""
        if kind == "budget_charge" and self.budget_path is not None and data.get("budget") != self.budget_path:
            return
        self(kind, data)

    def redact(self, value: Any) -> Any:
        """``value`` (JSON data) with every secret replaced by ``***``."""
        if not self.secrets:
            return value
        if isinstance(value, str):
            for secret in self.secrets:
                value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        return value


def otel_enabled(tracer_provider: Any = None) -> bool:
    """True when OpenTelemetry spans would go somewhere: the API can be imported, and a tracer provider is given or
    one has been set globally (without one, the API's default provider drops every span, and recording them costs
    a server running many runs at once a few percent of its time)."""
    if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.trace") is None:
        return False
    if tracer_provider is not None:
        return True
    from opentelemetry import trace

    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


class OTelSink:
    """Turns run events into OpenTelemetry spans: one per run, per plan node, per trace and per engine call.

    Spans go to the globally configured tracer provider (or the one given). Token counts are span attributes
    (``gen_ai.usage.input_tokens`` / ``gen_ai.usage.output_tokens`` on engine calls, totals on the run).

    Args:
        tracer_provider: an OpenTelemetry ``TracerProvider``; None uses the global one.

    Raises:
        MissingDependencyError: opentelemetry is not installed.
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        try:
            # an optional dependency: imported here, when spans are asked for, never at module level
            trace: Any = importlib.import_module("opentelemetry.trace")
        except ImportError as err:
            raise MissingDependencyError(
                "OpenTelemetry spans", "opentelemetry-api", "pip install 'branchwise[telemetry]'"
            ) from err
        self._trace = trace
        self._tracer = trace.get_tracer("branchwise", tracer_provider=tracer_provider)
        self._run: Any = None
        self._run_ctx: Any = None
        self._open: dict[tuple[str, Any], Any] = {}

    def _start(self, name: str, attributes: Mapping[str, Any], start_time: int | None = None) -> Any:
        return self._tracer.start_span(
            name, context=self._run_ctx, attributes=_attributes(attributes), start_time=start_time
        )

    def __call__(self, event: Event) -> None:
        kind, data = event.kind, event.data
        if kind == "run_start":
            self._run = self._tracer.start_span("branchwise.run", attributes=_attributes(data))
            self._run_ctx = self._trace.set_span_in_context(self._run)
        elif kind == "run_end" and self._run is not None:
            usage = data.get("usage") or {}
            self._run.set_attributes(
                _attributes(
                    {
                        "status": data.get("status"),
                        "answer": data.get("answer"),
                        "pruned": data.get("pruned"),
                        "budget_exhausted": data.get("budget_exhausted"),
                        "gen_ai.usage.input_tokens": usage.get("prompt_tokens"),
                        "gen_ai.usage.output_tokens": usage.get("completion_tokens"),
                        "llm_calls": usage.get("calls"),
                    }
                )
            )
            if data.get("status") != "ok":
                self._run.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(data.get("error") or "")))
            for span in self._open.values():
                span.end()
            self._open.clear()
            self._run.end()
            self._run = None
        elif kind == "node_start":
            self._open[("node", data.get("node"))] = self._start("branchwise.node", data)
        elif kind in ("node_end", "node_error"):
            span = self._open.pop(("node", data.get("node")), None)
            if span is not None:
                span.set_attributes(_attributes(data))
                if kind == "node_error":
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(data.get("error") or "")))
                span.end()
        elif kind == "trace_start":
            key = ("trace", (data.get("tree"), data.get("trace")))
            self._open[key] = self._start("branchwise.trace", data)
        elif kind == "trace_end":
            span = self._open.pop(("trace", (data.get("tree"), data.get("trace"))), None)
            if span is not None:
                span.set_attributes(_attributes({k: v for k, v in data.items() if k != "scores"}))
                for name, value in (data.get("scores") or {}).items():
                    span.set_attribute(f"score.{name}", value)
                span.end()
        elif kind == "engine_call":
            latency = float(data.get("latency_s") or 0.0)
            start = time.time_ns() - int(latency * 1e9)
            attrs = dict(data)
            attrs["gen_ai.usage.input_tokens"] = data.get("prompt_tokens")
            attrs["gen_ai.usage.output_tokens"] = data.get("completion_tokens")
            attrs["gen_ai.request.model"] = data.get("model")
            span = self._start("branchwise.engine_call", attrs, start_time=start)
            if data.get("error"):
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, str(data["error"])))
            span.end()


def _attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            continue
        scalar = isinstance(value, (bool, int, float, str))
        if scalar or (isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            out[key] = value
        else:
            out[key] = json.dumps(value, default=str)[:1000]
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
