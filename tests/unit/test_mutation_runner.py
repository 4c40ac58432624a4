"""The evaluation runner's pieces in detail (gaps found by mutation testing, `make mutation`): reading a result
into rows (defaults, nested results, candidate fields), grading and clustering candidates, sweeps, usage and the
solver's sampling defaults."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.engine.types import GenerationRequest
from branchwise.errors import BudgetExhausted, ConfigError, EngineTimeout
from branchwise.evals.datasets import Benchmark, Problem, load_benchmark
from branchwise.evals.runner import (
    EvalConfig,
    _attr,
    _first_leaf,
    _grade,
    _outcome,
    _usage_dict,
    config_id,
    parse_sweep,
    run_eval,
    strategy_solver,
)
from branchwise.evals.store import ResultsStore
from branchwise.events import use_sink
from branchwise.search import PromptTemplate, SelfConsistency
from branchwise.verifiers.grading import NumericGrader


def test_attributes_and_keys_fall_back_to_the_default() -> None:
    assert _attr({}, "x", 5) == 5 and _attr(SimpleNamespace(), "x", 5) == 5
    assert _attr({"x": 1}, "x", 5) == 1 and _attr(SimpleNamespace(x=1), "x", 5) == 1


def test_an_outcome_reads_answers_candidates_votes_and_flags() -> None:
    result = {
        "answer": 12,
        "result": {"candidates": None},  # a nested result without candidates: read the outer one
        "candidates": [
            {"answer": "12", "confidence": 0.5, "score": 0.9, "tokens": 7},
            SimpleNamespace(answer=None, confidence=None, score=None),  # no token count
        ],
        "votes": {12: 1},
        "usage": {"calls": 1},
    }
    outcome = _outcome(result, Budget())
    assert outcome.answer == "12" and outcome.votes == {"12": 1.0} and outcome.usage == {"calls": 1}
    assert outcome.candidates == [
        {"answer": "12", "confidence": 0.5, "verifier_score": 0.9, "tokens": 7},
        {"answer": None, "confidence": None, "verifier_score": None, "tokens": 0},
    ]
    assert outcome.budget_exhausted is False  # not said: not exhausted
    empty = _outcome({"answer": None}, Budget())
    assert empty.answer is None and empty.candidates == [] and empty.budget_exhausted is False
    assert _outcome({"answer": 1, "budget_exhausted": True}, Budget()).budget_exhausted is True


def test_usage_must_be_a_mapping_or_have_to_dict() -> None:
    assert _usage_dict(None) == {} and _usage_dict(SimpleNamespace(to_dict=lambda: {"a": 1})) == {"a": 1}
    with pytest.raises(ConfigError) as caught:
        _usage_dict(object())
    assert str(caught.value) == "result usage must be a mapping or have to_dict(), got object"


async def test_candidates_are_graded_and_clustered_by_equivalence() -> None:
    outcome = _outcome(
        {
            "answer": "2",
            "candidates": [{"answer": None}, {"answer": "2"}, {"answer": "2.0"}, {"answer": "3"}, {"answer": "2"}],
        },
        Budget(),
    )
    correct, score, graded = await _grade(NumericGrader(), Problem("p", "1 + 1?", ("2",), "toy"), outcome)
    assert (correct, score) == (True, 1.0)
    assert [(g["answer"], g["cluster"], g["correct"], g["score"]) for g in graded] == [
        (None, None, False, 0.0),
        ("2", 0, True, 1.0),
        ("2.0", 0, True, 1.0),
        ("3", 1, False, 0.0),
        ("2", 0, True, 1.0),
    ]


def test_sweep_values_may_contain_equals_signs() -> None:
    assert parse_sweep(["k=x=1,2"]) == [{"k": "x=1"}, {"k": "2"}]


def test_the_first_leaf_of_nested_groups() -> None:
    leaf = ValueError("leaf")
    group = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [leaf]), KeyError("k")])
    assert _first_leaf(group) is leaf


def test_the_solver_samples_with_the_documented_defaults_and_the_benchmarks_prompt() -> None:
    bench = load_benchmark("arithmetic", limit=1, seed=1)
    engine = ScriptedEngine(default="The answer is 1.")
    solve = strategy_solver(SelfConsistency(n=1), engine, bench)
    result: Any = asyncio.run(solve(bench.problems[0], Budget()))
    request = engine.calls[0]
    assert (request.temperature, request.top_p, request.max_tokens) == (0.7, 1.0, 512)
    assert request.messages == bench.prompt.messages(bench.problems[0].question)
    assert result.answer == "1"
    custom = ScriptedEngine(default="The answer is 1.")
    asyncio.run(
        strategy_solver(SelfConsistency(n=1), custom, bench, temperature=0.3, top_p=0.5, max_tokens=9)(
            bench.problems[0], Budget()
        )
    )
    assert (custom.calls[0].temperature, custom.calls[0].top_p, custom.calls[0].max_tokens) == (0.3, 0.5, 9)


def test_the_solver_asks_reads_and_clusters_as_the_benchmark_says() -> None:
    prompt = PromptTemplate("Q: {question}", "Be brief.")
    numbers = Benchmark("toy", (Problem("p", "6 + 1?", ("7",), "toy"),), "numeric", prompt, ("last_number",), "t")
    engine = ScriptedEngine(default="The answer is 5, not 7.")
    result: Any = asyncio.run(strategy_solver(SelfConsistency(n=1), engine, numbers)(numbers.problems[0], Budget()))
    assert engine.calls[0].messages == numbers.prompt.messages("6 + 1?")  # the benchmark's prompt and system turn
    assert result.answer == "7"  # read with the benchmark's rules (the last number), not "the answer is"
    tower = Problem("p", "Which tower?", ("Eiffel Tower",), "toy")
    words = Benchmark("toy", (tower,), "qa", PromptTemplate(), ("answer_is",), "t")
    texts = ["The answer is the Eiffel Tower.", "The answer is eiffel tower.", "The answer is Big Ben."]
    result = asyncio.run(
        strategy_solver(SelfConsistency(n=3), ScriptedEngine(default=texts), words)(words.problems[0], Budget())
    )
    assert result.votes == {"the Eiffel Tower": 2.0, "Big Ben": 1.0}  # clustered by the benchmark's (QA) grader


def test_no_problem_starts_once_the_global_call_cap_is_reached(tmp_path: Path) -> None:
    bench = load_benchmark("arithmetic", limit=3, seed=1)
    engine = ScriptedEngine(default="The answer is 1.")
    config = EvalConfig("single", strategy_solver(SelfConsistency(n=1), engine, bench))
    store = ResultsStore(tmp_path / "results.db")
    summary = asyncio.run(run_eval(bench, [config], store, concurrency=1, budget=Budget(max_calls=1)))
    assert summary.stopped_by_budget
    # the first problem got its one call and is stored; the second is not started (nor discarded)
    assert (summary.configs[0].stored, summary.configs[0].discarded) == (1, 0)
    assert len(engine.calls) == 1


def _run(tmp_path: Path, configs: list[EvalConfig], limit: int = 3, **kw: Any) -> tuple[Any, ResultsStore]:
    store = ResultsStore(tmp_path / "results.db")
    summary = asyncio.run(run_eval(load_benchmark("arithmetic", limit=limit, seed=1), configs, store, **kw))
    return summary, store


def test_an_empty_configuration_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^no configuration to evaluate$"):
        _run(tmp_path, [])


def test_a_configurations_parameters_are_stored(tmp_path: Path) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        return {"answer": "1"}

    _, store = _run(tmp_path, [EvalConfig("c", solve, params={"n": 4})])
    assert [(c.label, c.params) for c in store.configs()] == [("c", {"n": 4})]


def test_four_problems_run_at_once_by_default(tmp_path: Path) -> None:
    running = [0]
    peak = [0]

    async def solve(problem: Problem, budget: Budget) -> Any:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.02)
        running[0] -= 1
        return {"answer": "1"}

    _run(tmp_path, [EvalConfig("c", solve)], limit=6)
    assert peak[0] == 4


def test_a_problem_cut_by_its_own_budget_is_stored_as_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [BudgetExhausted("max_tokens", "per-problem cap"), EngineTimeout("too slow")]

    async def solve(problem: Problem, budget: Budget) -> Any:
        raise failures.pop(0)  # one problem at a time: the first is cut by its own budget, the second fails

    with caplog.at_level("WARNING", logger="branchwise.evals.runner"):
        _, store = _run(tmp_path, [EvalConfig("c", solve)], limit=2, concurrency=1)
    first, second = sorted(store.rows(), key=lambda r: r.started_at)
    assert (first.error, first.budget_exhausted, first.answer, first.votes) == (
        "BudgetExhausted: per-problem cap",
        True,
        None,
        {},
    )
    assert (second.error, second.budget_exhausted, second.votes) == ("EngineTimeout: too slow", False, {})
    assert [r.getMessage() for r in caplog.records] == [f"c failed on {second.problem_id}: too slow"]


def test_rows_record_the_answer_and_modelled_times(tmp_path: Path) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        await asyncio.sleep(0.05)
        return {"answer": "41"}

    before = time.time()
    _, store = _run(tmp_path, [EvalConfig("c", solve, time_scale=2.0)], limit=1)
    after = time.time()
    (row,) = store.rows()
    assert row.answer == "41"
    assert 0.1 <= row.latency_s < 2 * (after - before)  # 0.05 s real, twice that modelled
    assert before <= row.started_at < row.finished_at <= before + 2 * (after - before)
    assert row.finished_at - row.started_at >= 0.1


def test_a_problem_that_ran_when_a_global_token_cap_was_reached_is_not_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine(default="a b c d e")

    async def solve(problem: Problem, budget: Budget) -> Any:
        await budget.bind(engine).generate(GenerationRequest(prompt="x", max_tokens=10))  # clipped to the cap
        return {"answer": "1"}  # a result that does not say it was cut

    with caplog.at_level("WARNING", logger="branchwise.evals.runner"):
        summary, store = _run(tmp_path, [EvalConfig("c", solve)], concurrency=1, budget=Budget(max_completion_tokens=3))
    assert summary.stopped_by_budget and store.count() == 0 and summary.configs[0].discarded == 1
    assert [r.getMessage() for r in caplog.records] == [
        "global budget exhausted (max_completion_tokens): c stopped early"
    ]


def test_every_problem_cut_by_the_global_budget_is_counted_as_discarded(tmp_path: Path) -> None:
    engine = ScriptedEngine(default=" ".join(f"w{i}" for i in range(50)), token_delay=0.002)

    async def solve(problem: Problem, budget: Budget) -> Any:
        await budget.bind(engine).generate(GenerationRequest(prompt="x", max_tokens=50))
        return {"answer": "1"}

    summary, store = _run(tmp_path, [EvalConfig("c", solve)], concurrency=2, budget=Budget(max_completion_tokens=20))
    assert store.count() == 0 and summary.configs[0].discarded == 2  # both were streaming when the cap was reached


def test_config_ids_are_stable_and_depend_on_the_data_not_the_order_of_parameters() -> None:
    bench = load_benchmark("arithmetic", limit=1, seed=1)
    pinned = config_id(bench, "c", {"n": 4, "t": 0.7})
    assert pinned == config_id(bench, "c", {"t": 0.7, "n": 4})
    assert pinned == "4a8588829c038ff8"  # results files stay resumable across versions
    assert config_id(bench, "c", {"path": Path("x")}) == config_id(bench, "c", {"path": "x"})  # str() of the rest
    moved = replace(bench, sha256=None, source="elsewhere")
    assert config_id(moved, "c", {}) != config_id(replace(moved, source="here"), "c", {})


def test_the_run_records_its_command_and_reproducibility_record(tmp_path: Path) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        return {"answer": "1"}

    _, store = _run(tmp_path, [EvalConfig("c", solve)], repro={"seed": 1}, argv=["branchwise", "eval"])
    (run,) = store.runs()
    assert (run.argv, run.repro, run.status) == (["branchwise", "eval"], {"seed": 1}, "finished")


def test_existing_rows_without_resume_are_refused_with_a_way_out(tmp_path: Path) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        return {"answer": "1"}

    store = ResultsStore(tmp_path / "results.db")
    bench = load_benchmark("arithmetic", limit=1, seed=1)
    asyncio.run(run_eval(bench, [EvalConfig("c", solve)], store))
    with pytest.raises(ConfigError) as caught:
        asyncio.run(run_eval(bench, [EvalConfig("c", solve)], store))
    assert str(caught.value).endswith(
        "already holds results of 'c': pass --resume to continue that run, or choose another results file"
    )


def test_configurations_after_a_budget_stop_are_listed_but_not_run(tmp_path: Path) -> None:
    calls: list[str] = []

    def solver(label: str) -> Any:
        async def solve(problem: Problem, budget: Budget) -> Any:
            calls.append(label)
            await budget.bind(ScriptedEngine(default="a")).generate(GenerationRequest(prompt="x"))
            return {"answer": "1"}

        return solve

    configs = [EvalConfig(label, solver(label)) for label in ("a", "b", "c")]
    summary, _ = _run(tmp_path, configs, concurrency=1, budget=Budget(max_calls=2))
    assert summary.stopped_by_budget and calls == ["a", "a"]
    assert [(c.label, c.total, c.stored) for c in summary.configs] == [("a", 3, 2), ("b", 3, 0), ("c", 3, 0)]


def test_the_grader_given_overrides_the_benchmarks(tmp_path: Path) -> None:
    async def solve(problem: Problem, budget: Budget) -> Any:
        return {"answer": "anything"}

    class Lenient(NumericGrader):
        async def grade(self, answer: Any, gold: Any) -> Any:
            result = await super().grade(answer, gold)
            return replace(result, correct=True, score=1.0)

    _, store = _run(tmp_path, [EvalConfig("c", solve)], limit=1, grader=Lenient())
    assert [r.correct for r in store.rows()] == [True]


def test_the_default_global_budget_is_named_eval(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def solve(problem: Problem, budget: Budget) -> Any:
        await budget.bind(ScriptedEngine(default="a")).generate(GenerationRequest(prompt="x"))
        return {"answer": "1"}

    with use_sink(lambda k, d: events.append((k, d))):
        _run(tmp_path, [EvalConfig("c", solve)], limit=1)
    assert [d["budget"].split("/")[0] for k, d in events if k == "budget_charge"] == ["eval", "eval"]
