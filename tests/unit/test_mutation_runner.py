"""The evaluation runner's pieces in detail (gaps found by mutation testing, `make mutation`): reading a result
into rows (defaults, nested results, candidate fields), grading and clustering candidates, sweeps, usage and the
solver's sampling defaults."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.errors import ConfigError
from branchwise.evals.datasets import Problem, load_benchmark
from branchwise.evals.runner import _attr, _first_leaf, _grade, _outcome, _usage_dict, parse_sweep, strategy_solver
from branchwise.search import SelfConsistency
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
