"""Budget in detail (gaps found by mutation testing, `make mutation`): what an exhausted budget says, child caps,
the clock's start and stop, engine errors passing through a budgeted engine, and what is charged when."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from branchwise.budget import Budget, BudgetedEngine, CostModel
from branchwise.engine import CallMeter, CallUsage, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedEngine
from branchwise.errors import BudgetExhausted, EngineStreamBroken
from branchwise.events import use_sink

pytestmark = pytest.mark.timeout(60)

WORDS = " ".join(f"w{i}" for i in range(40))


def req(prompt: str = "two tokens", **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **kw)


async def drain(engine: BudgetedEngine, request: GenerationRequest) -> list[Delta]:
    got: list[Delta] = []
    async with contextlib.aclosing(engine.stream(request)) as deltas:
        async for d in deltas:
            got.append(d)
    return got


# -- what an exhausted budget says ----------------------------------------------------------------------------------


async def test_a_refused_call_says_which_cap_and_the_figures() -> None:
    budget = Budget(max_calls=1, name="run")
    engine = budget.bind(ScriptedEngine(default="a b c"))
    await drain(engine, req())
    with pytest.raises(BudgetExhausted) as caught:
        await drain(engine, req())
    assert caught.value.cap == "max_calls"
    assert str(caught.value) == "budget 'run' exhausted: max_calls (1 of 1 calls)"


async def test_an_aborted_call_says_which_cap_and_the_figures() -> None:
    budget = Budget(wall_clock_s=0.1)
    engine = budget.bind(ScriptedEngine(default=WORDS, token_delay=0.02))
    with pytest.raises(BudgetExhausted) as caught:
        await drain(engine, req(max_tokens=100))
    assert caught.value.cap == "wall_clock_s"
    assert str(caught.value).startswith("budget 'run' exhausted: wall_clock_s (0.1")
    assert str(caught.value).endswith(" of 0.1 s)")


def test_every_cap_is_described_with_its_figures() -> None:
    parent = Budget(name="eval")
    b = parent.child("p1", max_tokens=10, max_completion_tokens=8, max_calls=3, wall_clock_s=2.5, max_cost=1e9)
    u = b._usage
    u.prompt_tokens, u.completion_tokens, u.calls, u.estimated_cost = 4, 6, 2, 123456.0
    assert b._describe("max_tokens") == "budget 'eval/p1' exhausted: max_tokens (10 of 10 tokens)"
    b._reserved = 3
    assert b._describe("max_tokens") == (
        "budget 'eval/p1' exhausted: max_tokens (10 + 3 reserved for prompts in flight of 10 tokens)"
    )
    assert b._describe("max_completion_tokens") == (
        "budget 'eval/p1' exhausted: max_completion_tokens (6 of 8 completion tokens)"
    )
    assert b._describe("max_calls") == "budget 'eval/p1' exhausted: max_calls (2 of 3 calls)"
    assert b._describe("wall_clock_s") == "budget 'eval/p1' exhausted: wall_clock_s (0.000 of 2.5 s)"
    assert b._describe("max_cost") == "budget 'eval/p1' exhausted: max_cost (1.235e+05 of 1000000000.0 estimated cost)"
    error = b._error("max_calls")
    assert (error.cap, str(error)) == ("max_calls", b._describe("max_calls"))


async def test_exhaustion_is_logged_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    budget = Budget(max_calls=1)
    engine = budget.bind(ScriptedEngine(default="a b c"))
    with caplog.at_level(logging.INFO, logger="branchwise.budget.budget"), use_sink(lambda k, d: events.append((k, d))):
        await drain(engine, req())
        for _ in range(2):
            with pytest.raises(BudgetExhausted):
                await drain(engine, req())
    exhausted = [d for k, d in events if k == "budget_exhausted"]
    message = "budget 'run' exhausted: max_calls (1 of 1 calls)"
    assert exhausted == [{"budget": "run", "cap": "max_calls", "detail": message}]
    assert [r.getMessage() for r in caplog.records if r.name == "branchwise.budget.budget"] == [message]


def test_repr_lists_the_caps_that_are_set() -> None:
    assert repr(Budget()) == "Budget('run')"
    full = Budget(max_tokens=10, max_completion_tokens=8, max_calls=3, wall_clock_s=2.5, max_cost=7.0, name="x")
    assert repr(full) == (
        "Budget('x', max_tokens=10, max_completion_tokens=8, max_calls=3, wall_clock_s=2.5, max_cost=7.0)"
    )
    assert repr(Budget(max_calls=2).child("c")) == "Budget('run/c')"


# -- children, clock ------------------------------------------------------------------------------------------------


def test_a_child_gets_every_cap_it_is_given() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    kid = Budget().child(
        "k", max_tokens=10, max_completion_tokens=8, max_calls=3, wall_clock_s=2.5, max_cost=7.0, cost_model=model
    )
    assert (kid.max_tokens, kid.max_completion_tokens, kid.max_calls, kid.wall_clock_s, kid.max_cost) == (
        10,
        8,
        3,
        2.5,
        7.0,
    )
    assert kid.cost_model is model and kid.name == "k" and kid.path == "run/k"


def test_start_starts_the_clock_of_the_budget_and_its_ancestors_once() -> None:
    root = Budget()
    kid = root.child("k")
    assert root.elapsed == 0.0 and kid.elapsed == 0.0
    kid.start()
    assert root._started_at is not None and root._started_at == kid._started_at
    first = root._started_at
    root.start()
    assert root._started_at == first  # idempotent: the clock is not restarted
    assert root.elapsed >= 0.0 and kid.elapsed >= 0.0


async def test_a_budget_stopped_before_it_started_keeps_a_zero_clock_through_later_calls() -> None:
    budget = Budget()
    budget.stop()
    assert budget._started_at is not None
    await drain(budget.bind(ScriptedEngine(default="a b")), req())
    assert budget.elapsed == budget.usage.wall_time_s
    assert 0.0 <= budget.elapsed < 0.5


# -- engine errors and what is charged when -------------------------------------------------------------------------


class BreaksAfter(FunctionEngine):
    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        count = 0
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                if count == 2:
                    raise EngineStreamBroken("reset")
                count += 1
                yield delta


async def test_an_engine_error_reaches_the_caller_and_the_engines_hooks() -> None:
    inner = BreaksAfter(lambda r: WORDS)
    reports: list[tuple[GenerationRequest, CallUsage]] = []
    inner.add_usage_hook(lambda r, u: reports.append((r, u)))
    budget = Budget(max_completion_tokens=30)
    engine = budget.bind(inner)
    with pytest.raises(EngineStreamBroken):
        await drain(engine, req(max_tokens=100))
    ((request, usage),) = reports
    assert request.max_tokens == 30  # the request as clipped and sent
    assert usage.error == "EngineStreamBroken" and usage.completion_tokens == 2 and usage.prompt_tokens == 2
    assert budget.usage.completion_tokens == 2 and budget.in_flight == 0


async def test_the_prompt_is_charged_as_soon_as_the_engine_reports_it() -> None:
    budget = Budget()
    engine = budget.bind(ScriptedEngine(default=WORDS, token_delay=0.001))
    seen = []
    async with contextlib.aclosing(engine.stream(req("one two three", max_tokens=10))) as deltas:
        async for _ in deltas:
            seen.append(budget.usage.prompt_tokens)
    assert seen[0] == 3 and set(seen) == {3}


async def test_without_a_cost_model_nothing_is_estimated() -> None:
    budget = Budget()
    engine = budget.bind(ScriptedEngine(default=WORDS))
    assert engine.cost_model is None
    await drain(engine, req(max_tokens=5))
    u = budget.usage
    assert (u.estimated_flops, u.estimated_kv_bytes, u.estimated_cost) == (0.0, 0.0, 0.0)


async def test_estimates_add_up_over_calls() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    one = Budget(cost_model=model)
    await drain(one.bind(ScriptedEngine(default=WORDS)), req(max_tokens=5))
    two = Budget(cost_model=model)
    engine = two.bind(ScriptedEngine(default=WORDS))
    await drain(engine, req(max_tokens=5))
    await drain(engine, req(max_tokens=5))
    assert one.usage.estimated_flops > 0
    assert two.usage.estimated_flops == pytest.approx(2 * one.usage.estimated_flops)
    assert two.usage.estimated_kv_bytes == pytest.approx(2 * one.usage.estimated_kv_bytes)
    assert two.usage.estimated_cost == pytest.approx(2 * one.usage.estimated_cost)


class StrayIndex(FunctionEngine):
    """Also sends a delta for a sample the request did not ask for (index n), as a buggy backend might."""

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                yield delta
        yield Delta(index=request.n, text=" x", token_ids=(7,), finish_reason="stop")


async def test_a_delta_for_an_unknown_sample_is_charged_without_breaking_the_call() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    budget = Budget(cost_model=model)
    got = await drain(budget.bind(StrayIndex(lambda r: "a b")), req(max_tokens=5))
    assert len(got) == 3 and budget.usage.completion_tokens == 3
    # the stray token is costed as the first token of its sample: the same as one decoded after the prompt alone
    reference = Budget(cost_model=model)
    await drain(reference.bind(ScriptedEngine(default="a b x")), req(max_tokens=5))
    assert budget.usage.estimated_flops == pytest.approx(reference.usage.estimated_flops)
    assert budget.usage.estimated_kv_bytes < reference.usage.estimated_kv_bytes


def test_remaining_is_the_tightest_cap_along_the_chain() -> None:
    root = Budget(max_tokens=100, max_completion_tokens=50, max_calls=9, max_cost=1e12)
    kid = root.child("k", max_tokens=10, max_completion_tokens=80, max_calls=3)
    left = kid.remaining()
    assert (left.tokens, left.completion_tokens, left.calls, left.cost) == (10, 50, 3, 1e12)


async def test_after_the_deadline_fires_the_timer_is_gone_and_nothing_is_left_running() -> None:
    budget = Budget(wall_clock_s=0.05)
    engine = budget.bind(ScriptedEngine(default=WORDS, token_delay=0.01))
    with pytest.raises(BudgetExhausted, match="wall_clock_s"):
        await drain(engine, req(max_tokens=100))
    assert budget._timer is None and budget.in_flight == 0
    budget.stop()  # disarming again is harmless
    assert budget._timer is None
