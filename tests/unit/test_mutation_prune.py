"""Prune in detail (gaps found by mutation testing, `make mutation`): parameters, the checkpoint trigger, which
traces a checkpoint compares, how votes pass along chains of duplicates and replacements, broken streams, and the
recorded decisions. The run's parts are driven one at a time where whole runs would depend on timing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallMeter, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError, EngineStreamBroken
from branchwise.search import Prune, SearchContext
from branchwise.search.prune import _PruneRun
from branchwise.search.sampling import SampledTrace

pytestmark = pytest.mark.timeout(60)

Q = "What is 6 x 7?"


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


def _state(strategy: Prune | None = None, engine: object = None, **ctx: object) -> _PruneRun:
    context = SearchContext(engine=engine or ScriptedEngine(default="The answer is 42."), **ctx)  # type: ignore[arg-type]
    return _PruneRun(strategy or Prune(n=3, interval=8, min_tokens=8), context, context.request(Q, n=1))


# -- parameters -----------------------------------------------------------------------------------------------------

MESSAGE = "prune: need n >= 1, interval >= 1, min_tokens >= 0, keep_per_cluster >= 1"


def test_documented_defaults() -> None:
    s = Prune()
    assert (s.n, s.interval, s.min_tokens, s.keep_per_cluster, s.refill, s.max_traces) == (8, 64, 64, 1, False, 16)
    assert Prune(n=3).max_traces == 6 and Prune(n=3, max_traces=3).max_traces == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, MESSAGE),
        ({"interval": 0}, MESSAGE),
        ({"min_tokens": -1}, MESSAGE),
        ({"keep_per_cluster": 0}, MESSAGE),
        ({"n": 4, "max_traces": 3}, "prune: max_traces must be >= n=4, got 3"),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Prune(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_boundary_values_are_accepted() -> None:
    Prune(n=1, interval=1, min_tokens=0, keep_per_cluster=1, max_traces=1)


# -- the checkpoint trigger -----------------------------------------------------------------------------------------


def _delta(tokens: int) -> Delta:
    return Delta(index=0, text="x", token_ids=tuple(range(tokens)))


def test_a_checkpoint_is_due_exactly_when_a_trace_passes_a_multiple_of_the_interval() -> None:
    state = _state()
    trace = SampledTrace(state.tree.open("sample"))
    state.partial[trace.node.id] = []
    for tokens_after, step, due in [(5, 1, False), (7, 1, False), (8, 1, True), (9, 1, False), (17, 2, True)]:
        state.due.clear()
        trace.node.tokens = tokens_after  # stream_trace counts the delta before the check sees it
        assert state.check(trace, _delta(step)) is None
        assert state.due.is_set() is due, tokens_after


def test_a_doomed_trace_is_pruned_at_its_next_delta_naming_its_representative() -> None:
    state = _state()
    trace = SampledTrace(state.tree.open("sample"))
    state.partial[trace.node.id] = []
    state.doomed[trace.node.id] = 7
    assert state.check(trace, _delta(1)) == "redundant_with_trace"
    assert trace.node.detail == "duplicates trace 7"


# -- checkpoints ----------------------------------------------------------------------------------------------------


async def _checkpoint(state: _PruneRun, texts: dict[int, list[str]], tokens: dict[int, int]) -> None:
    """One due checkpoint over live traces with these pieces and token counts."""
    while len(state.tree) < max(texts) + 1:
        state.tree.open("sample")
    nodes = state.tree.nodes
    state.partial = dict(texts)
    for i, count in tokens.items():
        nodes[i].tokens = count
    watcher = asyncio.create_task(state.checkpoints())
    state.due.set()
    for _ in range(20):
        await asyncio.sleep(0)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher


async def test_a_checkpoint_dooms_the_later_duplicates_and_records_it() -> None:
    state = _state()
    texts = {0: ["First 42 ."], 1: ["First 4", "2 ."], 2: ["First 41 ."]}  # 1 is 0 again, split differently
    await _checkpoint(state, texts, {0: 8, 1: 8, 2: 8})  # exactly min_tokens: they take part
    assert state.doomed == {1: 0}
    assert state.decisions == [{"event": "prune", "traces": [1], "live": 3}]


async def test_a_checkpoint_compares_two_live_traces() -> None:
    state = _state()
    await _checkpoint(state, {0: ["so 42"], 1: ["so 42"]}, {0: 9, 1: 9})
    assert state.doomed == {1: 0}


async def test_a_checkpoint_leaves_out_doomed_and_short_traces() -> None:
    state = _state()
    state.doomed = {1: 0}
    await _checkpoint(state, {0: ["so 42"], 1: ["so 42"], 2: ["so 42"], 3: ["so 42"]}, {0: 9, 1: 9, 2: 9, 3: 7})
    assert state.doomed == {1: 0, 2: 0}
    assert state.decisions == [{"event": "prune", "traces": [2], "live": 2}]


async def test_keep_per_cluster_keeps_the_earliest_traces_of_each_cluster() -> None:
    state = _state(Prune(n=4, interval=8, min_tokens=8, keep_per_cluster=2))
    await _checkpoint(state, {i: ["so 42"] for i in range(4)}, dict.fromkeys(range(4), 9))
    assert state.doomed == {2: 0, 3: 0}


async def test_the_watcher_keeps_watching_after_a_checkpoint_with_too_few_traces() -> None:
    state = _state()
    state.tree.open("sample"), state.tree.open("sample")
    state.partial = {0: ["so 42"], 1: ["so 42"]}
    nodes = state.tree.nodes
    nodes[0].tokens, nodes[1].tokens = 9, 3  # one live trace: nothing to compare yet
    watcher = asyncio.create_task(state.checkpoints())
    state.due.set()
    for _ in range(10):
        await asyncio.sleep(0)
    assert state.doomed == {} and not watcher.done()
    nodes[1].tokens = 9
    state.due.set()
    for _ in range(10):
        await asyncio.sleep(0)
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert state.doomed == {1: 0}


# -- one trace ------------------------------------------------------------------------------------------------------


async def test_a_pruned_trace_passes_its_own_and_inherited_votes_to_its_representative() -> None:
    state = _state()
    await state.one("sample")  # trace 0 finishes
    state.doomed[1] = 0
    state.inherited[1] = 2  # trace 1 already stood for two pruned duplicates
    await state.one("sample")
    assert state.tree.nodes[1].status == "pruned"
    assert state.inherited == {0: 3}


async def test_a_replacement_is_recorded_as_the_successor() -> None:
    state = _state()
    await state.one("sample")
    assert state.successor == {}
    await state.one("retry", replaces=0)
    assert state.successor == {0: 1}


async def test_a_trace_cut_by_the_budget_marks_the_run() -> None:
    engine = FunctionEngine(lambda r: ScriptedResponse(["hmm " * 50 + "The answer is 42."], token_delay=0.02))
    state = _state(engine=engine, budget=Budget(wall_clock_s=0.2))
    await state.one("sample")
    assert state.tree.nodes[0].status == "budget" and state.budget_cut is True


async def test_a_finished_trace_clipped_by_the_budget_marks_the_run() -> None:
    engine = FunctionEngine(lambda r: "hmm " * 30 + "The answer is 42.")
    state = _state(engine=engine, budget=Budget(max_completion_tokens=10))
    await state.one("sample")
    node = state.tree.nodes[0]
    assert node.status == "finished" and "clipped by the budget" in (node.detail or "")
    assert state.budget_cut is True


# -- the result -----------------------------------------------------------------------------------------------------


def _finished(state: _PruneRun, node_id: int, answer: str) -> None:
    while len(state.tree) <= node_id:
        state.tree.open("sample")
    trace = SampledTrace(state.tree.nodes[node_id], text=f"The answer is {answer}.")
    trace.node.answer = answer
    state.tree.close(trace.node, "finished")
    state.finished.append(trace)


async def test_votes_follow_replacements_and_add_up() -> None:
    state = _state()
    _finished(state, 7, "42")
    _finished(state, 8, "41")
    state.inherited = {5: 1, 7: 2}  # 5 broke and was replaced by 7; both represented duplicates
    state.successor = {5: 7}
    result = await state.result()
    assert result.votes == {"42": 4.0, "41": 1.0}
    assert result.strategy == "prune" and result.budget_exhausted is False


async def test_a_run_with_nothing_pruned_votes_one_each_and_records_a_summary() -> None:
    texts = ["The answer is 42.", "The answer is 41.", "The answer is 42."]
    engine = FunctionEngine(lambda r: texts[len(engine.calls) - 1])
    result = await Prune(n=3, interval=64, min_tokens=64).run(Q, SearchContext(engine=engine))
    assert result.votes == {"42": 2.0, "41": 1.0}
    assert result.decisions == [{"event": "summary", "pruned": 0, "pruned_tokens": 0}]
    assert [n.kind for n in result.trace.nodes] == ["sample"] * 3
    assert result.strategy == "prune" and result.budget_exhausted is False


async def test_the_summary_counts_pruned_traces_and_their_tokens() -> None:
    state = _state()
    for _ in range(3):
        state.tree.open("sample")
    nodes = state.tree.nodes
    nodes[1].tokens, nodes[2].tokens = 9, 12
    state.tree.close(nodes[1], "pruned", rule="redundant_with_trace")
    state.tree.close(nodes[2], "pruned", rule="redundant_with_trace")
    result = await state.result()
    assert result.decisions[-1] == {"event": "summary", "pruned": 2, "pruned_tokens": 21}


# -- broken streams -------------------------------------------------------------------------------------------------


async def test_without_budget_to_retry_a_broken_trace_is_left_and_the_run_marked() -> None:
    engine = Breaking(lambda r: "The answer is 42.", breaks={2})
    result = await Prune(n=2, interval=64, min_tokens=64).run(
        Q, SearchContext(engine=engine, budget=Budget(max_calls=2))
    )
    assert result.budget_exhausted is True and len(engine.calls) == 2
    assert result.decisions[0] == {
        "event": "engine_error",
        "error": "EngineStreamBroken: reset on call 2",
        "broken": [1],
        "action": "drop",
    }


async def test_a_broken_trace_is_replaced_once_and_the_retry_recorded() -> None:
    engine = Breaking(lambda r: "The answer is 42.", breaks={1})
    result = await Prune(n=2, interval=64, min_tokens=64).run(Q, SearchContext(engine=engine))
    assert result.decisions[0] == {
        "event": "engine_error",
        "error": "EngineStreamBroken: reset on call 1",
        "broken": [0],
        "action": "retry",
    }
    assert result.votes == {"42": 2.0}


async def test_the_run_fails_with_the_last_error_when_most_branches_are_lost() -> None:
    engine = Breaking(lambda r: "hmm hmm hmm. The answer is 42.", breaks=set(range(1, 20)))
    with pytest.raises(EngineStreamBroken) as caught:
        await Prune(n=3, interval=64, min_tokens=64).run(Q, SearchContext(engine=engine))
    assert len(engine.calls) == 6
    assert str(caught.value) == "reset on call 6"
