"""DeepConf on scripted engines: warm-up threshold, online aborts inside the engine, consensus stop, offline filter."""

from __future__ import annotations

import pytest

from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.search import DeepConf, SearchContext

Q = "What is 6 x 7?"
SURE = -0.02  # logprob of every token of a confident trace
UNSURE = -2.5


def _long(answer: str, words: int) -> str:
    return " ".join(["hmm"] * words) + f" The answer is {answer}."


async def test_online_prunes_low_confidence_traces_inside_engine() -> None:
    confident = ScriptedResponse([_long("42", 30)], logprobs=SURE)
    unsure = ScriptedResponse([_long("41", 300)], logprobs=UNSURE)
    calls = {"n": 0}

    def reply(request: GenerationRequest) -> ScriptedResponse:
        calls["n"] += 1
        if request.n > 1:  # the warm-up request
            return confident
        return confident if calls["n"] % 3 == 0 else unsure  # 1 in 3 later traces is confident

    engine = FunctionEngine(reply, token_delay=0.0005)  # slower than the consumer, like a real engine
    strategy = DeepConf(n=10, warmup=2, keep=0.9, window=16, consensus=None)
    result = await strategy.run(Q, SearchContext(engine=engine, max_tokens=400))
    assert result.answer == "42"
    pruned = result.trace.pruned()
    assert len(pruned) >= 4
    assert all(node.pruned_by == "deepconf_low_group_confidence" for node in pruned)
    assert all(16 <= node.tokens < 100 for node in pruned)  # stopped right after one window, not at 300
    assert engine.aborted == len(pruned)  # each prune reached the engine as an abort
    assert engine.active == 0
    threshold = result.decisions[0]["value"]
    assert all(node.scores["group_confidence_at_prune"] < threshold for node in pruned)
    assert result.usage.completion_tokens < 10 * 300 / 2


async def test_online_stops_at_consensus() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 42."] * 4, logprobs=SURE))
    result = await DeepConf(n=16, warmup=4, consensus=0.9, concurrency=1).run(Q, SearchContext(engine=engine))
    assert result.answer == "42"
    assert len(engine.calls) < 16  # warm-up request + a few traces, not 12 more
    assert any(d["event"] == "consensus" for d in result.decisions)


async def test_offline_filters_least_confident_before_voting() -> None:
    texts = ["The answer is 41."] * 3 + ["The answer is 42."] * 2
    lps = [[UNSURE]] * 3 + [[SURE]] * 2
    engine = ScriptedEngine([ScriptedResponse(texts, logprobs=lps)])
    result = await DeepConf(n=5, mode="offline", keep=0.4, window=4).run(Q, SearchContext(engine=engine))
    assert result.answer == "42"  # plain majority would say 41
    filt = result.decisions[0]
    assert filt["kept"] == 2
    assert filt["of"] == 5


def test_bad_parameters() -> None:
    for kwargs in ({"n": 4, "warmup": 5}, {"keep": 0}, {"mode": "sideways"}, {"consensus": 0.3}, {"top_logprobs": 1}):
        with pytest.raises(ConfigError):
            DeepConf(**kwargs)  # type: ignore[arg-type]
