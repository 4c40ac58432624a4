"""Executor: event-driven dispatch, concurrency limit, timeouts, retries, failure policies, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tool_fakes import FakeRegistry

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine
from branchwise.errors import (
    NodeFailedError,
    NodeTimeoutError,
    PlanError,
    ToolArgumentError,
    ToolError,
    UnknownNameError,
)
from branchwise.events import use_sink
from branchwise.executors.executor import Executor, RetryPolicy
from branchwise.planners.plan import Plan, PlanNode

pytestmark = pytest.mark.timeout(30)


def node_tasks() -> list[asyncio.Task[Any]]:
    """The executor's node tasks still alive in this loop (none may outlive a run)."""
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("branchwise-node") and not t.done()]


class Gate:
    """Tools that block until released, recording start order."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.events: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.counts: dict[int, asyncio.Event] = {}

    def started_count(self, count: int) -> asyncio.Event:
        """Set once ``count`` tools have started."""
        event = self.counts.setdefault(count, asyncio.Event())
        if len(self.started) >= count:
            event.set()
        return event

    def event(self, key: str) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def arrival(self, key: str) -> asyncio.Event:
        return self.arrived.setdefault(key, asyncio.Event())

    def registry(self) -> FakeRegistry:
        gate = self

        async def wait(key: str, value: Any = None) -> Any:
            gate.started.append(key)
            gate.arrival(key).set()
            gate.started_count(len(gate.started))
            await gate.event(key).wait()
            return value if value is not None else key

        def echo(value: Any) -> Any:
            gate.started.append(f"echo:{value}")
            return value

        return FakeRegistry(wait, echo)


def n(i: int, tool: str, *args: Any, **kw: Any) -> PlanNode:
    return PlanNode(i, tool=tool, args=list(args), **kw)


async def test_dispatch_follows_dependencies_and_references_flow() -> None:
    gate = Gate()
    plan = Plan(
        nodes=[
            n(1, "wait", "a", 10),
            n(2, "wait", "b", 20),
            n(3, "echo", "$1 + $2"),
            n(4, "echo", "$3"),
            PlanNode(5, kind="join"),
        ]
    )
    b_done = asyncio.Event()

    def sink(kind: str, data: dict[str, Any]) -> None:
        if kind == "node_end" and data["node"] == 2:
            b_done.set()

    with use_sink(sink):
        async with Executor(tools=gate.registry()) as ex:
            run = asyncio.create_task(ex.run(plan))
            await gate.arrival("a").wait()
            await gate.arrival("b").wait()
            assert gate.started == ["a", "b"]  # both roots started at once, nothing else
            gate.event("b").set()
            await b_done.wait()
            assert ex.results[3].status == "pending"  # node 3 still waits for node 1
            gate.event("a").set()
            results = await run
    assert gate.started == ["a", "b", "echo:10 + 20", "echo:10 + 20"]
    assert results[3].output == "10 + 20" and results[4].status == "ok"
    assert results[5].status == "pending"  # joins are for the agent
    assert not node_tasks()


async def test_global_concurrency_limit() -> None:
    gate = Gate()
    plan = [n(i, "wait", "k", i) for i in range(1, 11)]
    ex = Executor(tools=gate.registry(), concurrency=3)
    run = asyncio.create_task(ex.run(plan))
    await gate.started_count(3).wait()
    assert ex.running == 3 and len(gate.started) == 3
    gate.event("k").set()
    results = await run
    assert ex.peak_running == 3
    assert all(r.ok for r in results.values())


async def test_timeout_fail_fast_raises_typed_error_and_cancels_siblings() -> None:
    gate = Gate()
    ex = Executor(tools=gate.registry(), timeout_s=0.05)
    plan = [n(1, "wait", "never"), n(2, "wait", "also", timeout_s=30), n(3, "echo", "$2")]
    with pytest.raises(NodeFailedError) as info:
        await ex.run(plan)
    assert isinstance(info.value.__cause__, NodeTimeoutError) and info.value.node == 1
    assert ex.results[1].status == "error" and ex.results[1].error_type == "NodeTimeoutError"
    assert ex.results[2].status == "cancelled" and ex.results[3].status == "cancelled"
    assert not node_tasks()


async def test_continue_policy_skips_dependents_and_runs_the_rest() -> None:
    def boom(x: int) -> int:
        raise ToolError("boom", "exploded")

    def echo(value: Any) -> Any:
        return value

    events: list[tuple[str, dict[str, Any]]] = []
    ex = Executor(tools=FakeRegistry(boom, echo), failure="continue")
    with use_sink(lambda k, d: events.append((k, d))):
        results = await ex.run([n(1, "boom", 1), n(2, "echo", "$1"), n(3, "echo", "$2"), n(4, "echo", "ok")])
    assert [results[i].status for i in (1, 2, 3, 4)] == ["error", "skipped", "skipped", "ok"]
    assert "exploded" in (results[1].error or "") and "dependency 1" in (results[3].error or "")
    assert "ERROR" in results[2].observation()
    kinds = [k for k, _ in events]
    assert kinds.count("plan_node") == 4 and kinds.count("node_error") == 3 and kinds.count("node_end") == 1
    end = next(d for k, d in events if k == "node_end")
    assert end["output"] == "'ok'" or end["output"] == "ok"
    assert end["duration_s"] >= 0


async def test_retries_transient_errors_but_not_argument_errors() -> None:
    calls = {"flaky": 0, "strict": 0}

    def flaky(x: int) -> int:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ToolError("flaky", "transient")
        return x

    def strict(x: int) -> int:
        calls["strict"] += 1
        raise ToolArgumentError("strict", "bad", field="x")

    tools = FakeRegistry(flaky, strict)
    results = await Executor(tools=tools, retry=RetryPolicy(max_attempts=3)).run([n(1, "flaky", 7)])
    assert results[1].output == 7 and results[1].attempts == 3
    results = await Executor(tools=tools, retry=RetryPolicy(max_attempts=3), failure="continue").run(
        [n(1, "strict", 1)]
    )
    assert results[1].status == "error" and calls["strict"] == 1
    calls["flaky"] = 0
    results = await Executor(tools=tools, failure="continue").run([n(1, "flaky", 1, max_attempts=2)])
    assert results[1].status == "error" and results[1].attempts == 2


async def test_incremental_add_dispatches_immediately() -> None:
    gate = Gate()
    ex = Executor(tools=gate.registry())
    waiter = asyncio.create_task(ex.wait())
    ex.add(n(1, "wait", "first", 1))
    await gate.arrival("first").wait()  # running before node 2 even exists
    ex.add(n(2, "echo", "$1"))
    assert ex.results[2].status == "pending"
    gate.event("first").set()
    ex.add(n(3, "echo", "x"))
    ex.close()
    results = await waiter
    assert results[2].output == 1 and results[3].output == "x"
    with pytest.raises(PlanError, match="before"):
        Executor(tools=gate.registry()).add(n(5, "echo", "$4"))


async def test_cancelling_the_run_cancels_every_node_down_to_the_engine() -> None:
    gate = Gate()
    asked = asyncio.Event()

    def reply(request: Any) -> str:
        asked.set()
        return "word " * 500 + "The answer is 3."

    engine = ScriptedEngine(default=reply, token_delay=0.01)
    ex = Executor(tools=gate.registry(), engine=engine, budget=Budget())
    run = asyncio.create_task(ex.run([n(1, "wait", "slow"), PlanNode(2, kind="thought", question="1+2?")]))
    await gate.arrival("slow").wait()
    await asked.wait()
    # The reply is chosen in the same step that opens the stream (no await in between): it is running now.
    assert engine.active == 1
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert engine.active == 0 and engine.aborted == 1
    assert {r.status for r in ex.results.values()} == {"cancelled"}
    assert not node_tasks()


async def test_thought_output_flows_into_later_nodes_under_the_shared_budget() -> None:
    def add(a: float, b: float) -> float:
        return a + b

    engine = ScriptedEngine(["Six times seven. The answer is 42."])
    budget = Budget()
    ex = Executor(tools=FakeRegistry(add), engine=engine, budget=budget, thought="single")
    results = await ex.run([PlanNode(1, kind="thought", question="6*7?"), n(2, "add", "$1", 1)])
    assert results[1].output == "42" and results[2].output == 43
    assert results[1].detail["strategy"] == "single"
    assert budget.usage.calls == 1 and budget.children[0].name == "node1"
    engine.assert_complete()


def test_config_errors() -> None:
    from branchwise.errors import ConfigError

    with pytest.raises(ConfigError):
        Executor(concurrency=0)
    with pytest.raises(ConfigError):
        Executor(failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RetryPolicy(max_attempts=0)


async def test_unvalidated_executor_still_rejects_unknown_dependencies_without_side_effects() -> None:
    ex = Executor(tools=Gate().registry(), validate=False)
    with pytest.raises(PlanError, match="dependency 4"):
        ex.add(n(5, "echo", "$4"))
    assert ex.results == {}
    ex.add(n(1, "echo", "a"))
    ex.close()
    assert (await ex.wait())[1].output == "a"


def test_thought_specs_resolve_to_strategies() -> None:
    from branchwise.errors import ConfigError
    from branchwise.executors.executor import resolve_strategy
    from branchwise.search import SelfConsistency, Single

    assert isinstance(resolve_strategy(None), Single)
    assert resolve_strategy(("self_consistency", {"n": 3})).n == 3
    assert resolve_strategy({"strategy": "self_consistency", "n": 2}).n == 2
    sc = SelfConsistency(n=5)
    assert resolve_strategy(sc) is sc
    with pytest.raises(UnknownNameError):
        resolve_strategy("self_consistensy")
    with pytest.raises(ConfigError):
        resolve_strategy({"n": 2})


async def test_a_node_strategy_overrides_the_run_default() -> None:
    engine = ScriptedEngine([["The answer is 7.", "The answer is 7.", "The answer is 8."]])
    ex = Executor(engine=engine, thought="single")
    node = PlanNode(1, kind="thought", question="q", strategy={"strategy": "self_consistency", "n": 3})
    results = await ex.run([node])
    assert results[1].output == "7" and results[1].detail["strategy"] == "self_consistency"
    assert engine.calls[0].n == 3


@pytest.mark.parametrize("seed", range(5))
async def test_random_dags_start_every_node_after_all_its_dependencies(seed: int) -> None:
    import random

    rng = random.Random(seed)
    finished: list[int] = []
    started: dict[int, int] = {}

    async def work(i: int) -> int:
        started[i] = len(finished)  # how many nodes had finished when this one started
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        finished.append(i)
        return i

    nodes = []
    for i in range(1, 61):
        deps = sorted(rng.sample(range(max(1, i - 8), i), min(i - 1, rng.randint(0, 3))))
        nodes.append(PlanNode(i, tool="work", args=[i], deps=deps))
    ex = Executor(tools=FakeRegistry(work), concurrency=rng.choice([1, 3, 60]))
    results = await ex.run(nodes)
    assert all(r.ok for r in results.values())
    position = {node: k for k, node in enumerate(finished)}
    for node in nodes:
        assert all(position[d] < started[node.id] for d in node.deps), f"node {node.id} started too early"
    assert ex.peak_running <= ex.concurrency


async def test_cancel_right_after_dispatch_marks_every_node_cancelled() -> None:
    gate = Gate()
    ex = Executor(tools=gate.registry())
    for i in range(1, 6):
        ex.add(n(i, "wait", f"k{i}"))  # tasks created, none has started running yet
    await ex.cancel()
    assert {r.status for r in ex.results.values()} == {"cancelled"} and ex.running == 0 and not node_tasks()
