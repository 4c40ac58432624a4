"""DeepConf on scripted engines: warm-up threshold, online aborts inside the engine, consensus stop, offline filter."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
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


async def test_warmup_threshold_is_the_keep_quantile_of_warmup_confidences() -> None:
    # Warm-up traces of graded certainty: the threshold must lie among their confidences, at the keep quantile.
    lps = [[-0.01], [-0.5], [-1.0], [-2.0], [-3.0]]
    warm = ScriptedResponse([f"The answer is {i}." for i in range(5)], logprobs=lps)
    engine = ScriptedEngine([warm])
    result = await DeepConf(n=5, warmup=5, keep=1.0, window=2, consensus=None).run(Q, SearchContext(engine=engine))
    confidences = sorted(c.confidence for c in result.candidates if c.confidence is not None)
    assert len(confidences) == 5
    assert result.decisions[0]["value"] == confidences[0]  # keep=1.0: every warm-up trace passes
    engine = ScriptedEngine([warm])
    result = await DeepConf(n=5, warmup=5, keep=0.5, window=2, consensus=None).run(Q, SearchContext(engine=engine))
    confidences = sorted(c.confidence for c in result.candidates if c.confidence is not None)
    assert result.decisions[0]["value"] == confidences[2]  # the median of five


async def test_online_stops_starting_traces_when_the_budget_runs_out() -> None:
    sure = ScriptedResponse(["hmm " * 20 + "The answer is 42."], logprobs=SURE)
    engine = ScriptedEngine(default=sure)
    budget = Budget(max_completion_tokens=2 * 22 + 10)  # the warm-up, then room for half a trace
    strategy = DeepConf(n=8, warmup=2, window=4, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine, budget=budget))
    assert result.budget_exhausted and result.answer == "42"
    (streamed,) = [n for n in result.trace.nodes if n.kind == "sample"]  # none started after it
    assert streamed.status == "finished" and "clipped by the budget" in (streamed.detail or "")
    assert len(engine.calls) == 2
    assert engine.active == 0


async def test_offline_keep_everything_is_confidence_weighted_self_consistency() -> None:
    texts = ["The answer is 41."] * 3 + ["The answer is 42."] * 2
    engine = ScriptedEngine([ScriptedResponse(texts, logprobs=SURE)])
    result = await DeepConf(n=5, mode="offline", keep=1.0, window=4).run(Q, SearchContext(engine=engine))
    assert result.decisions[0]["kept"] == 5 and result.answer == "41"
    assert result.votes["41"] == pytest.approx(1.5 * result.votes["42"])  # equal confidences: 3 votes to 2
