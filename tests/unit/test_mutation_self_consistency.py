"""SelfConsistency's parameters, vote weights and result (gaps found by mutation testing, `make mutation`)."""

from __future__ import annotations

import math

import pytest

from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError
from branchwise.search import SearchContext, SelfConsistency
from branchwise.search.self_consistency import _weight

Q = "What is 6 x 7?"


def test_documented_defaults() -> None:
    s = SelfConsistency()
    assert (s.n, s.voting, s.confidence, s.window, s.top_logprobs) == (8, "majority", "lowest_group", 256, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "self_consistency: n must be >= 1, got 0"),
        ({"voting": "loudest"}, "self_consistency: voting must be 'majority' or 'confidence', got 'loudest'"),
        ({"window": 0}, "self_consistency: window must be >= 1 and top_logprobs in 2..20"),
        ({"top_logprobs": 1}, "self_consistency: window must be >= 1 and top_logprobs in 2..20"),
        ({"top_logprobs": 21}, "self_consistency: window must be >= 1 and top_logprobs in 2..20"),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SelfConsistency(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_smallest_and_largest_parameters_are_accepted() -> None:
    SelfConsistency(n=1, window=1, top_logprobs=2)
    SelfConsistency(top_logprobs=20)


def test_weights_are_group_confidences_or_exp_of_mean_logprobs() -> None:
    assert _weight(None) == 0.0
    assert _weight(math.nan) == 0.0
    assert _weight(2.5) == 2.5 and _weight(0.5) == 0.5  # positive: a group confidence, as it is
    assert _weight(0.0) == 1.0 and _weight(-1.0) == math.exp(-1.0)  # a mean logprob: a probability


async def test_confidence_voting_uses_the_strategys_window() -> None:
    confidence = {}
    for window in (2, 64):
        lps = [[-0.01, -0.01, -3.0, -0.01, -0.01, -0.01, -0.01, -0.01]]
        engine = ScriptedEngine([ScriptedResponse(["one two three four five six seven. The answer is 42."], lps)])
        result = await SelfConsistency(n=1, voting="confidence", window=window).run(Q, SearchContext(engine=engine))
        (confidence[window],) = [c.confidence for c in result.candidates]
    assert confidence[2] is not None and confidence[64] is not None
    assert confidence[2] < confidence[64]  # the short window isolates the unsure token


async def test_majority_voting_neither_asks_for_nor_computes_confidences() -> None:
    engine = ScriptedEngine([ScriptedResponse(["The answer is 42."] * 2)])
    result = await SelfConsistency(n=2).run(Q, SearchContext(engine=engine))
    assert engine.calls[0].logprobs is None
    assert [c.confidence for c in result.candidates] == [None, None]
    assert all(not node.scores for node in result.trace.nodes)
    assert result.strategy == "self_consistency"
    assert result.usage.calls == 1 and result.usage.completion_tokens == 8
