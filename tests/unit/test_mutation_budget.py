"""Budget in detail (gaps found by mutation testing, `make mutation`): what an exhausted budget says, child caps,
the clock's start and stop, engine errors passing through a budgeted engine, and what is charged when."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from branchwise.budget import Budget, BudgetedEngine, CostModel
from branchwise.engine import CallMeter, CallUsage, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedEngine
from branchwise.errors import BudgetExhausted, ConfigError, EngineStreamBroken
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


async def test_a_stray_token_is_costed_exactly_as_the_first_token_of_a_sample() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    with_stray = Budget(cost_model=model)
    await drain(with_stray.bind(StrayIndex(lambda r: "a b")), req(max_tokens=5))
    without = Budget(cost_model=model)
    await drain(without.bind(FunctionEngine(lambda r: "a b")), req(max_tokens=5))
    prompt = without.usage.prompt_tokens
    extra_kv = with_stray.usage.estimated_kv_bytes - without.usage.estimated_kv_bytes
    assert extra_kv == model.decode_kv_bytes(prompt, 0, 1)


class FinishesTwice(FunctionEngine):
    """Reports sample 0's end twice (a repeated final delta), as a buggy backend might, while sample 1 runs on."""

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                yield delta
                if delta.index == 0 and delta.finish_reason is not None:
                    yield Delta(index=0, text="", finish_reason=delta.finish_reason)


async def test_a_sample_reported_finished_twice_does_not_stop_the_budget_aborting_the_others() -> None:
    budget = Budget(wall_clock_s=0.1)
    engine = budget.bind(FinishesTwice(lambda r: ["a", WORDS], token_delay=0.02))
    with pytest.raises(BudgetExhausted, match="wall_clock_s"):
        await drain(engine, req(n=2, max_tokens=100))
    assert budget.in_flight == 0
    assert budget.usage.completion_tokens < 41  # sample 1 was cut short


def test_the_wall_clock_cap_applies_only_between_start_and_stop() -> None:
    unstarted = Budget(wall_clock_s=1.0)
    assert not unstarted.exhausted and unstarted.exhausted_cap is None
    stopped = Budget(wall_clock_s=0.01)
    stopped.start()
    stopped.stop()
    time.sleep(0.03)
    assert not stopped.exhausted and stopped.exhausted_cap is None


async def _hold_a_call(budget: Budget, prompt: str) -> tuple[asyncio.Task[list[Delta]], asyncio.Event]:
    """Start a call whose engine has not reported its prompt yet (it waits for the returned event)."""
    gate = asyncio.Event()

    async def slow(request: GenerationRequest) -> str:
        await gate.wait()
        return WORDS

    held = asyncio.create_task(drain(budget.bind(FunctionEngine(slow)), req(prompt, max_tokens=100)))
    await asyncio.sleep(0)  # admitted in its first step
    assert budget.in_flight == 1
    return held, gate


async def test_prompt_tokens_reserved_by_a_call_in_flight_count_towards_the_token_cap() -> None:
    budget = Budget(max_tokens=30)
    held, gate = await _hold_a_call(budget, " ".join(["p"] * 10))  # reserves its 10 prompt tokens
    assert budget.remaining().tokens == 20
    got = await drain(budget.bind(FunctionEngine(lambda r: WORDS)), req("two tokens", max_tokens=100))
    assert len(got) == 18  # clipped to what is left: 30 - 10 reserved - 2 of its own prompt
    assert budget.usage.total_tokens == 20
    assert budget.exhausted_cap == "max_tokens"  # 20 spent + 10 reserved: the held call is aborted
    gate.set()
    with pytest.raises(BudgetExhausted, match="max_tokens"):
        await held


async def test_prompt_cost_reserved_by_a_call_in_flight_counts_towards_the_cost_cap() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    reserved = model.cost(model.prompt_flops(10), 0.0)
    prompt = model.cost(model.prompt_flops(2), 0.0)
    token = model.cost(model.decode_flops(1), model.decode_kv_bytes(2, 0, 1))
    budget = Budget(max_cost=reserved + prompt + token / 2, cost_model=model)
    held, gate = await _hold_a_call(budget, " ".join(["p"] * 10))
    assert budget.remaining().cost == budget.max_cost - reserved  # exactly what its prompt will be charged
    got = await drain(budget.bind(FunctionEngine(lambda r: WORDS)), req("two tokens", max_tokens=100))
    assert len(got) == 1  # no room for a whole token: the one every admitted call may generate
    assert budget.usage.estimated_cost == pytest.approx(prompt + token)
    assert budget.exhausted_cap == "max_cost"  # only with the held call's reserved prompt cost counted
    gate.set()
    with pytest.raises(BudgetExhausted, match="max_cost"):
        await held


async def test_a_call_after_an_idle_deadline_is_refused_and_the_exhaustion_reported_once() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    budget = Budget(wall_clock_s=0.01)
    budget.start()
    await asyncio.sleep(0.03)  # no call in flight: no timer to fire
    engine = budget.bind(ScriptedEngine(default="a b"))
    with use_sink(lambda k, d: events.append((k, d))):
        for _ in range(2):
            with pytest.raises(BudgetExhausted) as caught:
                await drain(engine, req())
            assert caught.value.cap == "wall_clock_s"
    assert [d["cap"] for k, d in events if k == "budget_exhausted"] == ["wall_clock_s"]
    assert budget.usage.calls == 0


async def test_the_deadline_timer_is_armed_only_while_calls_are_in_flight() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    budget = Budget(wall_clock_s=0.2)
    engine = budget.bind(ScriptedEngine(default="a b c", token_delay=0.001))
    with use_sink(lambda k, d: events.append((k, d))):
        await asyncio.gather(drain(engine, req()), drain(engine, req()))  # two calls in flight at once
        assert budget.in_flight == 0 and budget.usage.calls == 2
        await asyncio.sleep(0.3)  # the deadline passes with nothing in flight: no timer fires
    assert [k for k, _ in events if k == "budget_exhausted"] == []
    assert budget.exhausted_cap == "wall_clock_s"  # but no call is admitted after it


async def test_a_prompt_that_fits_only_without_the_reservations_in_flight_is_refused() -> None:
    budget = Budget(max_tokens=20)
    held, gate = await _hold_a_call(budget, " ".join(["p"] * 10))
    inner = ScriptedEngine(default="a b")
    with pytest.raises(BudgetExhausted) as caught:  # 10 reserved + 10 of its own: no room for one token
        await drain(budget.bind(inner), req(" ".join(["q"] * 10)))
    assert caught.value.cap == "max_tokens" and inner.calls == []
    assert str(caught.value) == (
        "budget 'run' exhausted: max_tokens (0 + 10 reserved for prompts in flight of 20 tokens): a call was "
        "refused, its prompt needs 10 tokens"
    )
    gate.set()
    got = await held  # the call in flight runs on, in what is left
    assert len(got) == 10 and budget.usage.total_tokens == 20


async def test_a_prompt_cost_that_fits_only_without_the_reservations_in_flight_is_refused() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    reserved = model.cost(model.prompt_flops(10), 0.0)
    prompt = model.cost(model.prompt_flops(2), 0.0)
    budget = Budget(max_cost=reserved + prompt, cost_model=model)
    held, gate = await _hold_a_call(budget, " ".join(["p"] * 10))
    with pytest.raises(BudgetExhausted, match="a call was refused, its prompt costs") as caught:
        await drain(budget.bind(ScriptedEngine(default="a b")), req("two tokens"))
    assert caught.value.cap == "max_cost"
    gate.set()
    assert len(await held) >= 1  # not aborted by the refusal


async def test_clipped_calls_are_counted_one_by_one() -> None:
    budget = Budget(max_completion_tokens=10)
    engine = budget.bind(ScriptedEngine(default="a"))
    for _ in range(3):
        await drain(engine, req(max_tokens=50))
    assert budget.clipped_calls == 3


async def test_an_engine_error_after_the_prompt_was_reported_charges_the_prompt() -> None:
    budget = Budget(max_tokens=100)
    engine = budget.bind(ScriptedEngine([EngineStreamBroken("reset")]))
    with pytest.raises(EngineStreamBroken):
        await drain(engine, req())
    assert budget.usage.prompt_tokens == 2 and budget.usage.completion_tokens == 0
    assert budget.in_flight == 0 and budget.remaining().tokens == 98 and not budget.exhausted


async def test_every_budget_of_the_chain_reports_each_call_it_was_charged() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    root = Budget(max_calls=5)
    kid = root.child("k", max_completion_tokens=10)
    with use_sink(lambda k, d: events.append((k, d))):
        await drain(kid.bind(ScriptedEngine(default="a b c")), req(max_tokens=5))
    charges = [d for k, d in events if k == "budget_charge"]
    assert [d["budget"] for d in charges] == ["run/k", "run"]
    for d in charges:
        assert (d["prompt_tokens"], d["completion_tokens"], d["aborted"]) == (2, 3, False)
        assert d["usage"]["calls"] == 1 and d["usage"]["total_tokens"] == 5
    assert charges[0]["remaining"] == {"completion_tokens": 7, "calls": 4}
    assert charges[1]["remaining"] == {"calls": 4}


async def test_the_budgeted_engines_own_hooks_see_the_callers_request() -> None:
    reports: list[tuple[GenerationRequest, CallUsage]] = []
    engine = Budget(max_completion_tokens=3).bind(ScriptedEngine(default="a b c d e"))
    engine.add_usage_hook(lambda r, u: reports.append((r, u)))
    request = req(max_tokens=50)
    await drain(engine, request)
    ((seen, usage),) = reports
    assert seen is request and seen.max_tokens == 50  # not the clipped request the wrapped engine was sent
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 3)


def test_binding_something_that_is_not_an_engine_says_what_it_got() -> None:
    with pytest.raises(ConfigError, match="engine must be an Engine, got str"):
        BudgetedEngine("not an engine", Budget())  # type: ignore[arg-type]


class SlowToStop(FunctionEngine):
    """Takes a while to wind down when its call is cancelled (an HTTP response being closed, say)."""

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        try:
            async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
                async for delta in deltas:
                    yield delta
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)
            raise


async def test_a_consumer_cancelled_while_its_call_winds_down_is_still_cancelled() -> None:
    engine = Budget().bind(SlowToStop(lambda r: WORDS, token_delay=0.01))
    after: list[str] = []
    closing = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(engine.stream(req(max_tokens=100))) as deltas:
            async for _ in deltas:
                closing.set()
                break  # closing the stream cancels the call, which takes 0.2 s to stop
        after.append("went on")

    task = asyncio.create_task(consume())
    await closing.wait()  # the consumer is now waiting for its call to stop
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after == []


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s", "max_cost"])
def test_an_invalid_cap_is_refused_by_name(cap: str) -> None:
    with pytest.raises(ConfigError, match=f"^{cap} must be a finite number > 0, got 0$"):
        Budget(**{cap: 0})


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens", "max_calls"])
def test_token_and_call_caps_must_be_integers(cap: str) -> None:
    with pytest.raises(ConfigError, match=f"^{cap} must be an integer, got 2.5$"):
        Budget(**{cap: 2.5})


def test_a_root_budget_has_no_parent_and_closes_cleanly() -> None:
    root = Budget()
    assert root.parent is None
    root.close()  # no parent to leave
    assert root.children == [] and root.parent is None


def test_bind_passes_the_cost_model_on() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    engine = Budget().bind(ScriptedEngine(default="a", model="no-preset-model"), cost_model=model)
    assert engine.cost_model is model


async def test_remaining_never_goes_below_zero() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    prompt = model.cost(model.prompt_flops(2), 0.0)
    budget = Budget(max_completion_tokens=3, max_calls=1, max_cost=prompt * 1.001, cost_model=model)
    got = await drain(budget.bind(ScriptedEngine(default="a b c d e")), req(max_tokens=50))
    assert len(got) == 1  # the one token an admitted call may always generate goes over the cost cap
    left = budget.remaining()
    assert (left.completion_tokens, left.calls, left.cost) == (2, 0, 0.0)
    budget = Budget(max_completion_tokens=3)
    await drain(budget.bind(ScriptedEngine(default="a b c d e")), req(max_tokens=50))
    assert budget.remaining().completion_tokens == 0


async def test_remaining_calls_count_down() -> None:
    budget = Budget(max_calls=3)
    await drain(budget.bind(ScriptedEngine(default="a")), req())
    assert budget.remaining().calls == 2


def test_remaining_seconds_and_cost_are_the_tightest_along_the_chain() -> None:
    kid = Budget(wall_clock_s=100.0, max_cost=1e12).child("k", wall_clock_s=1.0, max_cost=5.0)
    left = kid.remaining()
    assert (left.seconds, left.cost) == (1.0, 5.0)


def test_rebinding_a_budgeted_engine_to_a_child_keeps_its_cost_model_and_backend() -> None:
    model = CostModel.preset(next(iter(CostModel.PRESETS)))
    inner = ScriptedEngine(default="a", model="no-preset-model")
    root = Budget()
    outer = root.bind(inner, cost_model=model)
    assert outer.backend == inner.backend and outer.model == "no-preset-model"
    again = BudgetedEngine(outer, root.child("k"))
    assert again.engine is inner and again.cost_model is model
    assert BudgetedEngine(again, again.budget.child("j")).cost_model is model


def test_a_cost_cap_without_a_cost_model_lists_the_presets() -> None:
    with pytest.raises(ConfigError) as caught:
        Budget(max_cost=1.0).bind(ScriptedEngine(default="a", model="no-preset-model"))
    assert str(caught.value).endswith(f"(presets: {', '.join(CostModel.PRESETS)})")


def test_binding_to_something_that_is_not_a_budget_says_what_it_got() -> None:
    with pytest.raises(ConfigError, match=r"^budget must be a Budget, got str$"):
        BudgetedEngine(ScriptedEngine(default="a"), "run")  # type: ignore[arg-type]


async def test_the_engine_task_of_a_call_is_named_after_its_budget() -> None:
    engine = Budget().child("k").bind(ScriptedEngine(default=WORDS, token_delay=0.001))
    names: set[str] = set()
    async with contextlib.aclosing(engine.stream(req(max_tokens=5))) as deltas:
        async for _ in deltas:
            names.update(t.get_name() for t in asyncio.all_tasks())
    assert "budgeted-call[run/k]" in names


async def test_a_budgeted_engine_of_another_budget_reports_the_prompt_as_soon_as_it_is_known() -> None:
    inner = Budget(name="inner").bind(ScriptedEngine(default=WORDS, token_delay=0.001))
    outer = Budget(name="outer")
    seen = []
    async with contextlib.aclosing(outer.bind(inner).stream(req("one two three", max_tokens=5))) as deltas:
        async for _ in deltas:
            seen.append(outer.usage.prompt_tokens)
    assert seen and set(seen) == {3}
