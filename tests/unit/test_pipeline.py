"""The Pipeline facade on scripted engines: runs, budgets, streaming, cancellation, errors, closing, secrets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import branchwise as bw
from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.errors import ConfigError, EngineRequestError, SpecError
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.tracing import read_trace
from branchwise.search import Refine, Result, SelfConsistency, Single

Q = "What is 6 x 7?"
ANSWERS = ["6 x 7 = 42. The answer is 42.", "The answer is 42.", "The answer is 41."]


async def test_run_returns_answer_usage_and_a_fresh_budget_each_time() -> None:
    engine = ScriptedEngine(default=ANSWERS)
    async with Pipeline(engine, SelfConsistency(n=3), budget=Budget(max_calls=1), otel=False) as pipeline:
        first = await pipeline.run(Q)
        second = await pipeline.run(Q)  # a shared Budget would refuse the second call
    assert first.answer == second.answer == "42"
    assert first.usage.calls == second.usage.calls == 1
    assert first.llm_calls == 1
    assert first.usage.completion_tokens > 0
    assert first.pruned == 0 and not first.budget_exhausted
    assert first.result.votes == {"42": 2.0, "41": 1.0}
    assert first.summary()["answer"] == "42"
    assert not engine.closed  # a given engine is not the pipeline's to close


async def test_budget_cap_marks_the_result_and_is_recorded(tmp_path: Path) -> None:
    engine = ScriptedEngine(default=" ".join(["word"] * 200) + " The answer is 7.")
    trace = tmp_path / "t.jsonl"
    # the draft gets the whole allowance (clipped to 50 tokens), so the refinement round is refused
    pipeline = Pipeline(engine, Refine(rounds=2), budget={"max_completion_tokens": 50}, trace=trace, otel=False)
    result = await pipeline.run(Q)
    assert result.budget_exhausted
    assert result.usage.completion_tokens <= 50
    recorded = read_trace(trace)
    assert recorded.of_kind("budget_exhausted")[0].data["cap"] == "max_completion_tokens"
    assert recorded.run_end is not None and recorded.run_end.data["budget_exhausted"] is True


async def test_stream_yields_events_in_order_ending_with_run_end() -> None:
    pipeline = Pipeline(ScriptedEngine(default=ANSWERS), SelfConsistency(n=3), otel=False)
    kinds = [event.kind async for event in pipeline.stream(Q)]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end"
    assert kinds.count("trace_start") == kinds.count("trace_end") == 3
    assert "engine_call" in kinds and "budget_charge" in kinds and "strategy_end" in kinds


async def test_leaving_the_stream_early_cancels_the_run_and_aborts_the_engine(tmp_path: Path) -> None:
    engine = ScriptedEngine(default=" ".join(["tok"] * 500), token_delay=0.001)
    trace = tmp_path / "t.jsonl"
    pipeline = Pipeline(engine, Single(), trace=trace, otel=False)
    stream = pipeline.stream(Q)
    async for event in stream:
        if event.kind == "trace_start":
            break
    await stream.aclose()
    assert engine.aborted == 1 and engine.active == 0
    end = read_trace(trace).run_end
    assert end is not None and end.data["status"] == "cancelled"


async def test_engine_failure_is_recorded_and_raised(tmp_path: Path) -> None:
    engine = ScriptedEngine([EngineRequestError("backend said no")])
    trace = tmp_path / "t.jsonl"
    pipeline = Pipeline(engine, Single(), trace=trace, otel=False)
    with pytest.raises(EngineRequestError):
        await pipeline.run(Q)
    recorded = read_trace(trace)
    assert recorded.of_kind("error")[0].data["type"] == "EngineRequestError"
    assert recorded.run_end is not None and recorded.run_end.data["status"] == "error"
    assert recorded.of_kind("engine_call")[0].data["error"] == "EngineRequestError"


async def test_cancelling_a_run_keeps_the_trace(tmp_path: Path) -> None:
    engine = ScriptedEngine(default=" ".join(["tok"] * 500), token_delay=0.001)
    trace = tmp_path / "t.jsonl"
    started = asyncio.Event()
    pipeline = Pipeline(engine, Single(), trace=trace, otel=False)
    task = asyncio.create_task(
        pipeline.run(Q, listeners=[lambda e: started.set() if e.kind == "trace_start" else None])
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    recorded = read_trace(trace)
    assert [e.kind for e in recorded.events][:2] == ["run_start", "strategy_start"]
    assert recorded.run_end is not None and recorded.run_end.data["status"] == "cancelled"
    assert engine.aborted == 1


async def test_from_yaml_owns_and_closes_its_engines_but_not_given_ones() -> None:
    text = "engine: {backend: test, default: 'The answer is 5.'}\nthought: {strategy: single}\n"
    pipeline = Pipeline.from_yaml(text)
    result = await pipeline.run(Q)
    assert result.answer == "5"
    await pipeline.aclose()
    assert pipeline.engine.closed  # type: ignore[attr-defined]
    await pipeline.aclose()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        await pipeline.run(Q)
    given = ScriptedEngine(default="The answer is 6.")
    async with Pipeline.from_yaml(text, engines={"policy": given}) as shared:
        assert (await shared.run(Q)).answer == "6"
    assert not given.closed
    with pytest.raises(ConfigError, match="judge"):
        Pipeline.from_yaml(text, engines={"judge": given})


async def test_scripted_yaml_engine_rules_queue_default_and_exhaustion() -> None:
    text = (
        "engine:\n  backend: test\n  rules: [{when: 'apples', reply: 'The answer is 3.'}]\n"
        "  replies: ['The answer is 1.']\n"
    )
    async with Pipeline.from_yaml(text, overrides={"outputs.otel": False}) as pipeline:
        assert (await pipeline.run("How many apples?")).answer == "3"
        assert (await pipeline.run("pears?")).answer == "1"
        with pytest.raises(EngineRequestError, match="no rule matched"):
            await pipeline.run("pears again?")


async def test_secrets_from_the_environment_never_reach_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BW_SECRET_MODEL", "hush-hush-model")
    trace = tmp_path / "t.jsonl"
    text = (
        "engine: {backend: test, model: '${BW_SECRET_MODEL}', default: 'The answer is 2.'}\n"
        f"outputs: {{trace: '{trace}'}}\n"
    )
    async with Pipeline.from_yaml(text) as pipeline:
        assert pipeline.engine.model == "hush-hush-model"
        await pipeline.run(Q)
    content = trace.read_text()
    assert "hush-hush-model" not in content
    assert "${BW_SECRET_MODEL}" in content  # the reference is recorded, not its value
    assert "***" in content


def test_python_door_checks_arguments() -> None:
    engine = ScriptedEngine(default="x")
    with pytest.raises(ConfigError, match="engine"):
        Pipeline("not an engine")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="strategy"):
        Pipeline(engine, "self_consistency")
    with pytest.raises(ConfigError, match="planner"):
        Pipeline(engine, tools=object())
    with pytest.raises(ConfigError, match="max_tokens"):
        Pipeline(engine, budget={"max_tokens": -1})
    with pytest.raises(ConfigError, match="progress"):
        Pipeline(engine, progress="sometimes")  # type: ignore[arg-type]


async def test_empty_query_is_a_usage_error() -> None:
    with pytest.raises(ConfigError, match="query"):
        await Pipeline(ScriptedEngine(default="x")).run("  ")


def test_run_sync_and_top_level_helpers() -> None:
    engine = ScriptedEngine(default=ANSWERS)
    result = bw.run_sync(Q, engine=engine, strategy=SelfConsistency(n=3), budget=bw.Budget(max_tokens=1000), otel=False)
    assert result.answer == "42" and result.usage.calls == 1
    pipeline = bw.Pipeline(ScriptedEngine(default="The answer is 9."), otel=False)
    assert pipeline.run_sync(Q).answer == "9"


async def test_trace_path_template_and_header(tmp_path: Path) -> None:
    pipeline = Pipeline(ScriptedEngine(default="The answer is 1."), trace=tmp_path / "run-{run_id}.jsonl", otel=False)
    result = await pipeline.run(Q)
    assert result.trace_path is not None and result.trace_path.name == f"run-{result.run_id}.jsonl"
    header = json.loads(result.trace_path.read_text().splitlines()[0])
    assert header["format"] == "branchwise-trace" and header["version"] == 1
    assert header["run_id"] == result.run_id and header["query"] == Q and header["spec"] is None


async def test_plain_progress_lines_during_a_run() -> None:
    import io

    out = io.StringIO()
    engine = ScriptedEngine(default=ANSWERS)
    pipeline = Pipeline(engine, SelfConsistency(n=3), progress="auto", progress_file=out, otel=False)
    await pipeline.run(Q)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(f"run started: strategy=self_consistency query={Q!r}")
    assert sum("finished" in line for line in lines) == 3
    assert "run ok: answer='42'" in lines[-1]


async def test_scripted_response_logprobs_from_yaml_reach_the_confidence_vote() -> None:
    text = (
        "engine:\n  backend: test\n  rules:\n"
        "    - {when: 'certain', reply: {texts: ['The answer is 8.'], logprobs: -0.25}}\n"
        "    - {when: 'doubtful', reply: {texts: ['The answer is 8.'], logprobs: [[-2.0, -1.0]]}}\n"
        "thought: {strategy: self_consistency, n: 2, voting: confidence, confidence: mean}\n"
    )
    async with Pipeline.from_yaml(text, overrides={"outputs.otel": False}) as p:
        sure = await p.run("certain?")
        unsure = await p.run("doubtful?")
    assert sure.answer == unsure.answer == "8"
    assert isinstance(sure.result, Result) and isinstance(unsure.result, Result)
    assert [c.confidence for c in sure.result.candidates] == [-0.25, -0.25]  # one logprob for every token
    # a per-token list: -2.0, then -1.0 for every later token (the last value repeats)
    tokens = len(unsure.result.trace.nodes[0].text.split())
    expected = (-2.0 + -1.0 * (tokens - 1)) / tokens
    assert unsure.result.candidates[0].confidence == pytest.approx(expected)
    assert unsure.result.votes["8"] < sure.result.votes["8"]  # the vote is weighted by that confidence


async def test_pipelines_sharing_an_engine_record_each_call_once_and_attach_nothing_to_it(tmp_path: Path) -> None:
    engine = ScriptedEngine(default="The answer is 3.")
    first = Pipeline(engine, trace=tmp_path / "a.jsonl", otel=False)
    second = Pipeline(engine, trace=tmp_path / "b.jsonl", otel=False)
    await first.run(Q)
    await second.run(Q)
    for name in ("a.jsonl", "b.jsonl"):
        calls = read_trace(tmp_path / name).of_kind("engine_call")
        assert len(calls) == 1 and calls[0].data["role"] == "policy"
    assert engine._usage_hooks == []  # the runs found their calls on the event channel, not through hooks


async def test_an_engine_playing_two_roles_in_two_pipelines_is_named_per_run(tmp_path: Path) -> None:
    shared = ScriptedEngine(default="The answer is 3.")
    as_policy = Pipeline(shared, trace=tmp_path / "a.jsonl", otel=False)
    as_judge = Pipeline(ScriptedEngine(default="The answer is 3."), engines={"judge": shared}, otel=False)
    await as_policy.run(Q)
    judge_run = await as_judge.run(Q, trace=tmp_path / "b.jsonl")
    assert judge_run.answer == "3"
    assert [e.data["role"] for e in read_trace(tmp_path / "a.jsonl").of_kind("engine_call")] == ["policy"]
    assert [e.data["role"] for e in read_trace(tmp_path / "b.jsonl").of_kind("engine_call")] == ["policy"]


def test_a_missing_corpus_is_reported_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "engine: {backend: test, default: x}\nplanner: {kind: decompose}\ntools:\n  - retrieve: {corpus: nowhere/}\n"
    )
    with pytest.raises(SpecError, match="does not exist") as info:
        Pipeline.from_yaml(path)
    assert info.value.line == 4 and info.value.path == "tools.0.corpus"


async def test_a_budget_passed_in_stays_the_callers_and_its_path_is_recorded(tmp_path: Path) -> None:
    import io

    parent = Budget(max_tokens=10_000, wall_clock_s=60, name="eval")
    child = parent.child("problem-1")
    out = io.StringIO()
    trace = tmp_path / "t.jsonl"
    pipeline = Pipeline(ScriptedEngine(default=ANSWERS), SelfConsistency(n=3), trace=trace, progress="on",
                        progress_file=out, otel=False)  # fmt: skip
    result = await pipeline.run(Q, budget=child)
    assert child._stopped_at is None and parent._stopped_at is None  # not frozen: the caller's to stop
    assert parent.usage.calls == 1 and result.usage.calls == 1
    recorded = read_trace(trace)
    assert recorded.events[0].data["budget_path"] == "eval/problem-1"
    assert {e.data["budget"] for e in recorded.of_kind("budget_charge")} == {"eval/problem-1"}
    assert f"tokens {result.usage.total_tokens}" in out.getvalue()  # the live view counted the child's charges
