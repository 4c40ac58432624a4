"""Trace recording: JSONL writer and reader, format versioning, event sources, redaction, OpenTelemetry spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.events import current_sink, emit, use_sink
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.tracing import (
    TRACE_FORMAT,
    TRACE_VERSION,
    Event,
    OTelSink,
    Recorder,
    TraceFormatError,
    TraceSpool,
    TraceWriter,
    otel_enabled,
    read_trace,
)
from branchwise.search import DeepConf, SelfConsistency, TraceTree

Q = "What is 6 x 7?"


def test_writer_flushes_every_line_and_reader_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.jsonl"
    writer = TraceWriter(path, {"run_id": "r1", "query": Q})
    recorder = Recorder([writer])
    recorder("run_start", {"query": Q, "ratio": float("nan"), "pair": (1, 2)})
    # flushed: readable before the writer is closed
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": TRACE_FORMAT, "version": TRACE_VERSION, "run_id": "r1", "query": Q}
    assert json.loads(lines[1])["data"] == {"query": Q, "ratio": None, "pair": [1, 2]}
    recorder("run_end", {"status": "ok"})
    writer.close()
    trace = read_trace(path)
    assert [e.kind for e in trace.events] == ["run_start", "run_end"]
    assert [e.seq for e in trace.events] == [0, 1]
    assert trace.run_end is not None and trace.run_end.data["status"] == "ok"
    assert not trace.truncated


def test_a_spool_writes_traces_on_its_thread_in_order_and_says_when_each_is_written(tmp_path: Path) -> None:
    spool = TraceSpool()
    try:
        first, second = tmp_path / "a" / "1.jsonl", tmp_path / "2.jsonl"
        writers = [
            TraceWriter(first, {"run_id": "r1"}, spool=spool),
            TraceWriter(second, {"run_id": "r2"}, spool=spool),
        ]
        recorders = [Recorder([w]) for w in writers]
        for i in range(50):
            recorders[i % 2]("decision", {"i": i})
        written = spool.written(first)
        assert written is not None
        assert spool.sync().wait(10)  # everything asked for so far is on disk, the files still open
        assert len(first.read_text().splitlines()) == 26 and not written.is_set()
        writers[0].close()
        writers[0].close()  # idempotent
        assert written.wait(10) and spool.written(first) is None
        trace = read_trace(first)
        assert trace.header["run_id"] == "r1" and [e.data["i"] for e in trace.events] == list(range(0, 50, 2))
        recorders[1]("run_end", {"status": "ok"})
        writers[1].close()
        spool.remove(second)  # after its writes
        assert spool.sync().wait(10) and not second.exists()
    finally:
        spool.stop(10)


def test_a_spool_logs_a_trace_it_cannot_write_and_writes_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    spool = TraceSpool()
    bad = TraceWriter(blocker / "t.jsonl", {"run_id": "bad"}, spool=spool)
    good = TraceWriter(tmp_path / "t.jsonl", {"run_id": "good"}, spool=spool)
    for writer in (bad, good):
        writer(Event(0, 0.0, "run_end", {"status": "ok"}))
        writer.close()
    spool.stop(10)  # writes everything asked for first
    assert read_trace(tmp_path / "t.jsonl").run_end is not None
    assert "cannot write trace file" in caplog.text and "not-a-folder" in caplog.text
    with pytest.raises(ConfigError, match="stopped"):
        spool.open(tmp_path / "late.jsonl")


def test_reader_rejects_other_formats_and_newer_versions(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "something-else", "version": 1}) + "\n")
    with pytest.raises(TraceFormatError, match="not a branchwise-trace"):
        read_trace(path)
    path.write_text(json.dumps({"format": TRACE_FORMAT, "version": TRACE_VERSION + 1}) + "\n")
    with pytest.raises(TraceFormatError, match="not supported"):
        read_trace(path)
    path.write_text("")
    with pytest.raises(TraceFormatError, match="empty"):
        read_trace(path)
    header = json.dumps({"format": TRACE_FORMAT, "version": 1})
    path.write_text(header + "\n{broken\n" + json.dumps({"seq": 1, "t": 0, "kind": "x", "data": {}}) + "\n")
    with pytest.raises(TraceFormatError, match=":2: not a JSON record"):
        read_trace(path)


def test_reader_tolerates_a_line_cut_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    event = json.dumps({"seq": 0, "t": 0.1, "kind": "run_start", "data": {}})
    path.write_text(json.dumps({"format": TRACE_FORMAT, "version": 1}) + "\n" + event + '\n{"seq": 1, "t"')
    trace = read_trace(path)
    assert trace.truncated and len(trace.events) == 1


def test_recorder_redacts_secrets_and_survives_a_failing_listener() -> None:
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    recorder = Recorder([broken, seen.append], secrets=["sk-123456"])
    recorder("engine_call", {"model": "sk-123456", "nested": [{"k": "key=sk-123456"}]})
    assert seen[0].data == {"model": "***", "nested": [{"k": "key=***"}]}


def test_emit_without_a_sink_is_a_no_op_and_sink_is_context_local() -> None:
    got: list[tuple[str, dict[str, object]]] = []
    emit("nothing", {})
    assert current_sink() is None
    with use_sink(lambda kind, data: got.append((kind, data))):
        tree = TraceTree()
        node = tree.open("sample")
        node.tokens = 3
        node.scores["confidence"] = 0.5
        tree.close(node, "pruned", rule="r", detail="d")
    assert current_sink() is None
    assert [k for k, _ in got] == ["trace_start", "trace_end"]
    end = got[1][1]
    assert end["tree"] == tree.uid and end["status"] == "pruned" and end["rule"] == "r"
    assert end["tokens"] == 3 and end["scores"] == {"confidence": 0.5}


async def test_budget_reports_charges_and_exhaustion_on_the_event_channel() -> None:
    budget = Budget(max_completion_tokens=5)
    got: list[tuple[str, dict[str, object]]] = []
    engine = budget.bind(ScriptedEngine(default="one two three four five six seven"))
    with use_sink(lambda kind, data: got.append((kind, data))):
        await engine.generate(GenerationRequest(prompt="p", max_tokens=20))
    budget_events = [(k, d) for k, d in got if k.startswith("budget_")]
    kinds = [k for k, _ in budget_events]
    assert "budget_exhausted" in kinds and kinds[-1] == "budget_charge"
    charge = budget_events[-1][1]
    assert charge["completion_tokens"] == 5 and charge["budget"] == "run"
    assert charge["usage"]["completion_tokens"] == 5  # type: ignore[index]


async def test_a_deepconf_run_records_prunes_scores_engine_calls_and_budget(tmp_path: Path) -> None:
    long = " ".join(f"w{i}" for i in range(40))
    engine = ScriptedEngine(
        [
            ScriptedResponse([long + " The answer is 4."] * 2, logprobs=-0.05),
            ScriptedResponse([long + " The answer is 9."], logprobs=-4.0),
        ],
        default=ScriptedResponse([long + " The answer is 4."], logprobs=-0.05),
    )
    trace = tmp_path / "t.jsonl"
    strategy = DeepConf(n=4, warmup=2, window=8, consensus=None, concurrency=1)
    await Pipeline(engine, strategy, trace=trace, budget={"max_tokens": 10_000}, otel=False).run(Q)
    recorded = read_trace(trace)
    kinds = [e.kind for e in recorded.events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    pruned = [e for e in recorded.of_kind("trace_end") if e.data["status"] == "pruned"]
    assert pruned and pruned[0].data["rule"] and pruned[0].data["scores"]
    calls = recorded.of_kind("engine_call")
    assert len(calls) == 3 and calls[0].data["n"] == 2 and calls[0].data["completion_tokens"] > 0
    charges = recorded.of_kind("budget_charge")
    assert len(charges) == 3 and charges[-1].data["remaining"]["tokens"] < 10_000
    end = recorded.of_kind("strategy_end")[0].data
    assert len(end["traces"]) == 4 and any("confidence" in k for t in end["traces"] for k in t["scores"])
    assert recorded.of_kind("decision")  # the threshold decision
    assert recorded.run_end is not None and recorded.run_end.data["pruned"] == len(pruned)


async def test_opentelemetry_spans_per_run_trace_and_engine_call() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = ScriptedEngine(default=["The answer is 42.", "The answer is 41.", "The answer is 42."])
    await Pipeline(engine, SelfConsistency(n=3), tracer_provider=provider).run(Q)
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert names.count("branchwise.run") == 1
    assert names.count("branchwise.trace") == 3
    assert names.count("branchwise.engine_call") == 1
    run = next(s for s in spans if s.name == "branchwise.run")
    call = next(s for s in spans if s.name == "branchwise.engine_call")
    assert call.parent is not None and call.parent.span_id == run.context.span_id
    assert call.attributes is not None and call.attributes["gen_ai.usage.output_tokens"] > 0
    assert run.attributes is not None and run.attributes["answer"] == "42"
    assert run.attributes["gen_ai.usage.input_tokens"] > 0


def test_spans_are_recorded_only_when_a_tracer_provider_would_keep_them() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # no global provider in the tests
    assert not otel_enabled()  # the API's default provider drops every span: no sink
    assert otel_enabled(TracerProvider())


def test_otel_sink_spans_for_plan_nodes() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sink = OTelSink(provider)
    recorder = Recorder([sink])
    recorder("run_start", {"query": Q})
    recorder("node_start", {"node": 1, "kind": "tool", "name": "calculator"})
    recorder("node_end", {"node": 1, "name": "calculator", "duration_s": 0.01, "output": "3"})
    recorder("node_start", {"node": 3, "kind": "tool", "name": "python"})
    recorder("node_error", {"node": 3, "name": "python", "error": "boom", "error_type": "ToolError"})
    recorder("node_start", {"node": 2, "kind": "tool", "name": "retrieve"})  # never ended: closed with the run
    recorder("run_end", {"status": "error", "error": "boom", "usage": {}})
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert len(exporter.get_finished_spans()) == 4
    assert spans["branchwise.run"].status.status_code.name == "ERROR"
    failed = [s for s in exporter.get_finished_spans() if s.attributes and s.attributes.get("name") == "python"]
    assert failed[0].status.status_code.name == "ERROR"


async def test_queries_with_line_separators_and_invalid_unicode_round_trip(tmp_path: Path) -> None:
    query = "first\u2028second\u0085third\x1c and a lone surrogate \udcff?"
    trace = tmp_path / "t.jsonl"
    await Pipeline(ScriptedEngine(default="The answer is 1."), trace=trace, otel=False).run(query)
    trace.read_bytes().decode("utf-8")  # still UTF-8 on disk
    recorded = read_trace(trace)
    assert recorded.header["query"] == query and recorded.events[0].data["query"] == query
    assert not recorded.truncated and recorded.run_end is not None


async def test_a_budgeted_call_is_one_engine_call_event() -> None:
    engine = ScriptedEngine(default="one two three")
    budgeted = Budget().bind(engine)
    got: list[tuple[str, dict[str, object]]] = []
    hooked: list[int] = []
    budgeted.add_usage_hook(lambda request, usage: hooked.append(usage.completion_tokens))
    with use_sink(lambda kind, data: got.append((kind, data))):
        await budgeted.generate(GenerationRequest(prompt="p", max_tokens=8))
    calls = [data for kind, data in got if kind == "engine_call"]
    assert len(calls) == 1 and calls[0]["completion_tokens"] == 3  # the wrapped engine's report only
    assert hooked == [3]  # the wrapper's own usage hooks still see the call
