"""Live progress of a run: a rich live view on a terminal, plain log lines elsewhere.

Both are event listeners (see `branchwise.orchestrator.tracing`). The live view keeps a `ProgressState` up to
date from the events and redraws `render_progress(state)` a few times a second: the plan's nodes and their
states, the traces running now (tokens and mean token logprob so far, read from the live trace node) and the
latest finished ones (tokens, answer, final confidence), the budget burn-down
and tokens per second. `PlainProgress` writes one line per significant event instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .tracing import Event

__all__ = ["LiveProgress", "PlainProgress", "ProgressState", "make_progress", "render_progress"]

_NODE_DONE = {"done", "ok", "finished", "succeeded"}


@dataclass
class TraceView:
    tree: Any
    trace: Any
    kind: str
    started: float
    status: str = "running"
    tokens: int = 0
    answer: str | None = None
    confidence: float | None = None
    rule: str | None = None
    node: Any = None  # the live TraceNode, when the event carried it

    def live_tokens(self) -> int:
        """Tokens so far: the live node's count while running, the recorded one after."""
        if self.status == "running" and self.node is not None:
            return int(getattr(self.node, "tokens", 0) or 0)
        return self.tokens


@dataclass
class ProgressState:
    """What the live view shows, folded from events.

    Attributes:
        caps: the run's budget caps.
    """

    caps: dict[str, Any] = field(default_factory=dict)
    query: str = ""
    strategy: str = ""
    status: str = "starting"
    answer: str | None = None
    t: float = 0.0
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    traces: dict[tuple[Any, Any], TraceView] = field(default_factory=dict)
    finished: list[TraceView] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    pruned: int = 0
    replans: int = 0
    exhausted: str | None = None
    burn: list[tuple[float, int]] = field(default_factory=list)
    metered: bool = False
    budget_path: str | None = None

    def update(self, event: Event) -> None:
        """Fold one event in."""
        kind, d = event.kind, event.data
        self.t = event.t
        if kind == "run_start":
            self.query = str(d.get("query", ""))
            self.strategy = str(d.get("strategy", ""))
            self.caps = dict(d.get("budget") or self.caps)
            self.budget_path = d.get("budget_path")
            self.status = "running"
        elif kind in ("plan_node", "node_start", "node_end", "node_error", "node_retry"):
            node = str(d.get("node", "?"))
            entry = self.nodes.setdefault(node, {"label": "", "status": "pending"})
            label = d.get("name") or d.get("tool") or d.get("kind")
            if label:
                entry["label"] = str(label)
            if kind == "node_start":
                entry["status"] = "running"
            elif kind == "node_end":
                entry["status"] = str(d.get("status") or "done")
            elif kind == "node_error":
                entry["status"] = "skipped" if d.get("error_type") == "DependencyFailed" else "failed"
            elif kind == "node_retry":
                entry["status"] = "retrying"
        elif kind == "replan":
            self.replans += 1
        elif kind == "trace_start":
            key = (d.get("tree"), d.get("trace"))
            view = TraceView(d.get("tree"), d.get("trace"), str(d.get("kind", "")), event.t)
            view.node = event.live.get("node")
            self.traces[key] = view
        elif kind == "trace_end":
            key = (d.get("tree"), d.get("trace"))
            opened = self.traces.pop(key, None)
            view = (
                opened
                if opened is not None
                else TraceView(d.get("tree"), d.get("trace"), str(d.get("kind", "")), event.t)
            )
            view.status = str(d.get("status", "finished"))
            view.tokens = int(d.get("tokens") or 0)
            view.answer = d.get("answer")
            view.rule = d.get("rule")
            view.confidence = _confidence(d.get("scores") or {})
            if view.status == "pruned":
                self.pruned += 1
            self.finished.append(view)
            del self.finished[:-8]
        elif kind == "strategy_end":
            # confidences are often computed after a trace closed: take the final scores
            final = {(d.get("tree"), t.get("trace")): t.get("scores") or {} for t in d.get("traces") or []}
            for view in self.finished:
                scores = final.get((view.tree, view.trace))
                if scores and view.confidence is None:
                    view.confidence = _confidence(scores)
        elif kind == "engine_call" and not self.metered:
            self.calls += 1
            self.prompt_tokens += int(d.get("prompt_tokens") or 0)
            self.completion_tokens += int(d.get("completion_tokens") or 0)
            self.burn.append((event.t, self.prompt_tokens + self.completion_tokens))
        elif kind == "budget_charge":
            usage = d.get("usage") or {}
            path = str(d.get("budget", ""))
            if path == self.budget_path or (self.budget_path is None and "/" not in path):  # the run's totals
                self.metered = True
                self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens))
                self.completion_tokens = int(usage.get("completion_tokens", self.completion_tokens))
                self.calls = int(usage.get("calls", self.calls))
                self.burn.append((event.t, self.prompt_tokens + self.completion_tokens))
        elif kind == "budget_exhausted":
            self.exhausted = str(d.get("cap"))
        elif kind == "run_end":
            self.status = str(d.get("status", "ok"))
            self.answer = d.get("answer")
            usage = d.get("usage") or {}
            self.prompt_tokens = int(usage.get("prompt_tokens", self.prompt_tokens))
            self.completion_tokens = int(usage.get("completion_tokens", self.completion_tokens))
            self.calls = int(usage.get("calls", self.calls))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def tokens_per_second(self) -> float:
        """Completion plus prompt tokens per second over the run so far."""
        return self.total_tokens / self.t if self.t > 0 else 0.0


def _confidence(scores: Mapping[str, Any]) -> float | None:
    return next((float(v) for k, v in scores.items() if "confidence" in k and v is not None), None)


def _bar(used: float, cap: float, width: int = 24) -> str:
    share = min(1.0, used / cap) if cap else 0.0
    filled = round(share * width)
    return "█" * filled + "░" * (width - filled)


def render_progress(state: ProgressState) -> Group:
    """The live view of ``state`` as a rich renderable (pure: no I/O)."""
    parts: list[Any] = []
    head = Text()
    head.append(f"{state.strategy or 'run'} ", style="bold cyan")
    head.append(f"[{state.status}] ", style="green" if state.status in ("ok", "running") else "red")
    head.append(f"{state.t:6.1f}s  ")
    head.append(state.query[:80])
    parts.append(head)
    if state.nodes:
        nodes = Table(title="plan", title_justify="left", show_edge=False, pad_edge=False)
        for column in ("node", "what", "state"):
            nodes.add_column(column)
        for node, entry in list(state.nodes.items()):
            style = "green" if entry["status"] in _NODE_DONE else "yellow" if entry["status"] == "running" else "red"
            nodes.add_row(Text(str(node)), Text(str(entry["label"])), Text(str(entry["status"]), style=style))
        parts.append(nodes)
    traces = Table(title="traces", title_justify="left", show_edge=False, pad_edge=False)
    for column in ("trace", "kind", "state", "tokens", "conf", "answer"):
        traces.add_column(column)
    for view in list(state.traces.values())[:8]:
        tokens = str(view.live_tokens()) if view.node is not None else "…"
        live = getattr(view.node, "live_confidence", None)
        conf = f"{live:.2f}" if live is not None else ""
        traces.add_row(
            Text(f"{view.tree}.{view.trace}"), Text(view.kind), Text("running", style="yellow"), tokens, conf
        )
    for view in list(state.finished)[-6:]:
        style = {"finished": "green", "pruned": "magenta", "budget": "red"}.get(view.status, "red")
        label = view.status + (f" ({view.rule})" if view.rule else "")
        conf = f"{view.confidence:.2f}" if view.confidence is not None else ""
        # Text, not markup: kinds, rules and answers are model or user text
        cells = (Text(f"{view.tree}.{view.trace}"), Text(view.kind), Text(label, style=style), str(view.tokens), conf)
        traces.add_row(*cells, Text(view.answer or ""))
    parts.append(traces)
    budget = Text()
    cap = state.caps.get("max_tokens")
    if cap:
        budget.append(f"tokens {_bar(state.total_tokens, cap)} {state.total_tokens}/{cap}  ")
    else:
        budget.append(f"tokens {state.total_tokens}  ")
    calls_cap = state.caps.get("max_calls")
    budget.append(f"calls {state.calls}" + (f"/{calls_cap}" if calls_cap else "") + "  ")
    budget.append(f"{state.tokens_per_second():.0f} tok/s  pruned {state.pruned}")
    if state.exhausted:
        budget.append(f"  budget exhausted: {state.exhausted}", style="bold red")
    parts.append(budget)
    if state.answer is not None:
        parts.append(Text(f"answer: {state.answer}", style="bold"))
    return Group(*parts)


class LiveProgress:
    """A rich live view redrawn a few times a second while the run goes on."""

    def __init__(self, file: IO[str], *, caps: Mapping[str, Any] | None = None, refresh_per_second: float = 4) -> None:
        self.state = ProgressState(caps=dict(caps or {}))
        self._console = Console(file=file)
        self._refresh = refresh_per_second
        self._live: Live | None = None

    def start(self) -> None:
        self._live = Live(
            get_renderable=lambda: render_progress(self.state),
            console=self._console,
            refresh_per_second=self._refresh,
            transient=False,
        )
        self._live.start()

    def __call__(self, event: Event) -> None:
        self.state.update(event)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()  # draws the final state once more
            self._live = None


class PlainProgress:
    """One log line per significant event (for pipes, files and CI logs)."""

    def __init__(self, file: IO[str], *, caps: Mapping[str, Any] | None = None) -> None:
        self.file = file
        self.state = ProgressState(caps=dict(caps or {}))
        self._last_summary = 0.0

    def start(self) -> None:
        self._last_summary = time.monotonic()

    def stop(self) -> None:
        self.file.flush()

    def line(self, event: Event) -> str | None:
        """The line for ``event`` (None when it gets none)."""
        kind, d = event.kind, event.data
        stamp = f"[{event.t:7.2f}s]"
        if kind == "run_start":
            return f"{stamp} run started: strategy={d.get('strategy')} query={str(d.get('query', ''))[:80]!r}"
        if kind == "node_start":
            return f"{stamp} node {d.get('node')} started: {d.get('name') or d.get('kind') or ''}".rstrip()
        if kind == "node_end":
            return f"{stamp} node {d.get('node')} done in {float(d.get('duration_s') or 0):.2f}s: {d.get('output')}"
        if kind == "node_error":
            return f"{stamp} node {d.get('node')} failed: {d.get('error_type')}: {d.get('error')}"
        if kind == "plan":
            return f"{stamp} plan (round {d.get('round')}): {d.get('nodes')} nodes, width {d.get('width')}"
        if kind == "join":
            return f"{stamp} join: {d.get('action')} {d.get('answer') or ''}".rstrip()
        if kind == "replan":
            return f"{stamp} replanning: {d.get('reason')}"
        if kind == "trace_end":
            status = d.get("status")
            if status == "pruned":
                who = f"trace {d.get('tree')}.{d.get('trace')}"
                return f"{stamp} {who} pruned by {d.get('rule')} after {d.get('tokens')} tokens"
            if status == "finished" and d.get("answer") is not None:
                who = f"trace {d.get('tree')}.{d.get('trace')}"
                return f"{stamp} {who} finished: {d.get('tokens')} tokens, answer {d.get('answer')!r}"
            return None
        if kind == "budget_exhausted":
            return f"{stamp} budget exhausted: {d.get('detail') or d.get('cap')}"
        if kind == "error":
            return f"{stamp} error: {d.get('type')}: {d.get('message')}"
        if kind == "run_end":
            s = self.state
            return (
                f"{stamp} run {d.get('status')}: answer={d.get('answer')!r} tokens={s.total_tokens} "
                f"calls={s.calls} pruned={d.get('pruned')} ({s.tokens_per_second():.0f} tok/s)"
            )
        return None

    def __call__(self, event: Event) -> None:
        self.state.update(event)
        text = self.line(event)
        if text is None and event.kind in ("engine_call", "budget_charge"):
            now = time.monotonic()
            if now - self._last_summary >= 2.0:
                self._last_summary = now
                s = self.state
                text = f"[{event.t:7.2f}s] {s.total_tokens} tokens, {s.calls} calls, {s.tokens_per_second():.0f} tok/s"
        if text is not None:
            self.file.write(text + "\n")
            self.file.flush()


def make_progress(
    file: IO[str], *, live: bool | None = None, caps: Mapping[str, Any] | None = None
) -> LiveProgress | PlainProgress:
    """A live view when ``live`` is True (or None and ``file`` is a terminal), else plain lines."""
    if live is None:
        isatty = getattr(file, "isatty", None)
        live = bool(isatty()) if callable(isatty) else False
    return LiveProgress(file, caps=caps) if live else PlainProgress(file, caps=caps)
