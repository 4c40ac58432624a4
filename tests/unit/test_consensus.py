"""consensus: sequential stopping on scripted engines, and the posterior win probability against exact values."""

from __future__ import annotations

import itertools
import math

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError
from branchwise.search import Consensus, SearchContext, SelfConsistency, get_strategy
from branchwise.search.consensus import win_probability
from branchwise.verifiers.grading import NumericGrader

Q = "What is 3 + 4?"
SHORT_7 = "The answer is 7."
LONG_8 = "Adding three and four carefully, step by step, gives a total that we now report. The answer is 8."


def scripted(texts: list[str]) -> ScriptedEngine:
    # Tokens take time, as in a live engine: the budget's pump cannot run ahead to the end of every sample.
    return ScriptedEngine([ScriptedResponse(texts)], token_delay=0.001)


def ctx(engine: ScriptedEngine, budget: Budget | None = None) -> SearchContext:
    return SearchContext(engine=engine, grader=NumericGrader(), budget=budget or Budget())


async def test_stops_once_the_leader_cannot_lose_and_aborts_the_rest_in_the_engine() -> None:
    texts = [SHORT_7, SHORT_7, SHORT_7, LONG_8, LONG_8]
    engine = scripted(texts)
    result = await Consensus(n=5).run(Q, ctx(engine))
    assert result.answer == "7"
    # 3 votes for 7 with 2 samples left: no split of the 2 can overturn it, so the long samples are cancelled.
    statuses = sorted(node.status for node in result.trace.nodes)
    assert statuses == ["finished", "finished", "finished", "pruned", "pruned"]
    assert {node.pruned_by for node in result.trace.nodes if node.status == "pruned"} == {"consensus_decided"}
    assert engine.aborted == 1 and engine.active == 0  # the one request was aborted, nothing runs on
    assert result.decisions[-1]["action"] == "stop" and result.decisions[-1]["p_win"] == 1.0

    full = await SelfConsistency(n=5).run(Q, ctx(scripted(texts)))
    assert full.answer == result.answer
    assert result.usage.completion_tokens < full.usage.completion_tokens
    assert result.usage.prompt_tokens == full.usage.prompt_tokens  # one request each: the prompt is sent once


async def test_a_close_vote_runs_every_sample_and_answers_as_self_consistency() -> None:
    texts = [LONG_8, SHORT_7, "The answer is 8.", SHORT_7]
    consensus = await Consensus(n=4).run(Q, ctx(scripted(texts)))
    full = await SelfConsistency(n=4).run(Q, ctx(scripted(texts)))
    # 2-2: the tie goes to the answer of the earliest sample, although "7" finished first.
    assert consensus.answer == full.answer == "8"
    assert list(consensus.votes.items()) == list(full.votes.items()) == [("8", 2.0), ("7", 2.0)]
    assert consensus.usage.completion_tokens == full.usage.completion_tokens
    assert [d["action"] for d in consensus.decisions][-1] == "done"


async def test_batches_send_the_prompt_per_request_and_stop_between_requests() -> None:
    engine = ScriptedEngine(default=ScriptedResponse([SHORT_7]))
    result = await Consensus(n=8, batch=2).run(Q, ctx(engine))
    # After 2 batches: 4 votes for 7 with 4 samples left (4 > 4 is false); the 5th vote decides (5 - 0 > 3).
    assert [c.n for c in engine.calls] == [2, 2, 2]
    assert result.usage.calls == 3 and result.answer == "7"
    single_prompt = (await Consensus(n=2).run(Q, ctx(ScriptedEngine(default=SHORT_7)))).usage.prompt_tokens
    assert result.usage.prompt_tokens == 3 * single_prompt  # every request's prompt is counted


async def test_posterior_rule_stops_earlier_than_the_exact_rule() -> None:
    texts = [SHORT_7] * 4 + [LONG_8] * 12
    exact = await Consensus(n=16).run(Q, ctx(scripted(texts)))
    early = await Consensus(n=16, threshold=0.8, min_votes=4).run(Q, ctx(scripted(texts)))
    assert exact.answer == "8"  # 4 early votes cannot decide 16 samples; the long ones win
    assert early.answer == "7"  # the posterior bet on 4 agreeing early votes: a risk the threshold accepts
    assert early.usage.completion_tokens < exact.usage.completion_tokens
    stop = early.decisions[-1]
    assert stop["action"] == "stop" and stop["votes"] == 4 and stop["p_win"] >= 0.8


async def test_budget_stop_keeps_finished_votes_and_marks_the_run() -> None:
    texts = [SHORT_7, LONG_8, LONG_8]
    result = await Consensus(n=3).run(Q, ctx(scripted(texts), Budget(max_completion_tokens=20)))
    assert result.budget_exhausted
    assert result.answer == "7"
    # Three samples share 20 tokens: each call is clipped to 6, which cuts the long samples before their answer.
    assert [c.answer for c in result.candidates] == ["7", None, None]
    assert result.usage.completion_tokens <= 20


def _exact_win_probability(counts: list[int], remaining: int, prior: float) -> float:
    """Pólya-urn enumeration of the Dirichlet-multinomial predictive (counts + prior, plus an unseen bucket)."""
    weights = [c + prior for c in counts] + [prior]
    total = 0.0
    for seq in itertools.product(range(len(weights)), repeat=remaining):
        w, p = list(weights), 1.0
        for k in seq:
            p *= w[k] / sum(w)
            w[k] += 1
        final = [*counts, 0]
        for k in seq:
            final[k] += 1
        if final[0] > max(final[1:]):
            total += p
    return total


@pytest.mark.parametrize(
    ("counts", "remaining"), [([3, 1], 2), ([2, 1], 3), ([4], 4), ([3, 2, 1], 3), ([5, 1], 4), ([2, 2], 2)]
)
def test_win_probability_matches_the_exact_predictive(counts: list[int], remaining: int) -> None:
    exact = _exact_win_probability(counts, remaining, prior=1.0)
    estimate = win_probability([float(c) for c in counts], remaining, prior=1.0, seed=1)
    assert math.isclose(estimate, exact, abs_tol=0.035), (estimate, exact)


def test_win_probability_is_certain_only_when_no_outcome_overturns_the_lead() -> None:
    assert win_probability([6.0, 2.0], 3) == 1.0  # lead 4 > 3 remaining
    assert win_probability([5.0, 2.0], 3) < 1.0  # lead 3 = 3 remaining: the rival can tie
    assert win_probability([2.0, 2.0], 0) == 0.0  # a final tie is not a win
    assert win_probability([3.0, 1.0], 0) == 1.0
    assert win_probability([3.0, 1.0], 4, seed=5) == win_probability([3.0, 1.0], 4, seed=5)  # reproducible


def test_registered_with_bounds_and_validated() -> None:
    strategy = get_strategy("consensus", n=8, threshold=0.95)
    assert isinstance(strategy, Consensus) and strategy.n == 8
    with pytest.raises(ConfigError, match="at most"):
        get_strategy("consensus", n=10**8)
    with pytest.raises(ConfigError, match="threshold"):
        Consensus(threshold=0.5)
