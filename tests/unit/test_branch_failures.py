"""One broken branch does not fail a run (issue 12 #12): a stream that breaks with an engine error is sampled again
once, or dropped and recorded; the run fails only when more than half of the branches it asked for are lost."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallMeter, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.errors import EngineError, EngineRequestError, EngineStreamBroken, EngineUnavailable
from branchwise.search import Beam, DeepConf, Prune, SearchContext, SelfConsistency, Single
from branchwise.search.sampling import enough_branches
from branchwise.verifiers.step_scorers import ScriptedStepScorer

pytestmark = pytest.mark.timeout(60)

Q = "What is 6 x 7?"


class BreakingEngine(FunctionEngine):
    """Streams ``fn``'s reply, but the calls numbered in ``breaks`` (1-based) raise ``error`` after ``after``
    deltas (or after ``breaks[call]`` when ``breaks`` is a mapping), the way a connection reset mid-stream reaches
    a strategy."""

    def __init__(
        self,
        fn: Callable[[GenerationRequest], ScriptedResponse | str],
        *,
        breaks: set[int] | dict[int, int],
        after: int = 3,
        error: EngineError | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(fn, token_delay=token_delay)
        self.breaks = breaks if isinstance(breaks, dict) else dict.fromkeys(breaks, after)
        self.error = error or EngineStreamBroken("connection reset by peer")

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        number = len(self.calls) + 1
        delivered = 0
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                if self.breaks.get(number) == delivered:
                    raise self.error
                delivered += 1
                yield delta


def fours(request: GenerationRequest) -> str:
    return "Six sevens make forty-two. The answer is 42."


async def test_a_stream_that_breaks_is_sampled_again_and_the_run_succeeds() -> None:
    engine = BreakingEngine(fours, breaks={1})
    result = await SelfConsistency(n=4).run(Q, SearchContext(engine=engine))
    assert result.answer == "42" and result.votes == {"42": 4.0}
    assert [c.n for c in engine.calls] == [4, 4]  # the broken request, then its retry
    statuses = [n.status for n in result.trace.nodes]
    assert statuses == ["error"] * 4 + ["finished"] * 4
    assert all("EngineStreamBroken" in (n.detail or "") for n in result.trace.nodes[:4])
    (record,) = result.decisions
    assert record["event"] == "engine_error" and record["broken"] == [0, 1, 2, 3]
    assert record["retries"] == [4, 5, 6, 7] and record["dropped"] == []
    assert engine.active == 0


async def test_only_the_unfinished_samples_are_sampled_again() -> None:
    # Two samples end after their first token; the stream breaks after four deltas: two samples were done.
    def reply(request: GenerationRequest) -> ScriptedResponse:
        return ScriptedResponse(["42", "42", "a longer sample. The answer is 42.", "and another. The answer is 41."])

    engine = BreakingEngine(reply, breaks={1}, after=5)
    result = await SelfConsistency(n=4).run(Q, SearchContext(engine=engine))
    assert [c.n for c in engine.calls] == [4, 2]
    assert [n.status for n in result.trace.nodes[:4]] == ["finished", "finished", "error", "error"]
    assert len(result.candidates) == 4 and result.answer == "42"


async def test_a_branch_that_breaks_again_is_dropped_and_the_run_goes_on_with_half() -> None:
    def reply(request: GenerationRequest) -> ScriptedResponse:
        return ScriptedResponse(["42", "42", "a longer sample. The answer is 42.", "and another. The answer is 41."])

    engine = BreakingEngine(reply, breaks={1: 5, 2: 0})  # the retry of the two unfinished samples breaks too
    result = await SelfConsistency(n=4).run(Q, SearchContext(engine=engine))
    assert result.answer == "42" and len(result.candidates) == 2
    (record,) = result.decisions
    assert len(record["dropped"]) == 2 and set(record["dropped"]) == set(record["retries"])
    assert [n.status for n in result.trace.nodes].count("error") == 4


async def test_the_run_fails_when_more_than_half_the_branches_are_lost() -> None:
    engine = BreakingEngine(fours, breaks={1, 2}, after=0)
    with pytest.raises(EngineStreamBroken):
        await SelfConsistency(n=4).run(Q, SearchContext(engine=engine))
    single = BreakingEngine(fours, breaks={1, 2}, after=2)
    with pytest.raises(EngineStreamBroken):
        await Single().run(Q, SearchContext(engine=single))
    assert enough_branches(dropped=2, asked=4) and not enough_branches(dropped=3, asked=4)
    assert not enough_branches(dropped=1, asked=1)


async def test_an_error_before_any_output_is_retried_like_a_break() -> None:
    engine = BreakingEngine(fours, breaks={1}, after=0, error=EngineUnavailable("engine core restarted"))
    result = await Single().run(Q, SearchContext(engine=engine))
    assert result.answer == "42" and len(engine.calls) == 2


async def test_a_rejected_request_fails_at_once() -> None:
    engine = BreakingEngine(fours, breaks={1}, after=2, error=EngineRequestError("bad request", status_code=400))
    with pytest.raises(EngineRequestError):
        await SelfConsistency(n=4).run(Q, SearchContext(engine=engine))
    assert len(engine.calls) == 1  # a 4xx is the request's fault: sampling it again cannot help


async def test_no_retry_without_budget_the_run_is_marked_instead() -> None:
    engine = BreakingEngine(fours, breaks={1}, after=3)
    budget = Budget(max_calls=1)  # the broken call was the last one allowed
    result = await SelfConsistency(n=4).run(Q, SearchContext(engine=engine, budget=budget))
    assert result.budget_exhausted and result.answer is None
    assert len(engine.calls) == 1
    assert result.decisions[0]["dropped"] == [0, 1, 2, 3] and "retries" not in result.decisions[0]


async def test_prune_replaces_a_broken_trace_once() -> None:
    text = "First 42 . " + " ".join(["then"] * 40) + " The answer is 42."
    engine = BreakingEngine(lambda r: text, breaks={2}, after=5, token_delay=0.0005)
    result = await Prune(n=3, interval=8, min_tokens=8).run(Q, SearchContext(engine=engine, max_tokens=200))
    kinds = {n.kind: n.status for n in result.trace.nodes}
    assert kinds["retry"] in ("finished", "pruned")
    assert [n.status for n in result.trace.nodes].count("error") == 1
    assert result.answer == "42" and sum(result.votes.values()) == 3.0  # the replacement's vote counts
    assert any(d["event"] == "engine_error" and d["action"] == "retry" for d in result.decisions)
    assert engine.active == 0


async def test_prune_fails_when_most_branches_break_twice() -> None:
    text = "First 42 . " + " ".join(["then"] * 40) + " The answer is 42."
    engine = BreakingEngine(lambda r: text, breaks=set(range(1, 10)), after=2)
    with pytest.raises(EngineStreamBroken):
        await Prune(n=3, interval=8, min_tokens=8).run(Q, SearchContext(engine=engine, max_tokens=200))
    assert engine.active == 0


async def test_deepconf_samples_a_broken_trace_again_in_its_streaming_phase() -> None:
    sure = ScriptedResponse(["Six sevens. The answer is 42."], logprobs=-0.02)
    engine = BreakingEngine(lambda r: sure, breaks={2}, after=2)  # call 1 is the warm-up, call 2 the first trace
    result = await DeepConf(n=4, warmup=2, consensus=None, window=4).run(Q, SearchContext(engine=engine))
    assert result.answer == "42"
    statuses = [(n.kind, n.status) for n in result.trace.nodes]
    assert ("sample", "error") in statuses and ("retry", "finished") in statuses
    assert len(result.candidates) == 4  # two warm-up traces, two streamed (one of them the retry)


def beam_steps(request: GenerationRequest) -> ScriptedResponse:
    """First steps of a beam search, then a final step that holds the answer."""
    if not request.continue_final_message:
        return ScriptedResponse([f"Step {i}: six sevens." for i in range(request.n)])
    return ScriptedResponse(["The answer is 42."] * request.n)


def beam() -> Beam:
    return Beam(ScriptedStepScorer({}, default=0.5), beam_width=2, expansions=2, max_depth=3)


async def test_beam_samples_broken_steps_again_and_the_search_goes_on() -> None:
    engine = BreakingEngine(beam_steps, breaks={1: 2})  # the first depth's stream breaks after two deltas
    result = await beam().run(Q, SearchContext(engine=engine))
    assert result.answer == "42"
    assert [c.n for c in engine.calls[:2]] == [4, 4]  # all four steps were unfinished: all sampled again
    (record,) = [d for d in result.decisions if d["event"] == "engine_error"]
    assert record["broken"] == [0, 1, 2, 3] and record["retries"] == [4, 5, 6, 7] and record["dropped"] == []
    errors = [n for n in result.trace.nodes if n.status == "error"]
    assert len(errors) == 4 and all("EngineStreamBroken" in (n.detail or "") for n in errors)
    assert engine.active == 0


async def test_beam_fails_only_when_most_steps_of_a_beam_are_lost() -> None:
    # The retry breaks after its first two steps finished: two of four dropped, the search goes on with two.
    def short_then_long(request: GenerationRequest) -> ScriptedResponse:
        return ScriptedResponse(["42", "42", "Step three goes on.", "Step four goes on."])

    half = BreakingEngine(short_then_long, breaks={1: 0, 2: 2})
    result = await Beam(ScriptedStepScorer({}, default=0.5), beam_width=2, expansions=2, max_depth=1).run(
        Q, SearchContext(engine=half)
    )
    (record,) = [d for d in result.decisions if d["event"] == "engine_error"]
    assert len(record["dropped"]) == 2 and result.answer == "42"
    lost = BreakingEngine(beam_steps, breaks={1: 0, 2: 0})
    with pytest.raises(EngineStreamBroken):
        await beam().run(Q, SearchContext(engine=lost))
    rejected = BreakingEngine(beam_steps, breaks={1: 1}, error=EngineRequestError("bad request", status_code=400))
    with pytest.raises(EngineRequestError):
        await beam().run(Q, SearchContext(engine=rejected))
    assert len(rejected.calls) == 1


async def test_beam_without_budget_to_retry_ends_marked_not_failed() -> None:
    engine = BreakingEngine(beam_steps, breaks={1: 1})
    result = await beam().run(Q, SearchContext(engine=engine, budget=Budget(max_calls=1)))
    assert result.budget_exhausted and len(engine.calls) == 1
    (record,) = [d for d in result.decisions if d["event"] == "engine_error"]
    assert record["dropped"] == record["broken"] and "retries" not in record
