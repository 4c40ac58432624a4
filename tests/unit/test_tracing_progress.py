"""Live progress (state folding, rich rendering, plain lines) and the trace viewer."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from branchwise.cli.trace_view import render_trace
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.progress import (
    LiveProgress,
    PlainProgress,
    ProgressState,
    make_progress,
    render_progress,
)
from branchwise.orchestrator.tracing import Event, Recorder, TraceWriter, read_trace
from branchwise.search import DeepConf


def text_of(renderable: Any, width: int = 140) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def events() -> list[Event]:
    start = {"query": "Which is older?", "strategy": "self_consistency", "budget": {"max_tokens": 1000}}
    usage = {"prompt_tokens": 100, "completion_tokens": 150, "calls": 2}
    raw: list[tuple[float, str, dict[str, Any]]] = [
        (0.0, "run_start", start),
        (0.05, "plan_node", {"node": 1, "kind": "tool", "name": "retrieve", "deps": []}),
        (0.06, "plan_node", {"node": 2, "kind": "tool", "name": "calculator", "deps": []}),
        (0.1, "node_start", {"node": 1, "kind": "tool", "name": "retrieve"}),
        (0.2, "trace_start", {"tree": 1, "trace": 0, "parent": None, "kind": "sample"}),
        (0.3, "trace_start", {"tree": 1, "trace": 1, "parent": None, "kind": "sample"}),
        (0.4, "node_end", {"node": 1, "name": "retrieve", "duration_s": 0.3, "attempts": 1, "output": "1788"}),
        (0.45, "node_error", {"node": 2, "name": "calculator", "error": "bad", "error_type": "ToolError"}),
        (0.5, "trace_end", {"tree": 1, "trace": 0, "kind": "sample", "status": "finished", "tokens": 40,
                            "answer": "1788", "scores": {"confidence_lowest_group": 0.91}, "rule": None}),
        (0.6, "budget_charge", {"budget": "run", "usage": usage}),
        (0.7, "budget_charge", {"budget": "run/node-1", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}),
        (0.8, "trace_end", {"tree": 1, "trace": 1, "kind": "sample", "status": "pruned", "tokens": 12,
                            "answer": None, "scores": {}, "rule": "deepconf_low_confidence"}),
        (0.9, "budget_exhausted", {"budget": "run", "cap": "max_tokens", "detail": "budget 'run' exhausted"}),
    ]  # fmt: skip
    return [Event(i, t, kind, data) for i, (t, kind, data) in enumerate(raw)]


def test_state_folds_events() -> None:
    state = ProgressState()
    for event in events()[:6]:
        state.update(event)
    assert state.strategy == "self_consistency" and state.caps == {"max_tokens": 1000}
    assert state.nodes == {
        "1": {"label": "retrieve", "status": "running"},
        "2": {"label": "calculator", "status": "pending"},
    }
    assert len(state.traces) == 2
    for event in events()[6:]:
        state.update(event)
    assert state.nodes["1"]["status"] == "done" and state.nodes["2"]["status"] == "failed"
    assert not state.traces and state.pruned == 1
    assert state.total_tokens == 250 and state.calls == 2  # child budgets do not double count
    assert state.exhausted == "max_tokens"
    assert state.finished[0].confidence == 0.91
    assert 270 < state.tokens_per_second() < 290


def test_render_shows_nodes_traces_and_budget_burn_down() -> None:
    state = ProgressState()
    for event in events()[:6]:
        state.update(event)
    text = text_of(render_progress(state))
    assert "Which is older?" in text and "retrieve" in text and "running" in text and "pending" in text
    for event in events()[6:]:
        state.update(event)
    text = text_of(render_progress(state))
    assert "1788" in text and "0.91" in text and "pruned (deepconf_low_confidence)" in text
    assert "250/1000" in text and "tok/s" in text and "budget exhausted: max_tokens" in text


def test_render_shows_model_and_tool_text_as_text_not_markup() -> None:
    state = ProgressState()
    hostile = "[/bold] [red]x[/]"
    state.update(Event(0, 0.0, "plan_node", {"node": 1, "kind": "tool", "name": hostile, "deps": []}))
    state.update(Event(1, 0.1, "trace_start", {"tree": 1, "trace": 0, "parent": None, "kind": hostile}))
    state.update(Event(2, 0.2, "trace_start", {"tree": 1, "trace": 1, "parent": None, "kind": "sample"}))
    end = {"tree": 1, "trace": 1, "kind": "sample", "status": "finished", "tokens": 3, "answer": hostile, "scores": {}}
    state.update(Event(3, 0.3, "trace_end", end))
    text = text_of(render_progress(state), width=200)
    assert text.count("[/bold] [red]x[/]") == 3  # the tool name, the running trace's kind, the finished answer


def test_plain_progress_lines() -> None:
    out = io.StringIO()
    plain = PlainProgress(out)
    plain.start()
    for event in events():
        plain(event)
    plain(Event(99, 1.0, "run_end", {"status": "ok", "answer": "1788", "pruned": 1, "usage": {}}))
    plain.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[   0.00s] run started: strategy=self_consistency")
    assert any("node 1 started: retrieve" in line for line in lines)
    assert any("node 1 done in 0.30s: 1788" in line for line in lines)
    assert any("node 2 failed: ToolError: bad" in line for line in lines)
    assert any("trace 1.0 finished: 40 tokens, answer '1788'" in line for line in lines)
    assert any("trace 1.1 pruned by deepconf_low_confidence after 12 tokens" in line for line in lines)
    assert any("budget exhausted" in line for line in lines)
    assert "run ok: answer='1788' tokens=250 calls=2 pruned=1" in lines[-1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_make_progress_picks_live_on_a_terminal_and_live_view_draws() -> None:
    assert isinstance(make_progress(io.StringIO()), PlainProgress)
    out = _Tty()
    live = make_progress(out, caps={"max_tokens": 1000})
    assert isinstance(live, LiveProgress)
    live.start()
    for event in events():
        live(event)
    live.stop()
    assert "deepconf_low_confidence" in out.getvalue()


async def test_trace_show_renders_a_recorded_run(tmp_path: Path) -> None:
    long = " ".join(f"w{i}" for i in range(40))
    engine = ScriptedEngine(
        [
            ScriptedResponse([long + " The answer is 4."] * 2, logprobs=-0.05),
            ScriptedResponse([long + " The answer is 9."], logprobs=-4.0),
        ],
        default=ScriptedResponse([long + " The answer is 4."], logprobs=-0.05),
    )
    path = tmp_path / "t.jsonl"
    strategy = DeepConf(n=4, warmup=2, window=8, consensus=None, concurrency=1)
    await Pipeline(engine, strategy, trace=path, budget={"max_tokens": 10_000}, otel=False).run("2+2?")
    text = text_of(render_trace(read_trace(path)))
    assert "strategy deepconf" in text and "answer '4'" in text
    assert "pruned by deepconf" in text and "confidence" in text
    assert "engine calls" in text and "policy (scripted): 3 calls" in text
    assert "budget over time (max_tokens 10000)" in text
    assert "tokens, 3 calls" in text


def test_trace_show_renders_plan_nodes_and_an_interrupted_run(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, {"run_id": "abc", "query": "q [with brackets]"})
    recorder = Recorder([writer])
    recorder("run_start", {"query": "q", "strategy": "single", "planner": "LLMCompiler", "tools": ["calculator"]})
    recorder("plan_node", {"node": 1, "kind": "tool", "name": "calculator", "deps": []})
    recorder("node_start", {"node": 1, "kind": "tool", "name": "calculator"})
    recorder("node_end", {"node": 1, "name": "calculator", "duration_s": 0.1, "output": "[1, 2]"})
    recorder("plan", {"round": 1, "nodes": 2, "width": 1})
    recorder("error", {"type": "EngineError", "message": "boom [x]"})
    writer.close()
    text = text_of(render_trace(read_trace(path)))
    assert "node 1 tool calculator" in text and "end: name=calculator" in text and "output=[1, 2]" in text
    assert "plan: round=1" in text
    assert "no run_end" in text and "EngineError: boom [x]" in text and "q [with brackets]" in text


def test_live_view_reads_running_traces_token_counts_but_records_no_objects(tmp_path: Path) -> None:
    from branchwise.events import use_sink
    from branchwise.search import TraceTree

    state = ProgressState()
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, {"run_id": "x"})
    recorder = Recorder([writer, state.update])
    with use_sink(recorder.emit):
        tree = TraceTree()
        node = tree.open("sample")
    node.tokens = 17  # grows while the trace streams
    assert "17" in text_of(render_progress(state))
    node.tokens = 23
    assert "23" in text_of(render_progress(state))
    node.live_confidence = -0.375  # the mean token logprob so far, kept up to date by the sampler
    assert "-0.38" in text_of(render_progress(state))
    writer.close()
    start = read_trace(path).of_kind("trace_start")[0]
    assert start.data == {"tree": tree.uid, "trace": 0, "parent": None, "kind": "sample"}


def test_final_confidences_from_strategy_end_reach_finished_traces() -> None:
    state = ProgressState()
    state.update(Event(0, 0.1, "trace_start", {"tree": 2, "trace": 0, "parent": None, "kind": "sample"}))
    state.update(Event(1, 0.2, "trace_end", {"tree": 2, "trace": 0, "status": "finished", "tokens": 5, "scores": {}}))
    assert state.finished[0].confidence is None
    traces = [{"trace": 0, "scores": {"confidence_lowest_group": 0.42}}]
    state.update(Event(2, 0.3, "strategy_end", {"tree": 2, "traces": traces}))
    assert state.finished[0].confidence == 0.42
    assert "0.42" in text_of(render_progress(state))
