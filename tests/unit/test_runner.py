"""The evaluation runner on scripted engines: rows, grading and clusters, concurrency, resume, failures, the
global budget, cancellation, sweeps and progress output."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedEngine
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError, EngineTimeout, EngineUnavailable
from branchwise.evals.datasets import Benchmark, Problem, load_benchmark
from branchwise.evals.runner import (
    EvalConfig,
    LineProgress,
    RichProgress,
    config_id,
    make_progress,
    parse_sweep,
    run_eval,
    strategy_solver,
)
from branchwise.evals.store import ResultsStore
from branchwise.search import SelfConsistency, Single


@pytest.fixture
def bench() -> Benchmark:
    return load_benchmark("arithmetic", limit=6, seed=1)


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    return ResultsStore(tmp_path / "results.db")


def gold_of(bench: Benchmark, request: GenerationRequest) -> str:
    assert request.messages is not None
    text = request.messages[-1].content
    return next(p.gold[0] for p in bench.problems if p.question in text)


def test_rows_graded_and_clustered(bench: Benchmark, store: ResultsStore) -> None:
    def reply(request: GenerationRequest) -> list[str]:
        g = int(gold_of(bench, request))
        # right, right spelled differently, wrong, no answer
        return [f"The answer is {g}.", f"So it is {g:,}.0 items", f"The answer is {g + 1}.", "I am not sure."]

    engine = FunctionEngine(reply)
    config = EvalConfig("sc4", strategy_solver(SelfConsistency(n=4), engine, bench, max_tokens=64), {"n": 4})
    summary = asyncio.run(run_eval(bench, [config], store, concurrency=2))
    assert summary.configs[0].stored == 6 and not summary.stopped_by_budget
    rows = store.rows()
    assert len(rows) == 6 and all(r.correct for r in rows)
    for r in rows:
        assert [c["correct"] for c in r.candidates] == [True, True, False, False]
        clusters = [c["cluster"] for c in r.candidates]
        assert clusters[0] == clusters[1] != clusters[2] and clusters[3] is None
        assert r.usage["calls"] == 1 and r.usage["completion_tokens"] > 0 and r.latency_s > 0
        assert r.level in {"1", "2", "3", "4", "5"} and r.run_id == summary.run_id
    (run,) = store.runs()
    assert run.status == "finished"


def test_concurrency_is_bounded_and_used(bench: Benchmark, store: ResultsStore) -> None:
    engine = FunctionEngine(lambda r: f"The answer is {gold_of(bench, r)}.", token_delay=0.005)
    inner = strategy_solver(Single(), engine, bench)
    running, peak = 0, 0

    async def solve(problem: Problem, budget: Budget) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await inner(problem, budget)
        finally:
            running -= 1

    asyncio.run(run_eval(bench, [EvalConfig("single", solve)], store, concurrency=3))
    assert peak == 3
    assert store.count() == 6


def test_resume_skips_finished_rows(bench: Benchmark, store: ResultsStore) -> None:
    engine = FunctionEngine(lambda r: f"The answer is {gold_of(bench, r)}.")
    config = EvalConfig("single", strategy_solver(Single(), engine, bench))
    # the first 3 problems, then all 6: the same configuration (same data), so a resume extends it
    asyncio.run(run_eval(load_benchmark("arithmetic", limit=3, seed=1), [config], store))
    assert store.count() == 3 and len(engine.calls) == 3
    with pytest.raises(ConfigError, match="--resume"):
        asyncio.run(run_eval(bench, [config], store))
    more = asyncio.run(run_eval(bench, [config], store, resume=True))
    assert more.configs[0].skipped == 3 and more.configs[0].stored == 3 and len(engine.calls) == 6
    again = asyncio.run(run_eval(bench, [config], store, resume=True))
    assert again.configs[0].skipped == 6 and again.configs[0].stored == 0 and len(engine.calls) == 6
    assert store.count() == 6 and sorted(r.problem_id for r in store.rows()) == sorted(p.id for p in bench.problems)
    assert [r.status for r in store.runs()] == ["finished"] * 3  # the refused call started no run


def test_failures_are_recorded_and_retried_on_resume(bench: Benchmark, store: ResultsStore) -> None:
    flaky = {bench.problems[1].id}

    async def solve(problem: Problem, budget: Budget) -> Any:
        if problem.id in flaky:
            raise EngineTimeout("too slow")
        return SimpleNamespace(answer=problem.gold[0], candidates=[], votes={}, usage=None, budget_exhausted=False)

    config = EvalConfig("fake", solve)
    summary = asyncio.run(run_eval(bench, [config], store))
    assert summary.configs[0].errors == 1
    failed = [r for r in store.rows() if r.error]
    assert [r.problem_id for r in failed] == [bench.problems[1].id] and not failed[0].correct
    assert "EngineTimeout: too slow" in (failed[0].error or "")
    flaky.clear()
    asyncio.run(run_eval(bench, [config], store, resume=True))
    assert store.count() == 6 and all(r.correct and r.error is None for r in store.rows())


def test_fatal_errors_stop_the_run_and_keep_finished_rows(bench: Benchmark, store: ResultsStore) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        if problem.id == bench.problems[3].id:
            raise EngineUnavailable("engine died")
        return {"answer": problem.gold[0], "usage": {"completion_tokens": 3}}

    with pytest.raises(EngineUnavailable, match="engine died"):  # itself, not wrapped in an ExceptionGroup
        asyncio.run(run_eval(bench, [EvalConfig("fake", solve)], store, concurrency=1))
    assert store.count() == 3 and store.runs()[0].status == "failed"
    assert store.rows()[0].usage == {"completion_tokens": 3}


def test_global_budget_stops_and_resume_finishes(bench: Benchmark, store: ResultsStore) -> None:
    engine = FunctionEngine(lambda r: f"The answer is {gold_of(bench, r)}.")
    config = EvalConfig("single", strategy_solver(Single(), engine, bench))
    summary = asyncio.run(run_eval(bench, [config], store, concurrency=1, budget=Budget(max_calls=4)))
    assert summary.stopped_by_budget and store.count() == 4
    assert store.runs()[0].status == "budget"
    # a token cap that cuts a problem mid-answer: that problem is not stored
    slow = FunctionEngine(lambda r: "The answer is " + "very " * 50 + gold_of(bench, r), token_delay=0)
    cut = EvalConfig("cut", strategy_solver(Single(), slow, bench, max_tokens=200))
    summary = asyncio.run(run_eval(bench, [cut], store, budget=Budget(max_completion_tokens=80), concurrency=1))
    cut_id = summary.configs[0].config_id
    assert summary.stopped_by_budget and summary.configs[0].discarded == 1
    assert store.count(cut_id) == 1  # 52 tokens fit, the second problem was cut at 28 and dropped
    asyncio.run(run_eval(bench, [config], store, resume=True))
    assert store.count(summary.configs[0].config_id) == 1 and store.count() == 7


def test_per_problem_budget_cut_is_a_result(bench: Benchmark, store: ResultsStore) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        return SimpleNamespace(
            answer=None,
            result=SimpleNamespace(candidates=[SimpleNamespace(answer="9", confidence=-0.2, tokens=4)], votes={"9": 1}),
            usage={"completion_tokens": 4, "calls": 1},
            budget_exhausted=True,
        )  # shaped like a pipeline RunResult

    asyncio.run(run_eval(bench, [EvalConfig("capped", solve)], store))
    rows = store.rows()
    assert len(rows) == 6 and all(r.budget_exhausted and not r.correct for r in rows)
    assert rows[0].candidates[0]["answer"] == "9" and rows[0].candidates[0]["confidence"] == -0.2
    assert rows[0].votes == {"9": 1.0}


def test_cancellation_reaches_the_engine(bench: Benchmark, store: ResultsStore) -> None:
    started = asyncio.Event()

    def reply(request: GenerationRequest) -> str:
        started.set()
        return "thinking " * 1000

    engine = FunctionEngine(reply, token_delay=0.001)
    config = EvalConfig("slow", strategy_solver(Single(), engine, bench, max_tokens=2000))

    async def main() -> None:
        task = asyncio.create_task(run_eval(bench, [config], store, concurrency=2))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.aborted == 2 and engine.active == 0
    assert store.count() == 0 and store.runs()[0].status == "interrupted"


def test_argument_errors(bench: Benchmark, store: ResultsStore) -> None:
    config = EvalConfig("a", strategy_solver(Single(), FunctionEngine(lambda r: "1"), bench))
    with pytest.raises(ConfigError, match="concurrency"):
        asyncio.run(run_eval(bench, [config], store, concurrency=0))
    with pytest.raises(ConfigError, match="unique"):
        asyncio.run(run_eval(bench, [config, config], store))
    with pytest.raises(ConfigError, match="no configuration"):
        asyncio.run(run_eval(bench, [], store))


def test_parse_sweep_and_config_ids(bench: Benchmark) -> None:
    assert parse_sweep([]) == [{}]
    assert parse_sweep(["thought.n=1,2,4"]) == [{"thought.n": "1"}, {"thought.n": "2"}, {"thought.n": "4"}]
    grid = parse_sweep(["a=1,2", "b=x,y,z"])
    assert len(grid) == 6 and grid[0] == {"a": "1", "b": "x"} and grid[-1] == {"a": "2", "b": "z"}
    for bad in ("a", "=1", "a=", "a=1,,2"):
        with pytest.raises(ConfigError, match="KEY=V1"):
            parse_sweep([bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_sweep(["a=1", "a=2"])
    assert config_id(bench, "x", {"n": 1}) == config_id(bench, "x", {"n": 1})
    assert config_id(bench, "x", {"n": 1}) != config_id(bench, "x", {"n": 2})
    assert len(config_id(bench, "x", {})) == 16


def test_progress_outputs(bench: Benchmark, store: ResultsStore) -> None:
    stream = io.StringIO()
    assert isinstance(make_progress(stream), LineProgress)
    engine = FunctionEngine(lambda r: f"The answer is {gold_of(bench, r)}.")
    config = EvalConfig("single", strategy_solver(Single(), engine, bench))
    asyncio.run(run_eval(bench, [config], store, progress=LineProgress(stream, every=3)))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[eval] single: 6 to run (0 already done)"
    assert lines[1].startswith("[eval] single: 3/6 acc 100.0% tokens ") and "eta" in lines[1]
    assert lines[-1].startswith("[eval] single: 6/6 acc 100.0%") and len(lines) == 3

    from rich.console import Console

    out = io.StringIO()
    rich = RichProgress(Console(file=out, force_terminal=True, width=120))
    other = EvalConfig("again", strategy_solver(Single(), engine, bench))
    asyncio.run(run_eval(bench, [other], store, progress=rich))
    text = out.getvalue()
    assert "again" in text and "6/6" in text and "acc 100.0%" in text
    # the same display serves a second run (the eval command runs one per engine group)
    third = EvalConfig("third", strategy_solver(Single(), engine, bench))
    asyncio.run(run_eval(bench, [third], store, progress=rich))
    assert "third" in out.getvalue()[len(text) :]


def test_a_long_run_does_not_keep_a_budget_per_problem(store: ResultsStore) -> None:
    bench = load_benchmark("arithmetic", limit=50, seed=2)
    engine = ScriptedEngine(default="The answer is 1.")
    budget = Budget(max_calls=1000)
    config = EvalConfig("single", strategy_solver(Single(), engine, bench))
    asyncio.run(run_eval(bench, [config], store, concurrency=8, budget=budget))
    assert store.count(config_id(bench, "single", {})) == 50
    assert budget.children == []  # each problem's budget was let go once its row was stored
    assert budget.usage.calls == 50  # while every problem's spending stays in the run's budget
