"""search.sampling, piece by piece (gaps found by mutation testing, `make mutation`): what a trace records when its
stream is pruned, cut by the budget or broken (status, rule, detail, kind, error), which samples a retry covers, and
the candidates and clipping rules."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallMeter, Delta, GenerationRequest, TokenLogprob
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.errors import BudgetExhausted, ConfigError, EngineError, EngineStreamBroken, EngineUnavailable
from branchwise.search import SearchContext, SelfConsistency, TraceTree
from branchwise.search.sampling import (
    SampledTrace,
    candidates_of,
    clipped_by_budget,
    sample,
    stream_trace,
)

pytestmark = pytest.mark.timeout(60)

Q = "What is 6 x 7?"
LONG = "Six sevens are forty-two, so the answer is clear. The answer is 42."


class Breaking(FunctionEngine):
    """Replies with ``fn``; call number k (1-based) raises ``errors[k]`` after ``after[k]`` deltas."""

    def __init__(
        self,
        fn: Callable[[GenerationRequest], ScriptedResponse | str],
        *,
        after: dict[int, int],
        errors: dict[int, EngineError] | None = None,
        token_delay: float = 0.0,
    ) -> None:
        super().__init__(fn, token_delay=token_delay)
        self.after = after
        self.errors = errors or {}

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        number = len(self.calls) + 1
        delivered = 0
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                if self.after.get(number) == delivered:
                    raise self.errors.get(number, EngineStreamBroken(f"reset on call {number}"))
                delivered += 1
                yield delta


def _ctx(engine: Any, **kw: Any) -> SearchContext:
    return SearchContext(engine=engine, **kw)


# -- stream_trace ---------------------------------------------------------------------------------------------------


async def test_stream_trace_prunes_with_the_rule_the_check_names() -> None:
    engine = ScriptedEngine([LONG])
    ctx, tree = _ctx(engine), TraceTree()
    trace = SampledTrace(tree.open("sample"))

    def check(t: SampledTrace, delta: Delta) -> str | None:
        return "too_long" if t.node.tokens >= 3 else None

    await stream_trace(ctx, ctx.request(Q, n=1), trace, tree, check)
    node = trace.node
    assert (node.status, node.pruned_by, node.detail) == ("pruned", "too_long", "aborted after 3 tokens")
    assert trace.text == node.text == "Six sevens are" and node.answer is None


async def test_stream_trace_puts_the_checks_note_before_the_abort() -> None:
    engine = ScriptedEngine([LONG])
    ctx, tree = _ctx(engine), TraceTree()
    trace = SampledTrace(tree.open("sample"))

    def check(t: SampledTrace, delta: Delta) -> str | None:
        t.node.detail = "duplicates trace 7"
        return "redundant"

    await stream_trace(ctx, ctx.request(Q, n=1), trace, tree, check)
    assert trace.node.detail == "duplicates trace 7; aborted after 1 tokens"
    assert trace.node.pruned_by == "redundant"


async def test_stream_trace_keeps_the_whole_text_of_a_finished_trace() -> None:
    engine = ScriptedEngine([LONG])
    ctx, tree = _ctx(engine), TraceTree()
    trace = await stream_trace(ctx, ctx.request(Q, n=1), SampledTrace(tree.open("s")), tree, lambda t, d: None)
    assert trace.text == trace.node.text == LONG
    assert (trace.node.status, trace.node.answer, trace.node.pruned_by, trace.node.detail) == (
        "finished",
        "42",
        None,
        None,
    )


async def test_stream_trace_cut_by_the_budget_is_marked_budget() -> None:
    engine = ScriptedEngine([LONG])
    ctx, tree = _ctx(engine, budget=Budget(max_tokens=5)), TraceTree()
    trace = await stream_trace(ctx, ctx.request(Q, n=1), SampledTrace(tree.open("s")), tree, lambda t, d: None)
    assert trace.node.status == "budget" and trace.node.pruned_by is None
    assert trace.node.detail == "cut by the budget before it finished"


async def test_stream_trace_stopped_before_any_token_is_a_budget_cut_not_a_prune() -> None:
    engine = ScriptedEngine([ScriptedResponse([LONG], error=BudgetExhausted("max_calls reached"))])
    ctx, tree = _ctx(engine), TraceTree()
    trace = await stream_trace(ctx, ctx.request(Q, n=1), SampledTrace(tree.open("s")), tree, lambda t, d: "never")
    assert trace.node.status == "budget" and trace.node.pruned_by is None and trace.node.tokens == 0


async def test_stream_trace_broken_stream_is_left_to_the_strategy() -> None:
    engine = Breaking(lambda r: LONG, after={1: 2})
    ctx, tree = _ctx(engine), TraceTree()
    trace = await stream_trace(ctx, ctx.request(Q, n=1), SampledTrace(tree.open("s")), tree, lambda t, d: None)
    assert trace.node.status == "error" and isinstance(trace.error, EngineStreamBroken)
    assert trace.node.detail == "stream broke (EngineStreamBroken: reset on call 1); left to the strategy"


async def test_stream_trace_refuses_several_samples() -> None:
    ctx, tree = _ctx(ScriptedEngine([LONG])), TraceTree()
    with pytest.raises(ConfigError, match=r"^stream_trace streams one sample; use sample\(\) for n > 1$"):
        await stream_trace(ctx, ctx.request(Q, n=2), SampledTrace(tree.open("s")), tree, lambda t, d: None)


# -- sample and its recovery ----------------------------------------------------------------------------------------


async def test_sample_names_its_traces_and_their_retries_by_kind() -> None:
    engine = Breaking(lambda r: LONG, after={1: 2})
    ctx, tree = _ctx(engine), TraceTree()
    await sample(ctx, Q, tree, n=2, kind="warmup")
    assert [n.kind for n in tree.nodes] == ["warmup"] * 4
    tree2 = TraceTree()
    await sample(_ctx(ScriptedEngine([LONG])), Q, tree2, n=2)
    assert [n.kind for n in tree2.nodes] == ["sample", "sample"]


async def test_a_retried_branch_records_the_error_and_says_it_was_sampled_again() -> None:
    engine = Breaking(lambda r: LONG, after={1: 3})
    ctx, tree, decisions = _ctx(engine), TraceTree(), []
    traces, exhausted = await sample(ctx, Q, tree, n=2, decisions=decisions)
    assert not exhausted and [t.node.answer for t in traces] == ["42", "42"]
    broken = tree.nodes[:2]
    assert [n.detail for n in broken] == ["stream broke (EngineStreamBroken: reset on call 1); sampled again"] * 2
    assert decisions == [
        {
            "event": "engine_error",
            "error": "EngineStreamBroken: reset on call 1",
            "broken": [0, 1],
            "retries": [2, 3],
            "dropped": [],
        }
    ]


async def test_without_budget_to_retry_the_broken_branches_are_dropped_and_say_so() -> None:
    engine = Breaking(lambda r: LONG, after={1: 3})
    ctx, tree = _ctx(engine, budget=Budget(max_calls=1)), TraceTree()
    _, exhausted = await sample(ctx, Q, tree, n=2)
    assert exhausted and len(engine.calls) == 1
    assert [n.detail for n in tree.nodes] == [
        "stream broke (EngineStreamBroken: reset on call 1); dropped (no budget to retry)"
    ] * 2


async def test_a_sample_finished_for_length_before_the_break_is_not_sampled_again() -> None:
    reply = ScriptedResponse(["42", LONG], finish_reason="length")  # both end naturally with "length"
    engine = Breaking(lambda r: reply, after={1: 3})
    ctx, tree = _ctx(engine), TraceTree()
    traces, _ = await sample(ctx, Q, tree, n=2)
    assert [c.n for c in engine.calls] == [2, 1]  # only the unfinished sample was asked again
    assert [t.node.status for t in traces] == ["finished", "finished"]


@pytest.mark.parametrize("finish", ["stop", "length"])
async def test_a_retry_that_breaks_drops_only_its_unfinished_samples(finish: str) -> None:
    second = EngineUnavailable("engine restarted")

    def reply(request: GenerationRequest) -> ScriptedResponse:
        return ScriptedResponse([LONG, "42", LONG, "42"], finish_reason=finish)  # type: ignore[arg-type]

    # Call 1 breaks at once (all four retried); the retry breaks after its short samples (1 and 3) finished.
    engine = Breaking(reply, after={1: 0, 2: 4}, errors={2: second})
    ctx, tree, decisions = _ctx(engine), TraceTree(), []
    traces, _ = await sample(ctx, Q, tree, n=4, decisions=decisions)
    assert [c.n for c in engine.calls] == [4, 4]
    statuses = [t.node.status for t in traces]
    assert statuses == ["error", "finished", "error", "finished"]
    assert [t.error for t in traces if t.node.status == "error"] == [second] * 2
    assert all(t.node.detail == "stream broke (EngineUnavailable: engine restarted); dropped" for t in traces[::2])
    assert decisions[0]["dropped"] == [traces[0].node.id, traces[2].node.id]


async def test_the_budget_stopping_the_retry_marks_the_run() -> None:
    # The first call breaks after 0.2 s; its retry (1.3 s of tokens) meets the deadline: stopped, not clipped.
    engine = Breaking(lambda r: LONG, after={1: 2}, token_delay=0.1)
    ctx, tree = _ctx(engine, budget=Budget(wall_clock_s=1.0)), TraceTree()
    traces, exhausted = await sample(ctx, Q, tree, n=1)
    assert exhausted is True and len(engine.calls) == 2 and not traces[0].clipped
    assert traces[0].node.status == "budget"
    assert traces[0].node.detail == "cut by the budget before it finished"


async def test_dropped_branches_first_do_not_hide_the_finished_ones_after_them() -> None:
    reply = ScriptedResponse([LONG, LONG, "42", "42"])
    engine = Breaking(lambda r: reply, after={1: 5, 2: 0})  # samples 0 and 1 break twice
    result = await SelfConsistency(n=4).run(Q, _ctx(engine))
    assert [n.status for n in result.trace.nodes[:4]] == ["error", "error", "finished", "finished"]
    assert result.answer == "42" and len(result.candidates) == 2


# -- candidates and clipping ----------------------------------------------------------------------------------------


def _trace(tree: TraceTree, status: str, logprobs: list[float], *, answer: str | None = "42") -> SampledTrace:
    trace = SampledTrace(tree.open("s"), text=f"text {len(tree)}")
    trace.logprobs = [TokenLogprob(1, "x", lp, (("x", lp), ("y", -5.0))) for lp in logprobs]
    trace.node.tokens, trace.node.answer = len(logprobs), answer
    tree.close(trace.node, status)  # type: ignore[arg-type]
    return trace


def test_candidates_skip_unfinished_traces_wherever_they_are() -> None:
    tree = TraceTree()
    traces = [_trace(tree, "budget", [-0.1]), _trace(tree, "finished", [-0.1]), _trace(tree, "pruned", [-0.1])]
    (only,) = candidates_of(traces)
    assert (only.answer, only.text, only.trace_id, only.tokens, only.confidence) == ("42", "text 2", 1, 1, None)


def test_candidates_use_the_window_they_are_given() -> None:
    tree = TraceTree()
    logprobs = [-3.0] + [-0.01] * 7
    (small,) = candidates_of([_trace(tree, "finished", logprobs)], confidence="lowest_group", window=2)
    (whole,) = candidates_of([_trace(tree, "finished", logprobs)], confidence="lowest_group", window=8)
    assert small.confidence is not None and whole.confidence is not None
    assert small.confidence < whole.confidence
    assert tree.nodes[0].scores == {"confidence_lowest_group": small.confidence}


def test_candidates_default_window_is_2048_tokens() -> None:
    tree = TraceTree()
    logprobs = [-3.0] + [-0.01] * 2048  # 2049 tokens: two windows of 2048, the first holds the unsure token
    (default,) = candidates_of([_trace(tree, "finished", logprobs)], confidence="lowest_group")
    (explicit,) = candidates_of([_trace(tree, "finished", logprobs)], confidence="lowest_group", window=2048)
    (wider,) = candidates_of([_trace(tree, "finished", logprobs)], confidence="lowest_group", window=2049)
    assert default.confidence == explicit.confidence != wider.confidence


def test_clipped_by_budget_needs_a_clipped_call_and_a_short_length_stop() -> None:
    request = GenerationRequest(prompt="q", max_tokens=10)
    clipped, unclipped = (
        SimpleNamespace(budget=SimpleNamespace(clipped_calls=1)),
        SimpleNamespace(budget=SimpleNamespace(clipped_calls=0)),
    )
    assert clipped_by_budget(clipped, request, "length", 9)  # type: ignore[arg-type]
    assert not clipped_by_budget(clipped, request, "length", 10)  # type: ignore[arg-type]  # it got all it asked
    assert not clipped_by_budget(clipped, request, "stop", 9)  # type: ignore[arg-type]
    assert not clipped_by_budget(unclipped, request, "length", 9)  # type: ignore[arg-type]
    assert not clipped_by_budget(SimpleNamespace(budget=None), request, "length", 9)  # type: ignore[arg-type]
