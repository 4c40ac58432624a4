"""``branchwise trace show``: a recorded run rendered as a rich tree.

The tree has the run at its root; below it the plan's nodes (with their events), the strategy runs and their
traces (status, tokens, answer, scores, prune decisions with the rule that fired), engine-call totals, and the
budget over time (cumulative tokens at each charge, with a bar against the cap).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.text import Text
from rich.tree import Tree

from ..orchestrator.tracing import Event, TraceFile

__all__ = ["render_trace"]


def _fmt_scores(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in scores.items())


def render_trace(trace: TraceFile, *, max_traces: int = 64) -> Tree:
    """A rich renderable of ``trace`` (pure: no I/O)."""
    h = trace.header
    end = trace.run_end
    start = next((e for e in trace.events if e.kind == "run_start"), None)
    title = Text()
    title.append("run ", style="bold")
    title.append(str(h.get("run_id", "?")), style="cyan")
    title.append(f"  {str(h.get('query', ''))[:100]!r}")
    root = Tree(title)
    if start is not None:
        d = start.data
        root.add(
            Text.assemble("strategy ", (str(d.get("strategy")), "bold"))
            + f" {d.get('params') or {}}"
            + (f"  planner {d.get('planner')}" if d.get("planner") else "")
            + (f"  tools {', '.join(d.get('tools') or [])}" if d.get("tools") else "")
        )
    if end is not None:
        d = end.data
        usage = d.get("usage") or {}
        style = "green" if d.get("status") == "ok" else "red"
        root.add(
            Text.assemble(
                (f"{d.get('status')}", style),
                f"  answer {d.get('answer')!r}"
                f"  tokens {usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)}"
                f"  calls {usage.get('calls', 0)}  pruned {d.get('pruned')}  {float(d.get('seconds') or 0):.2f}s"
                + ("  budget exhausted" if d.get("budget_exhausted") else ""),
            )
        )
    elif trace.truncated or trace.events:
        root.add(Text("no run_end: the run was interrupted or crashed (events up to the cut are shown)", style="red"))

    _plan(root, trace.events)
    _traces(root, trace.events, max_traces)
    _engine(root, trace.events)
    _budget(root, trace.events)
    errors = [e for e in trace.events if e.kind == "error"]
    if errors:
        branch = root.add(Text("errors", style="bold red"))
        for e in errors:
            branch.add(Text(f"{e.t:.2f}s {e.data.get('type')}: {e.data.get('message')}"))
    return root


def _plan(root: Tree, events: list[Event]) -> None:

    plan_kinds = ("plan", "plan_error", "join", "replan", "agent_end")
    node_events = [e for e in events if e.kind.startswith(("node_", "plan_node")) or e.kind in plan_kinds]
    if not node_events:
        return
    branch = root.add("[bold]plan[/bold]")
    nodes: dict[str, Any] = {}
    for e in node_events:
        d = e.data
        if e.kind in plan_kinds:
            branch.add(
                Text(f"{e.t:.2f}s {e.kind}: " + ", ".join(f"{k}={v}" for k, v in d.items() if k != "nodes")[:200])
            )
            continue
        node = str(d.get("node", d.get("id", "?")))
        if node not in nodes:
            label = " ".join(str(x) for x in (d.get("kind"), d.get("name") or d.get("tool")) if x)
            nodes[node] = branch.add(Text(f"node {node} {label}".rstrip()))
        extra = {k: v for k, v in d.items() if k not in ("node", "id")}
        nodes[node].add(
            Text(f"{e.t:.2f}s {e.kind.removeprefix('node_')}: " + ", ".join(f"{k}={v}" for k, v in extra.items())[:200])
        )


def _traces(root: Tree, events: list[Event], max_traces: int) -> None:

    ends: dict[tuple[Any, Any], Event] = {}
    opened: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        if e.kind == "trace_start":
            opened[e.data.get("tree")].append(e)
        elif e.kind == "trace_end":
            ends[(e.data.get("tree"), e.data.get("trace"))] = e
    strategies = {e.data.get("tree"): e for e in events if e.kind == "strategy_end"}
    final_scores = {
        (tree, t.get("trace")): t.get("scores") or {}
        for tree, e in strategies.items()
        for t in e.data.get("traces") or []
    }
    for tree, starts in opened.items():
        s = strategies.get(tree)
        head = Text.assemble(("traces", "bold"), f" (tree {tree})")
        if s is not None:
            votes = s.data.get("votes") or {}
            head.append(f" {s.data.get('strategy')}: answer {s.data.get('answer')!r} votes {votes}")
        branch = root.add(head)
        children: dict[Any, list[Event]] = defaultdict(list)
        for e in starts:
            children[e.data.get("parent")].append(e)
        shown = 0

        def add(parent_branch: Tree, start: Event, tree: Any = tree, children: Any = children) -> None:
            nonlocal shown
            if shown >= max_traces:
                return
            shown += 1
            tid = start.data.get("trace")
            end = ends.get((tree, tid))
            label = f"#{tid} {start.data.get('kind')}"
            if end is None:
                text = f"{label} running (no end recorded)"
                style = "yellow"
            else:
                d = end.data
                scores = {**(d.get("scores") or {}), **final_scores.get((tree, tid), {})}
                text = f"{label} {d.get('status')} {d.get('tokens')} tok"
                if d.get("answer") is not None:
                    text += f" answer={d.get('answer')!r}"
                if scores:
                    text += f" [{_fmt_scores(scores)}]"
                if d.get("status") == "pruned":
                    text += f" pruned by {d.get('rule')}" + (f": {d.get('detail')}" if d.get("detail") else "")
                style = {"finished": "green", "pruned": "magenta", "budget": "red"}.get(str(d.get("status")), "red")
            node = parent_branch.add(Text(text, style=style))
            for child in children.get(tid, []):
                add(node, child)

        for start in children.get(None, []):
            add(branch, start)
        if shown >= max_traces:
            branch.add(f"... {len(starts) - shown} more traces")
        if s is not None:
            for decision in s.data.get("decisions") or []:
                branch.add(Text(f"decision: {decision}"))


def _engine(root: Tree, events: list[Event]) -> None:
    calls = [e for e in events if e.kind == "engine_call"]
    if not calls:
        return
    by_role: dict[str, list[Event]] = defaultdict(list)
    for e in calls:
        by_role[str(e.data.get("role"))].append(e)
    branch = root.add("[bold]engine calls[/bold]")
    for role, items in by_role.items():
        prompt = sum(int(e.data.get("prompt_tokens") or 0) for e in items)
        completion = sum(int(e.data.get("completion_tokens") or 0) for e in items)
        aborted = sum(1 for e in items if e.data.get("aborted"))
        model = items[0].data.get("model")
        line = (
            f"{role} ({model}): {len(items)} calls, {prompt} prompt + {completion} completion tokens, {aborted} aborted"
        )
        branch.add(Text(line))  # Text, not markup: names come from the file


def _budget(root: Tree, events: list[Event]) -> None:
    start = next((e for e in events if e.kind == "run_start"), None)
    run_budget = start.data.get("budget_path") if start is not None else None
    charges = [
        e
        for e in events
        if e.kind == "budget_charge"
        and (e.data.get("budget") == run_budget or (run_budget is None and "/" not in str(e.data.get("budget", ""))))
    ]
    exhausted = [e for e in events if e.kind == "budget_exhausted"]
    if not charges and not exhausted:
        return
    cap = ((start.data.get("budget") or {}).get("max_tokens")) if start is not None else None
    branch = root.add("[bold]budget over time[/bold]" + (f" (max_tokens {cap})" if cap else ""))
    step = max(1, len(charges) // 12)
    for i, e in enumerate(charges):
        if i % step and i != len(charges) - 1:
            continue
        usage = e.data.get("usage") or {}
        total = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        bar = ""
        if cap:
            filled = round(min(1.0, total / cap) * 20)
            bar = "█" * filled + "░" * (20 - filled) + " "
        branch.add(f"{e.t:7.2f}s {bar}{total} tokens, {usage.get('calls', 0)} calls")
    for e in exhausted:
        branch.add(Text(f"{e.t:7.2f}s exhausted: {e.data.get('detail') or e.data.get('cap')}", style="red"))
