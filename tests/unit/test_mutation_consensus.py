"""Consensus in detail (gaps found by mutation testing, `make mutation`): parameters, the exact decision records,
the posterior rule's inputs (leader first, the prior, a reproducible seed), batch sizes, and what cancelled and
budget-cut samples record."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError
from branchwise.search import Consensus, SearchContext
from branchwise.search.consensus import win_probability

pytestmark = pytest.mark.timeout(60)

Q = "What is 3 + 4?"
SHORT_7 = "3 + 4 = 7. The answer is 7."
LONG_8 = "Let me think about this for a while. " * 6 + "The answer is 8."


def _ctx(engine: ScriptedEngine, **kw: object) -> SearchContext:
    return SearchContext(engine=engine, **kw)  # type: ignore[arg-type]


# -- win_probability ------------------------------------------------------------------------------------------------


def test_win_probability_edges() -> None:
    assert win_probability([], 3) == 0.0  # no votes, no leader
    assert win_probability([1.0], 0) == 1.0  # a lone answer with nothing left to count has won
    assert win_probability([0.0, 5.0], 1) == 0.0  # a "leader" that cannot catch up never wins a draw
    assert 0.0 < win_probability([2.0, 1.0], 1) < 1.0  # one vote left can tie it: a real estimate


def test_win_probability_defaults_are_a_flat_prior_and_seed_zero() -> None:
    counts, remaining = [3.0, 2.0], 5
    default = win_probability(counts, remaining)
    assert default == win_probability(counts, remaining, prior=1.0, seed=0)
    assert default != win_probability(counts, remaining, prior=2.0, seed=0)
    assert default != win_probability(counts, remaining, prior=1.0, seed=1)


# -- parameters -----------------------------------------------------------------------------------------------------


def test_documented_defaults() -> None:
    s = Consensus()
    assert (s.n, s.batch, s.threshold, s.prior, s.min_votes) == (16, None, 1.0, 1.0, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "consensus: n, batch and min_votes must be >= 1, got 0, None, 3"),
        ({"batch": 0}, "consensus: n, batch and min_votes must be >= 1, got 16, 0, 3"),
        ({"min_votes": 0}, "consensus: n, batch and min_votes must be >= 1, got 16, None, 0"),
        ({"threshold": 0.5}, "consensus: threshold must be in (0.5, 1], got 0.5"),
        ({"threshold": 1.5}, "consensus: threshold must be in (0.5, 1], got 1.5"),
        ({"prior": 0}, "consensus: prior must be > 0, got 0"),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Consensus(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_boundary_values_are_accepted() -> None:
    Consensus(n=1, batch=1, min_votes=1, threshold=1.0, prior=0.01)


# -- runs -----------------------------------------------------------------------------------------------------------


async def test_every_check_is_recorded_exactly() -> None:
    engine = ScriptedEngine([ScriptedResponse([SHORT_7, "The answer is 8.", SHORT_7])])
    result = await Consensus(n=3).run(Q, _ctx(engine))
    # The short "8" finishes first; at 1-1 the leader is the earlier sample's answer, as in self-consistency.
    assert result.decisions == [
        {"samples": 1, "votes": 1, "leader": "8", "p_win": 0.0, "action": "continue"},
        {"samples": 2, "votes": 2, "leader": "7", "p_win": 0.0, "action": "continue"},
        {"samples": 3, "votes": 3, "leader": "7", "p_win": 1.0, "action": "done"},
    ]
    assert result.strategy == "consensus" and result.budget_exhausted is False
    assert [n.kind for n in result.trace.nodes] == ["sample"] * 3
    assert [(n.text, n.finish_reason) for n in result.trace.nodes] == [
        (SHORT_7, "stop"),
        ("The answer is 8.", "stop"),
        (SHORT_7, "stop"),
    ]


async def test_the_posterior_rule_bets_on_the_leader_with_the_given_prior_reproducibly() -> None:
    texts = [SHORT_7, SHORT_7, "The answer is 8."] + [LONG_8] * 7
    decisions = {}
    for prior in (1.0, 1.0, 5.0):
        engine = ScriptedEngine([ScriptedResponse(texts)], token_delay=0.001)
        result = await Consensus(n=10, threshold=0.99, min_votes=3, prior=prior).run(Q, _ctx(engine))
        (check,) = [d for d in result.decisions if d["votes"] == 3]
        decisions.setdefault(prior, []).append(check)
    first, again = decisions[1.0]
    assert first == again  # the same votes give the same decision
    assert first["leader"] == "7" and first["action"] == "continue"
    assert 0.5 < first["p_win"] < 0.99  # two of three votes: the leader is favoured, not certain
    assert isinstance(first["p_win"], float)
    assert decisions[5.0][0]["p_win"] != first["p_win"]  # a flatter prior trusts the early votes less


async def test_the_exact_rule_never_estimates_it_waits_for_a_safe_lead() -> None:
    engine = ScriptedEngine([ScriptedResponse([SHORT_7] * 4 + [LONG_8] * 4)], token_delay=0.001)
    result = await Consensus(n=8, min_votes=1).run(Q, _ctx(engine))
    assert [d["p_win"] for d in result.decisions] == [0.0] * 8  # the lead is never safe; a final tie is no win


async def test_batches_are_cut_to_the_samples_left() -> None:
    engine = ScriptedEngine(default=ScriptedResponse([SHORT_7, "The answer is 8."]))
    result = await Consensus(n=5, batch=2).run(Q, _ctx(engine))
    assert [c.n for c in engine.calls] == [2, 2, 1]
    assert result.decisions[-1]["action"] == "done"


async def test_no_answers_no_votes() -> None:
    result = await Consensus(n=2).run(Q, _ctx(ScriptedEngine([ScriptedResponse(["no idea"])])))
    assert result.answer is None and result.votes == {} and result.decisions == []


async def test_cancelled_samples_keep_their_text_and_say_when_they_stopped() -> None:
    engine = ScriptedEngine([ScriptedResponse([SHORT_7, SHORT_7, LONG_8])], token_delay=0.001)
    result = await Consensus(n=3).run(Q, _ctx(engine))
    (cancelled,) = result.trace.pruned()
    assert cancelled.pruned_by == "consensus_decided"
    assert cancelled.detail == f"cancelled after {cancelled.tokens} tokens"
    assert cancelled.tokens > 0 and LONG_8.startswith(cancelled.text) and len(cancelled.text) > 0


async def test_samples_cut_by_the_budget_are_marked_budget_with_their_text() -> None:
    engine = ScriptedEngine([ScriptedResponse([SHORT_7, LONG_8, LONG_8])], token_delay=0.02)
    result = await Consensus(n=3).run(Q, _ctx(engine, budget=Budget(wall_clock_s=0.5)))
    assert result.budget_exhausted is True and result.answer == "7"
    cut = [n for n in result.trace.nodes if n.status == "budget"]
    assert len(cut) == 2
    for node in cut:
        assert node.detail == f"cancelled after {node.tokens} tokens" and node.pruned_by is None
        assert node.tokens > 0 and LONG_8.startswith(node.text) and node.text
