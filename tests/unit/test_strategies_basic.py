"""single, self_consistency and best_of_n on scripted engines: answers, clustering, weighting, budget cuts."""

from __future__ import annotations

import asyncio

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError, UnknownNameError
from branchwise.search import (
    BestOfN,
    Candidate,
    DeepConf,
    Prune,
    SearchContext,
    SelfConsistency,
    Single,
    Strategy,
    available_strategies,
    get_strategy,
)
from branchwise.search.sampling import pick_answer
from branchwise.verifiers.grading import MathGrader, NumericGrader

Q = "What is 6 x 7?"


def ctx_for(engine: ScriptedEngine, **kw: object) -> SearchContext:
    return SearchContext(engine=engine, **kw)  # type: ignore[arg-type]


async def test_single_is_greedy_and_extracts() -> None:
    engine = ScriptedEngine(["6 x 7 = 42. The answer is 42."])
    result = await Single().run(Q, ctx_for(engine))
    assert result.answer == "42"
    assert engine.calls[0].temperature == 0.0
    assert engine.calls[0].n == 1
    assert result.usage.completion_tokens == result.candidates[0].tokens > 0
    assert result.usage.calls == 1
    assert [n.status for n in result.trace.nodes] == ["finished"]
    engine.assert_complete()


async def test_self_consistency_majority_clusters_equivalent_answers() -> None:
    texts = ["The answer is 42.", "The answer is 42.0", "The answer is 41.", "so 1,000... The answer is 42"]
    engine = ScriptedEngine([ScriptedResponse(texts)])
    result = await SelfConsistency(n=4).run(Q, ctx_for(engine, grader=NumericGrader()))
    assert result.answer == "42"
    assert result.votes == {"42": 3.0, "41": 1.0}
    assert engine.calls[0].n == 4  # one request: the prompt's KV cache is shared
    assert len(result.candidates) == 4
    assert result.pruned == 0


async def test_self_consistency_math_equivalence_clusters_latex() -> None:
    texts = ["The answer is \\frac{1}{2}.", "The answer is 0.5", "The answer is 1/3"]
    engine = ScriptedEngine([ScriptedResponse(texts)])
    grader = MathGrader(timeout=30)
    try:
        result = await SelfConsistency(n=3).run(Q, ctx_for(engine, grader=grader))
    finally:
        grader.close()
    assert result.votes["\\frac{1}{2}"] == 2.0
    assert result.answer == "\\frac{1}{2}"


async def test_confidence_weighted_vote_can_overturn_majority() -> None:
    # Two unsure traces say 41, one very sure trace says 42.
    reply = ScriptedResponse(
        ["The answer is 41.", "The answer is 41.", "The answer is 42."],
        logprobs=[[-2.5], [-2.5], [-0.01]],
    )
    engine = ScriptedEngine([reply, reply])
    majority = await SelfConsistency(n=3).run(Q, ctx_for(engine))
    weighted = await SelfConsistency(n=3, voting="confidence", confidence="mean").run(Q, ctx_for(engine))
    assert majority.answer == "41"
    assert weighted.answer == "42"
    assert engine.calls[1].logprobs is not None
    assert engine.calls[1].logprobs >= 2
    sure = next(c for c in weighted.candidates if c.answer == "42")
    assert sure.confidence is not None
    assert weighted.trace.nodes[sure.trace_id].scores["confidence_mean"] == sure.confidence
    # the live confidence kept while streaming ends as the mean token logprob
    for node in weighted.trace.nodes:
        assert node.live_confidence == pytest.approx(node.scores["confidence_mean"])
    assert all(node.live_confidence is None for node in majority.trace.nodes)  # no logprobs asked


async def test_best_of_n_with_custom_verifier() -> None:
    engine = ScriptedEngine([ScriptedResponse(["The answer is 40.", "The answer is 42.", "The answer is 41."])])

    async def verifier(problem: str, candidate: Candidate) -> float:
        assert problem == Q
        return 1.0 if candidate.answer == "42" else 0.1

    result = await BestOfN(n=3, scorer=verifier).run(Q, ctx_for(engine))
    assert result.answer == "42"
    assert [c.score for c in result.candidates] == [0.1, 1.0, 0.1]
    assert result.trace.nodes[1].scores["verifier"] == 1.0


async def test_clipping_splits_remaining_budget_across_samples() -> None:
    long = " ".join(["step"] * 200) + " The answer is 9."
    engine = ScriptedEngine([ScriptedResponse(["The answer is 42.", long])])
    budget = Budget(max_completion_tokens=60)
    result = await SelfConsistency(n=2).run(Q, ctx_for(engine, budget=budget, max_tokens=400))
    assert engine.calls[0].max_tokens == 30  # 60 remaining tokens over 2 samples
    assert [n.finish_reason for n in result.trace.nodes] == ["stop", "length"]
    assert result.answer == "42"
    # No cap was reached (34 of 60 tokens), but the budget cut the long sample short: the run says so.
    assert not budget.exhausted and budget.clipped_calls == 1
    assert result.budget_exhausted
    assert result.trace.nodes[1].detail == "clipped by the budget to 30 tokens"
    assert result.trace.nodes[0].detail is None


@pytest.mark.parametrize("strategy", [Single(), SelfConsistency(n=2), Prune(n=2), DeepConf(n=3, warmup=1)])
async def test_a_sample_ending_at_its_own_max_tokens_is_not_a_budget_cut(strategy: Strategy) -> None:
    long = " ".join(["step"] * 200)
    engine = ScriptedEngine(default=ScriptedResponse([long]))
    budget = Budget(max_completion_tokens=10_000)
    result = await strategy.run(Q, ctx_for(engine, budget=budget, max_tokens=20))
    assert all(n.finish_reason == "length" and n.tokens == 20 for n in result.trace.nodes)
    assert budget.clipped_calls == 0 and not result.budget_exhausted


@pytest.mark.parametrize(
    ("strategy", "cap"),
    [
        (Prune(n=1, min_tokens=1000), 50),  # the only trace is clipped from 60 to 50 tokens
        (DeepConf(n=3, warmup=1, window=1000), 100),  # the warm-up trace leaves 40 tokens to the next ones
    ],
)
async def test_streamed_traces_clipped_by_the_budget_mark_the_run(strategy: Strategy, cap: int) -> None:
    long = " ".join(["step"] * 200)
    engine = ScriptedEngine(default=ScriptedResponse([long]))
    budget = Budget(max_completion_tokens=cap)
    result = await strategy.run(Q, ctx_for(engine, budget=budget, max_tokens=60))
    clipped = [n for n in result.trace.nodes if n.detail and n.detail.startswith("clipped by the budget")]
    assert clipped and all(n.status == "finished" and n.tokens < 60 for n in clipped)
    assert result.budget_exhausted
    assert budget.usage.completion_tokens <= cap


async def test_shared_budget_cut_mid_stream_keeps_finished_samples() -> None:
    # Two problems run concurrently under one budget (as two DAG nodes would); together they cross the cap.
    long = " ".join(["step"] * 200)
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 42.", long]), token_delay=0.001)
    budget = Budget(max_completion_tokens=60)
    ctx = ctx_for(engine, budget=budget, max_tokens=400)
    results = await asyncio.gather(SelfConsistency(n=2).run(Q, ctx), SelfConsistency(n=2).run(Q, ctx))
    assert any(r.budget_exhausted for r in results)
    assert budget.exhausted
    assert budget.usage.completion_tokens <= 60
    for r in results:
        assert r.answer == "42"  # the short sample finished before the cap in both runs
        assert "budget" in {n.status for n in r.trace.nodes} or not r.budget_exhausted
    assert engine.active == 0


async def test_exhausted_budget_before_start_gives_empty_result() -> None:
    engine = ScriptedEngine([], default="The answer is 1.")
    budget = Budget(max_calls=1)
    first = await Single().run(Q, ctx_for(engine, budget=budget))
    second = await Single().run(Q, ctx_for(engine, budget=budget))
    assert first.answer == "1"
    assert not first.budget_exhausted
    assert second.budget_exhausted
    assert second.answer is None
    assert len(engine.calls) == 1


def test_registry_and_validation() -> None:
    assert {"single", "self_consistency", "best_of_n"} <= set(available_strategies())
    assert isinstance(get_strategy("self_consistency", n=4), SelfConsistency)
    with pytest.raises(UnknownNameError, match="self_consistency"):
        get_strategy("self_consistancy")
    with pytest.raises(ConfigError):
        SelfConsistency(n=0)
    with pytest.raises(ConfigError):
        SelfConsistency(voting="loudest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        BestOfN(scorer="magic")  # type: ignore[arg-type]


def test_pick_answer_gives_a_tie_to_the_answer_seen_first() -> None:
    assert pick_answer({"41": 2.0, "42": 2.0}) == "41"
    assert pick_answer({"42": 2.0, "41": 2.0}) == "42"
    assert pick_answer({"7": 1.0, "8": 3.0, "9": 3.0}) == "8"
    assert pick_answer({}) is None


async def test_a_tied_vote_goes_to_the_first_sampled_answer() -> None:
    for first, second in (("3", "4"), ("4", "3")):
        engine = ScriptedEngine([ScriptedResponse([f"The answer is {first}.", f"The answer is {second}."])])
        result = await SelfConsistency(n=2).run("Q?", SearchContext(engine=engine))
        assert result.votes == {first: 1.0, second: 1.0}
        assert result.answer == first
