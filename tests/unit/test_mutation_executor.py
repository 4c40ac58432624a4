"""Executor scheduling in detail (gaps found by mutation testing, `make mutation`): leaving the context, skipped
dependents and their records, cancelling before anyone waits, and thought nodes (context, record, fallbacks)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from tool_fakes import FakeRegistry

from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.errors import BudgetExhausted, ConfigError, NodeFailedError, PlanError, ToolError
from branchwise.events import use_sink
from branchwise.executors.executor import Executor, RetryPolicy
from branchwise.planners.plan import PlanNode, Repair

pytestmark = pytest.mark.timeout(30)


def n(i: int, tool: str, *args: Any, **kw: Any) -> PlanNode:
    return PlanNode(i, tool=tool, args=list(args), **kw)


def registry(release: asyncio.Event | None = None) -> FakeRegistry:
    async def wait(value: Any = None) -> Any:
        if release is not None:
            await release.wait()
        return value

    def echo(value: Any) -> Any:
        return value

    def fail(value: Any = None) -> Any:
        raise ValueError("boom")

    return FakeRegistry(wait, echo, fail)


# -- the context ----------------------------------------------------------------------------------------------------


async def test_leaving_the_block_with_nodes_running_cancels_them() -> None:
    release = asyncio.Event()
    async with Executor(tools=registry(release)) as ex:
        result = ex.add(n(1, "wait", "x"))
        await asyncio.sleep(0)
        assert result.status == "running"
    assert result.status == "cancelled"
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("branchwise-node") and not t.done()]


async def test_leaving_the_block_on_an_error_closes_the_executor() -> None:
    ex = Executor(tools=registry())
    with pytest.raises(RuntimeError):
        async with ex:
            raise RuntimeError("the planner broke")
    with pytest.raises(ConfigError, match="closed"):
        ex.add(n(1, "echo", "x"))


async def test_leaving_the_block_after_a_finished_run_keeps_the_results() -> None:
    async with Executor(tools=registry()) as ex:
        results = await ex.run([n(1, "echo", "x")])
    assert results[1].status == "ok" and results[1].output == "x"


# -- failures under "continue" --------------------------------------------------------------------------------------


async def test_a_failed_node_skips_its_dependents_and_records_why() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with use_sink(lambda kind, data: events.append((kind, data))):
        ex = Executor(tools=registry(), failure="continue")
        results = await ex.run([n(1, "fail"), n(2, "echo", "$1"), n(3, "echo", "$2"), n(4, "echo", "free")])
    assert [results[i].status for i in (1, 2, 3, 4)] == ["error", "skipped", "skipped", "ok"]
    message = "dependency 1 (fail) did not succeed: boom"
    assert (results[2].error, results[2].error_type) == (message, "DependencyFailed")
    assert (results[3].error, results[3].error_type) == (message, "DependencyFailed")
    skipped = [d for k, d in events if k == "node_error" and d["error_type"] == "DependencyFailed"]
    assert skipped == [
        {
            "node": 2,
            "name": "echo",
            "error": message,
            "error_type": "DependencyFailed",
            "duration_s": 0.0,
            "attempts": 0,
        },
        {
            "node": 3,
            "name": "echo",
            "error": message,
            "error_type": "DependencyFailed",
            "duration_s": 0.0,
            "attempts": 0,
        },
    ]


async def test_a_node_added_after_its_dependency_failed_is_skipped_and_the_run_still_ends() -> None:
    ex = Executor(tools=registry(), failure="continue")
    ex.add(n(1, "fail"))
    await asyncio.sleep(0.01)
    late = ex.add(n(2, "echo", "$1"))
    assert late.status == "skipped" and late.error_type == "DependencyFailed"
    ex.close()
    results = await asyncio.wait_for(ex.wait(), 5)
    assert results[2].status == "skipped"


# -- cancel ---------------------------------------------------------------------------------------------------------


async def test_cancel_before_anyone_waits_marks_unstarted_nodes_and_wait_returns() -> None:
    release = asyncio.Event()
    ex = Executor(tools=registry(release))
    first = ex.add(n(1, "wait", "a"))
    second = ex.add(n(2, "echo", "$1"))  # waits for node 1
    join = ex.add(PlanNode(3, kind="join", deps=[2]))
    await asyncio.sleep(0)
    await ex.cancel()
    assert (first.status, second.status, join.status) == ("cancelled", "cancelled", "pending")
    results = await asyncio.wait_for(ex.wait(), 5)
    assert [r.status for r in results.values()] == ["cancelled", "cancelled", "pending"]
    with pytest.raises(ConfigError, match="closed"):
        ex.add(n(4, "echo", "x"))


# -- thought nodes --------------------------------------------------------------------------------------------------


async def test_a_thought_runs_its_strategy_with_the_thought_context_and_records_the_result() -> None:
    engine = ScriptedEngine(default="Six sevens. The answer is 42.")
    ex = Executor(engine=engine, thought="self_consistency", thought_context={"max_tokens": 7})
    results = await ex.run([PlanNode(1, kind="thought", question="What is 6 x 7?")])
    result = results[1]
    assert result.status == "ok" and result.output == "42"
    assert engine.calls[0].max_tokens == 7 and engine.calls[0].n == 8  # the executor's default thought strategy
    assert result.detail["strategy"] == "self_consistency"
    assert result.detail["result"].answer == "42" and result.detail["result"].strategy == "self_consistency"


async def test_a_thought_without_an_answer_passes_on_its_first_text() -> None:
    engine = ScriptedEngine([ScriptedResponse(["  no idea at all  ", "something else"])])
    ex = Executor(engine=engine, thought={"strategy": "self_consistency", "n": 2})
    results = await ex.run([PlanNode(1, kind="thought", question="?")])
    assert results[1].output == "no idea at all"


async def test_a_thought_that_finishes_no_trace_fails_with_a_clear_error() -> None:
    engine = ScriptedEngine([ScriptedResponse(["x"], error=BudgetExhausted("max_calls"))])  # stopped at once
    ex = Executor(engine=engine, failure="continue")
    results = await ex.run([PlanNode(1, kind="thought", question="?")])
    assert (results[1].status, results[1].error_type) == ("error", "ExecutionError")
    assert results[1].error == "thought node 1: strategy 'single' finished no trace"


async def test_a_thought_needs_an_engine() -> None:
    ex = Executor(failure="continue")
    results = await ex.run([PlanNode(7, kind="thought", question="?")])
    assert results[7].error == "thought node 7 needs an engine; the executor has none"
    assert results[7].error_type == "ConfigError"


# -- waiting, fail-fast, events -------------------------------------------------------------------------------------


async def test_wait_does_not_return_before_close_even_with_nothing_running() -> None:
    ex = Executor(tools=registry())
    waiter = asyncio.create_task(ex.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    ex.add(n(1, "echo", "x"))
    ex.close()
    results = await asyncio.wait_for(waiter, 5)
    assert results[1].output == "x"


async def test_fail_fast_names_the_node_and_error_cancels_the_rest_and_leaves_the_join() -> None:
    release = asyncio.Event()
    ex = Executor(tools=registry(release))
    slow = ex.add(n(1, "wait", "a"))
    ex.add(n(2, "fail"))
    join = ex.add(PlanNode(3, kind="join", deps=[1, 2]))
    ex.close()
    with pytest.raises(NodeFailedError) as caught:
        await ex.wait()
    assert str(caught.value) == "node 2 (fail) failed: ValueError: boom"
    assert (caught.value.node, caught.value.name, str(caught.value.error)) == (2, "fail", "boom")
    assert slow.status == "cancelled" and slow.ended_at is not None and slow.duration_s is not None
    assert join.status == "pending"
    assert ex.running == 0


async def test_an_error_without_a_message_is_named_by_its_type() -> None:
    def silent() -> None:
        raise ValueError

    ex = Executor(tools=FakeRegistry(silent), failure="continue")
    results = await ex.run([n(1, "silent")])
    assert (results[1].error, results[1].error_type) == ("ValueError", "ValueError")


async def test_node_start_events() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with use_sink(lambda kind, data: events.append((kind, data))):
        await Executor(tools=registry()).run([n(1, "echo", "x")])
    assert [d for k, d in events if k == "node_start"] == [{"node": 1, "kind": "tool", "name": "echo"}]


async def test_node_end_and_node_error_events() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with use_sink(lambda kind, data: events.append((kind, data))):
        await Executor(tools=registry(), failure="continue").run([n(1, "echo", "x"), n(2, "fail")])
    (end,) = [d for k, d in events if k == "node_end"]
    assert end == {"node": 1, "name": "echo", "duration_s": end["duration_s"], "attempts": 1, "output": "x"}
    assert end["duration_s"] is not None and end["duration_s"] >= 0
    (error,) = [d for k, d in events if k == "node_error"]
    assert error == {
        "node": 2,
        "name": "fail",
        "duration_s": error["duration_s"],
        "attempts": 1,
        "error": "boom",
        "error_type": "ValueError",
    }
    assert error["duration_s"] is not None


async def test_a_thought_with_a_time_limit_runs_and_records_its_result() -> None:
    engine = ScriptedEngine(default="The answer is 42.")
    results = await Executor(engine=engine, timeout_s=10).run([PlanNode(1, kind="thought", question="6 x 7?")])
    assert results[1].output == "42" and results[1].detail["strategy"] == "single"


# -- parameters and adding ------------------------------------------------------------------------------------------


def test_documented_defaults_and_messages() -> None:
    ex = Executor()
    assert (ex.concurrency, ex.timeout_s, ex.failure, ex.validate) == (16, None, "fail_fast", True)
    for kwargs, message in [
        ({"concurrency": 0}, "concurrency must be an integer >= 1, got 0"),
        ({"concurrency": True}, "concurrency must be an integer >= 1, got True"),
        ({"failure": "panic"}, "failure must be 'fail_fast' or 'continue', got 'panic'"),
        ({"timeout_s": 0}, "timeout_s must be > 0 or None, got 0"),
    ]:
        with pytest.raises(ConfigError) as caught:
            Executor(**kwargs)  # type: ignore[arg-type]
        assert str(caught.value) == message


async def test_results_are_named_by_tool_think_or_join() -> None:
    ex = Executor(tools=registry(), engine=ScriptedEngine(default="The answer is 1."))
    tool = ex.add(n(1, "echo", "x"))
    thought = ex.add(PlanNode(2, kind="thought", question="?"))
    join = ex.add(PlanNode(3, kind="join", deps=[1, 2]))
    assert [(r.kind, r.name) for r in (tool, thought, join)] == [
        ("tool", "echo"),
        ("thought", "think"),
        ("join", "join"),
    ]
    ex.close()
    await ex.wait()


async def test_plan_node_events_record_dependencies_and_repairs() -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    with use_sink(lambda kind, data: events.append((kind, data))):
        ex = Executor(tools=registry())
        ex.add(n(1, "echo", "x"))
        ex.add(n(2, "echo", "$1"), repairs=[Repair("ref_braces", "braced $1")])
        ex.close()
        await ex.wait()
    assert [d for k, d in events if k == "plan_node"] == [
        {"node": 1, "kind": "tool", "name": "echo", "deps": [], "repairs": []},
        {
            "node": 2,
            "kind": "tool",
            "name": "echo",
            "deps": [1],
            "repairs": [{"kind": "ref_braces", "detail": "braced $1", "node": None, "line": None}],
        },
    ]


async def test_add_refuses_with_messages_that_name_the_node_and_field() -> None:
    closed = Executor(tools=registry())
    closed.close()
    with pytest.raises(ConfigError) as caught:
        closed.add(n(1, "echo", "x"))
    assert str(caught.value) == "the executor is closed: no nodes can be added"
    loose = Executor(tools=registry(), validate=False)
    loose.add(n(1, "echo", "x"))
    with pytest.raises(PlanError) as caught:
        loose.add(n(1, "echo", "y"))
    assert (str(caught.value), caught.value.node, caught.value.field) == (
        "node 1, field 'id': duplicate node id 1",
        "1",
        "id",
    )
    with pytest.raises(PlanError) as caught:
        loose.add(n(2, "echo", "x", deps=[9]))
    assert (str(caught.value), caught.value.node, caught.value.field) == (
        "node 2, field 'deps': dependency 9 was not added before this node",
        "2",
        "deps",
    )
    await loose.cancel()
    with pytest.raises(PlanError) as caught:
        Executor(tools=registry()).add(n(1, "nope"))
    assert caught.value.field == "tool"


async def test_a_node_added_after_its_dependency_finished_runs_and_still_waits_for_the_others() -> None:
    release = asyncio.Event()
    ex = Executor(tools=registry(release))
    ex.add(n(1, "echo", "a"))
    await asyncio.sleep(0.01)
    assert ex.results[1].status == "ok"
    ex.add(n(2, "wait", "b"))
    late = ex.add(n(3, "echo", "$1 $2"))  # node 1 is done, node 2 still running
    await asyncio.sleep(0.01)
    assert late.status == "pending"
    release.set()
    ex.close()
    results = await asyncio.wait_for(ex.wait(), 5)
    assert results[3].output == "a b"


async def test_a_node_added_after_a_skipped_dependency_is_skipped() -> None:
    ex = Executor(tools=registry(), failure="continue")
    ex.add(n(1, "fail"))
    ex.add(n(2, "echo", "$1"))
    await asyncio.sleep(0.01)
    assert ex.results[2].status == "skipped"
    after_skipped = ex.add(n(3, "echo", "$2"))
    assert after_skipped.status == "skipped"
    assert after_skipped.error == "dependency 2 (echo) did not succeed: dependency 1 (fail) did not succeed: boom"
    ex.close()
    await ex.wait()


# -- attempts -------------------------------------------------------------------------------------------------------


async def test_a_timed_out_node_is_named_in_the_error() -> None:
    ex = Executor(tools=registry(asyncio.Event()), timeout_s=0.05, failure="continue")
    results = await ex.run([n(4, "wait", "x")])
    assert results[4].error == "node 4 (wait) timed out after 0.05 s"
    assert results[4].error_type == "NodeTimeoutError"


async def test_retries_are_logged_reported_and_spaced_by_the_backoff(caplog: pytest.LogCaptureFixture) -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ToolError("flaky", f"try {calls['n']}")
        return "ok"

    events: list[tuple[str, dict[str, Any]]] = []
    ex = Executor(tools=FakeRegistry(flaky), retry=RetryPolicy(max_attempts=3, backoff_s=0.05, multiplier=2.0))
    started = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger="branchwise.executors.executor"),
        use_sink(lambda kind, data: events.append((kind, data))),
    ):
        results = await ex.run([n(1, "flaky")])
    assert results[1].output == "ok" and results[1].attempts == 3
    assert time.monotonic() - started >= 0.05 + 0.1  # 0.05 s, then 0.1 s
    assert [d for k, d in events if k == "node_retry"] == [
        {"node": 1, "attempt": 1, "error": "tool 'flaky' failed: try 1"},
        {"node": 1, "attempt": 2, "error": "tool 'flaky' failed: try 2"},
    ]
    assert [r.getMessage() for r in caplog.records if r.name == "branchwise.executors.executor"] == [
        "node 1 attempt 1 failed (tool 'flaky' failed: try 1); retrying",
        "node 1 attempt 2 failed (tool 'flaky' failed: try 2); retrying",
    ]


# -- execution ------------------------------------------------------------------------------------------------------


async def test_tool_nodes_need_a_registry() -> None:
    results = await Executor(validate=False, failure="continue").run([n(1, "echo", "x")])
    assert results[1].error == "the executor has no tool registry"


async def test_arguments_that_do_not_bind_name_the_field() -> None:
    ex = Executor(tools=registry(), validate=False, failure="continue")
    results = await ex.run([n(1, "echo", "x", "y"), PlanNode(2, tool="echo", kwargs={"nope": 1})])
    assert (results[1].error_type, results[2].error_type) == ("PlanError", "PlanError")
    assert results[1].error == "node 1, field 'args': tool 'echo' failed: too many positional arguments"
    assert results[2].error == "node 2, field 'nope': tool 'echo' failed: argument 'nope': unknown argument"


async def test_a_binding_error_without_a_field_names_the_arguments() -> None:
    class Strict:
        name = "strict"

        def bind(self, args: Any, kwargs: Any) -> dict[str, Any]:
            raise ConfigError("cannot bind")

        async def call(self, arguments: Any) -> Any:
            return None

    class Tools:
        def __contains__(self, name: object) -> bool:
            return name == "strict"

        def get(self, name: str) -> Strict:
            return Strict()

    ex = Executor(tools=Tools(), validate=False, failure="continue")  # type: ignore[arg-type]
    results = await ex.run([n(1, "strict", "x")])
    assert (results[1].error, results[1].error_type) == ("node 1, field 'args': cannot bind", "PlanError")


async def test_node_tasks_are_named_after_their_node() -> None:
    release = asyncio.Event()
    ex = Executor(tools=registry(release))
    ex.add(n(7, "wait", "x"))
    await asyncio.sleep(0)
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "branchwise-node-7" in names
    await ex.cancel()


async def test_after_a_fail_fast_failure_no_node_is_counted_as_running() -> None:
    release = asyncio.Event()
    ex = Executor(tools=registry(release))
    blocked = ex.add(n(1, "wait", "x"))
    await asyncio.sleep(0)
    assert ex.running == 1
    failed = ex.add(n(2, "fail"))
    for _ in range(5):  # the failure cancels node 1; nobody waits on the executor
        await asyncio.sleep(0)
    assert (failed.status, blocked.status) == ("error", "cancelled")
    assert ex.running == 0
    with pytest.raises(NodeFailedError):
        await ex.wait()


async def test_peak_running_is_zero_when_no_node_ran() -> None:
    ex = Executor(tools=registry())
    await ex.run([PlanNode(1, kind="join")])
    assert ex.peak_running == 0
