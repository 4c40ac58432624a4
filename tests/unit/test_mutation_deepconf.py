"""DeepConf in detail (gaps found by mutation testing, `make mutation`): parameters, the recorded decisions, the
consensus rule's thresholds, the streaming phase's window, consensus and broken-stream handling."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallMeter, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError, EngineStreamBroken
from branchwise.search import Candidate, DeepConf, SearchContext
from branchwise.search.deepconf import _has_consensus, _weight

pytestmark = pytest.mark.timeout(60)

Q = "What is 6 x 7?"
SURE, UNSURE = -0.02, -2.5


def _long(answer: str, words: int) -> str:
    return " ".join(["hmm"] * words) + f" The answer is {answer}."


class Breaking(FunctionEngine):
    """Replies with ``fn``; the calls numbered in ``breaks`` (1-based) raise after ``after`` deltas."""

    def __init__(self, fn: Callable[[GenerationRequest], ScriptedResponse | str], *, breaks: set[int], after: int = 2):
        super().__init__(fn)
        self.breaks, self.after = breaks, after

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        number = len(self.calls) + 1
        delivered = 0
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                if number in self.breaks and delivered == self.after:
                    raise EngineStreamBroken(f"reset on call {number}")
                delivered += 1
                yield delta


def sure(request: GenerationRequest) -> ScriptedResponse:
    return ScriptedResponse(["Six sevens. The answer is 42."], logprobs=SURE)


# -- parameters -----------------------------------------------------------------------------------------------------


def test_documented_defaults() -> None:
    s = DeepConf()
    assert (s.n, s.warmup, s.keep, s.window, s.metric) == (16, 4, 0.9, 256, "lowest_group")
    assert (s.mode, s.consensus, s.top_logprobs, s.concurrency) == ("online", 0.95, 5, 8)


WINDOW_MESSAGE = "deepconf: window and concurrency must be >= 1, top_logprobs in 2..20"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0, "warmup": 0}, "deepconf: need n >= 1 and 1 <= warmup <= n, got n=0, warmup=0"),
        ({"n": 4, "warmup": 0}, "deepconf: need n >= 1 and 1 <= warmup <= n, got n=4, warmup=0"),
        ({"n": 4, "warmup": 5}, "deepconf: need n >= 1 and 1 <= warmup <= n, got n=4, warmup=5"),
        ({"keep": 0}, "deepconf: keep must be in (0, 1], got 0"),
        ({"keep": 1.5}, "deepconf: keep must be in (0, 1], got 1.5"),
        ({"mode": "sideways"}, "deepconf: mode must be 'online' or 'offline', got 'sideways'"),
        ({"consensus": 0.5}, "deepconf: consensus must be in (0.5, 1] or None, got 0.5"),
        ({"consensus": 1.5}, "deepconf: consensus must be in (0.5, 1] or None, got 1.5"),
        ({"window": 0}, WINDOW_MESSAGE),
        ({"top_logprobs": 1}, WINDOW_MESSAGE),
        ({"top_logprobs": 21}, WINDOW_MESSAGE),
        ({"concurrency": 0}, WINDOW_MESSAGE),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DeepConf(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_boundary_values_are_accepted() -> None:
    DeepConf(n=1, warmup=1, keep=1.0, consensus=1.0, window=1, top_logprobs=2, concurrency=1)
    DeepConf(top_logprobs=20, consensus=None)


# -- the consensus rule and the vote weights ------------------------------------------------------------------------


def _cands(*weights: tuple[str, float | None]) -> list[Candidate]:
    return [Candidate(answer, "", i, 1, confidence=w) for i, (answer, w) in enumerate(weights)]


async def test_consensus_needs_enough_candidates_and_the_share() -> None:
    ctx = SearchContext(engine=ScriptedEngine([]))
    two = _cands(("42", 0.2), ("42", 0.2))  # total weight below one still counts
    assert await _has_consensus(two, ctx, 0.95, 8)  # two candidates are enough while n // 4 <= 2
    assert await _has_consensus(two, ctx, 0.95, 10)  # n // 4 == 2 (not 2.5)
    assert not await _has_consensus(two, ctx, 0.95, 12)  # n // 4 == 3
    assert not await _has_consensus(_cands(("42", 1.0)), ctx, 0.5, 1)  # at least two, whatever n
    assert await _has_consensus(_cands(("42", 3.0), ("41", 1.0)), ctx, 0.75, 4)  # a share exactly at the bar
    assert not await _has_consensus(_cands(("42", 3.0), ("41", 3.0)), ctx, 0.75, 4)
    assert not await _has_consensus(_cands(("42", None), ("42", None)), ctx, 0.5, 4)  # no weight at all


def test_vote_weight_is_the_confidence_floored_at_zero() -> None:
    (none, half, negative) = _cands(("a", None), ("a", 0.5), ("a", -2.0))
    assert (_weight(none), _weight(half), _weight(negative)) == (0.0, 0.5, 0.0)


# -- offline --------------------------------------------------------------------------------------------------------


async def test_offline_records_its_filter_and_result() -> None:
    texts = ["The answer is 41."] * 3 + ["The answer is 42."] * 2
    lps = [[UNSURE]] * 3 + [[SURE]] * 2
    engine = ScriptedEngine([ScriptedResponse(texts, logprobs=lps)])
    result = await DeepConf(n=5, mode="offline", keep=0.4, window=4).run(Q, SearchContext(engine=engine))
    threshold = result.decisions[0]["threshold"]
    assert result.decisions == [{"event": "offline_filter", "threshold": threshold, "kept": 2, "of": 5}]
    assert result.strategy == "deepconf" and len(result.candidates) == 5 and len(result.trace) == 5
    assert result.usage.calls == 1 and result.budget_exhausted is False


async def test_offline_confidences_use_the_window() -> None:
    lps = [[SURE, SURE, UNSURE, SURE, SURE, SURE, SURE, SURE, SURE]]
    text = "one two three four five six seven. The answer is 42."
    engine = ScriptedEngine([ScriptedResponse([text], logprobs=lps)])
    result = await DeepConf(n=1, warmup=1, mode="offline", window=2).run(Q, SearchContext(engine=engine))
    (candidate,) = result.candidates
    engine2 = ScriptedEngine([ScriptedResponse([text], logprobs=lps)])
    wide = await DeepConf(n=1, warmup=1, mode="offline", window=64).run(Q, SearchContext(engine=engine2))
    assert candidate.confidence is not None and wide.candidates[0].confidence is not None
    assert candidate.confidence < wide.candidates[0].confidence


async def test_offline_records_a_broken_stream() -> None:
    engine = Breaking(sure, breaks={1})
    result = await DeepConf(n=2, warmup=1, mode="offline", window=4).run(Q, SearchContext(engine=engine))
    assert [d["event"] for d in result.decisions] == ["engine_error", "offline_filter"]


# -- online ---------------------------------------------------------------------------------------------------------


async def test_online_records_threshold_and_prunes_after_exactly_one_window() -> None:
    calls = {"n": 0}

    def reply(request: GenerationRequest) -> ScriptedResponse:
        calls["n"] += 1
        if request.n > 1:
            return ScriptedResponse([_long("42", 10)], logprobs=SURE)
        return ScriptedResponse([_long("41", 60)], logprobs=UNSURE)

    engine = FunctionEngine(reply)
    strategy = DeepConf(n=4, warmup=2, keep=0.9, window=4, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine))
    threshold = result.decisions[0]["value"]
    assert result.decisions == [
        {"event": "threshold", "value": threshold, "from_warmup": 2, "keep": 0.9},
        {"event": "pruned", "count": 2, "tokens": 8},
    ]
    assert [n.kind for n in result.trace.nodes] == ["warmup", "warmup", "sample", "sample"]
    pruned = result.trace.pruned()
    assert [(n.tokens, n.pruned_by) for n in pruned] == [(4, "deepconf_low_group_confidence")] * 2
    assert all(n.scores["group_confidence_at_prune"] < threshold for n in pruned)
    assert result.strategy == "deepconf" and result.votes == {"42": pytest.approx(result.votes["42"])}
    assert set(result.votes) == {"42"} and result.answer == "42"
    assert result.budget_exhausted is False  # traces pruned by the rule are not budget cuts


async def test_online_window_is_the_latest_tokens_not_the_whole_trace() -> None:
    # Warm-up traces are middling; a streamed trace starts very sure, then turns unsure: its latest window falls
    # below the threshold within a few tokens, while its mean over all tokens would stay above it far longer.
    def reply(request: GenerationRequest) -> ScriptedResponse:
        if request.n > 1:
            return ScriptedResponse([_long("42", 30)], logprobs=-0.5)
        return ScriptedResponse([_long("41", 80)], logprobs=[[-0.01] * 20 + [UNSURE]])

    engine = FunctionEngine(reply)
    strategy = DeepConf(n=3, warmup=2, keep=1.0, window=4, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine))
    (pruned,) = result.trace.pruned()
    assert pruned.tokens <= 24


async def test_online_streamed_candidates_get_the_windowed_confidence() -> None:
    lps = [[SURE, SURE, UNSURE, SURE, SURE, SURE, SURE, SURE, SURE]]
    text = "one two three four five six seven. The answer is 42."
    engine = FunctionEngine(lambda r: ScriptedResponse([text], logprobs=lps))
    strategy = DeepConf(n=3, warmup=1, keep=1.0, window=2, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine))
    assert len(result.candidates) == 3
    (expected,) = {c.confidence for c in result.candidates}
    assert expected is not None
    streamed = [n for n in result.trace.nodes if n.kind == "sample"]
    assert all(n.scores == {"confidence_lowest_group": expected} for n in streamed)


async def test_online_records_a_broken_warmup_stream() -> None:
    engine = Breaking(sure, breaks={1})
    result = await DeepConf(n=2, warmup=2, window=2, consensus=None).run(Q, SearchContext(engine=engine))
    assert [d["event"] for d in result.decisions] == ["engine_error", "threshold"]


async def test_online_without_warmup_confidence_has_no_threshold_and_streams_nothing() -> None:
    engine = ScriptedEngine([ScriptedResponse([""])])  # empty warm-up traces: no logprobs, no confidence
    result = await DeepConf(n=4, warmup=2, consensus=None).run(Q, SearchContext(engine=engine))
    assert result.decisions == [{"event": "threshold", "value": None, "from_warmup": 0, "keep": 0.9}]
    assert len(engine.calls) == 1


async def test_online_all_warmup_no_streaming_phase() -> None:
    engine = FunctionEngine(sure)
    result = await DeepConf(n=2, warmup=2, consensus=None).run(Q, SearchContext(engine=engine))
    assert [d["event"] for d in result.decisions] == ["threshold"]
    assert len(engine.calls) == 1


async def test_online_one_trace_after_warmup_is_streamed() -> None:
    engine = FunctionEngine(sure)
    result = await DeepConf(n=3, warmup=2, consensus=None, window=4).run(Q, SearchContext(engine=engine))
    assert [c.n for c in engine.calls] == [2, 1]
    assert [d["event"] for d in result.decisions] == ["threshold", "pruned"]


async def test_online_a_warmup_clipped_by_the_budget_streams_nothing() -> None:
    engine = FunctionEngine(lambda r: ScriptedResponse([_long("42", 20)], logprobs=SURE))
    budget = Budget(max_completion_tokens=10)  # the warm-up is clipped short
    result = await DeepConf(n=4, warmup=2, window=2, consensus=None).run(Q, SearchContext(engine=engine, budget=budget))
    assert result.budget_exhausted
    assert [d["event"] for d in result.decisions] == ["threshold"]
    assert len(engine.calls) == 1


async def test_online_consensus_stops_the_traces_in_flight() -> None:
    calls = {"n": 0}

    def reply(request: GenerationRequest) -> ScriptedResponse:
        calls["n"] += 1
        if request.n > 1:
            return ScriptedResponse(["The answer is 42."], logprobs=SURE)
        if calls["n"] == 2:
            return ScriptedResponse(["The answer is 42."], logprobs=SURE)
        return ScriptedResponse([_long("42", 300)], logprobs=SURE, token_delay=0.002)

    engine = FunctionEngine(reply)
    strategy = DeepConf(n=4, warmup=2, keep=0.5, window=2, consensus=0.6, concurrency=2)
    result = await strategy.run(Q, SearchContext(engine=engine))
    assert {"event": "consensus", "after_traces": 4} in result.decisions
    (stopped,) = result.trace.pruned()
    assert stopped.pruned_by == "deepconf_consensus_reached" and stopped.tokens < 300
    assert len(engine.calls) == 3


async def test_online_a_budget_cut_stops_starting_new_traces() -> None:
    def reply(request: GenerationRequest) -> ScriptedResponse:
        if request.n > 1:
            return ScriptedResponse(["The answer is 42."], logprobs=SURE)
        return ScriptedResponse([_long("42", 100)], logprobs=SURE, token_delay=0.02)

    engine = FunctionEngine(reply)
    strategy = DeepConf(n=6, warmup=2, keep=0.5, window=2, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine, budget=Budget(wall_clock_s=0.5)))
    assert result.budget_exhausted
    assert [n.status for n in result.trace.nodes] == ["finished", "finished", "budget"]


async def test_online_no_budget_to_retry_a_broken_trace_ends_the_run_marked() -> None:
    engine = Breaking(sure, breaks={2})
    strategy = DeepConf(n=3, warmup=2, window=2, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine, budget=Budget(max_calls=2)))
    assert result.budget_exhausted and result.answer == "42"
    assert result.decisions[1] == {
        "event": "engine_error",
        "error": "EngineStreamBroken: reset on call 2",
        "broken": [2],
        "action": "drop",
    }


async def test_online_a_trace_that_breaks_twice_is_dropped_and_too_many_fail_the_run() -> None:
    engine = Breaking(sure, breaks=set(range(2, 20)))
    strategy = DeepConf(n=4, warmup=1, window=2, consensus=None, concurrency=1)
    with pytest.raises(EngineStreamBroken, match="reset on call 7"):  # the last one dropped
        await strategy.run(Q, SearchContext(engine=engine))
    assert len(engine.calls) == 7


async def test_online_records_retry_then_drop_for_a_branch_that_breaks_twice() -> None:
    engine = Breaking(sure, breaks={2, 3})
    strategy = DeepConf(n=4, warmup=2, window=2, consensus=None, concurrency=1)
    result = await strategy.run(Q, SearchContext(engine=engine))
    errors = [d for d in result.decisions if d["event"] == "engine_error"]
    assert errors == [
        {"event": "engine_error", "error": "EngineStreamBroken: reset on call 2", "broken": [2], "action": "retry"},
        {"event": "engine_error", "error": "EngineStreamBroken: reset on call 3", "broken": [3], "action": "drop"},
    ]
    assert len(result.candidates) == 3 and result.answer == "42"
