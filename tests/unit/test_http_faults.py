"""Faults from an OpenAI-compatible server (tests/fault_server.py, a real server on 127.0.0.1) against OpenAIEngine.

Every fault must end in a retry that succeeds or in a typed error within the configured timeouts, and leave
nothing behind: no pending task, no response the server still works on, no connection the client's pool still
counts as in use (checked by running each fault twice on an engine whose pool holds two connections, then making
a normal call), and every connection closed once the engine is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import pytest_asyncio
from fault_server import (
    Behaviour,
    FaultServer,
    chat_event,
    error,
    hang,
    non_json,
    reset_after,
    sse,
    stream_text,
    text_event,
    trickle,
)

from branchwise import Budget
from branchwise.engine import GenerationRequest
from branchwise.engine.base import assemble
from branchwise.engine.openai_engine import OpenAIEngine
from branchwise.engine.types import Delta
from branchwise.errors import (
    BudgetExhausted,
    EngineRequestError,
    EngineStreamBroken,
    EngineTimeout,
    EngineUnavailable,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

FIRST_BYTE = 0.8  # per-attempt limits of the engines below: short so that faults end quickly, long enough for a
IDLE = 0.8  # loaded machine
WAIT = 3.0  # upper bound on waiting for something that should happen at once
PROMPT = GenerationRequest(prompt="p", max_tokens=50)


@pytest_asyncio.fixture
async def engines() -> AsyncIterator[Callable[..., OpenAIEngine]]:
    made: list[OpenAIEngine] = []

    def make(base_url: str | Sequence[str], **kw: Any) -> OpenAIEngine:
        kw.setdefault("backoff_base_s", 0.01)
        kw.setdefault("api_key_env", None)
        kw.setdefault("first_byte_timeout_s", FIRST_BYTE)
        kw.setdefault("idle_timeout_s", IDLE)
        kw.setdefault("connect_timeout_s", 1.0)
        kw.setdefault("request_timeout_s", 20.0)
        engine = OpenAIEngine("m", base_url, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.aclose()


async def collect(engine: Any, request: GenerationRequest = PROMPT, into: list[Delta] | None = None) -> str:
    got = [] if into is None else into
    async with contextlib.aclosing(engine.stream(request)) as deltas:
        async for d in deltas:
            got.append(d)
    (completion,) = assemble(1, got)
    return completion.text


def client_tasks(*servers: FaultServer) -> list[asyncio.Task[Any]]:
    """Tasks other than the running test and the servers' connection handlers."""
    ours = {asyncio.current_task()}
    for server in servers:
        ours |= server.handler_tasks
    return [t for t in asyncio.all_tasks() if t not in ours and not t.done()]


async def assert_nothing_left(engine: OpenAIEngine, *servers: FaultServer) -> None:
    """No pending task, no response in progress, the pool still usable, every connection closed at the end."""
    for server in servers:
        await server.wait_until(lambda s=server: not s.busy_connections, WAIT)  # type: ignore[misc]
    assert client_tasks(*servers) == []
    assert sum(engine.outstanding.values()) == 0
    await engine.aclose()
    for server in servers:
        await server.wait_until(lambda s=server: not s.open_connections, WAIT)  # type: ignore[misc]


FINE = sse(stream_text(["fine"]))


# (name, behaviours for the first request of each round, result: "fine" or the expected error type, requests
# per round)
FAULTS: list[tuple[str, list[Behaviour], str | type[Exception], int]] = [
    ("429 with Retry-After", [error(429, "slow down", retry_after="0.1"), FINE], "fine", 2),
    ("500", [error(500, "internal"), FINE], "fine", 2),
    ("503", [error(503, "overloaded"), FINE], "fine", 2),
    ("reset before any token", [reset_after([]), FINE], "fine", 2),
    ("reset after a role chunk only", [reset_after([chat_event(0, None)]), FINE], "fine", 2),
    ("reset after tokens", [reset_after([text_event(0, "half", ids=[1])])], EngineStreamBroken, 1),
    ("accepts and never answers", [hang(), FINE], "fine", 2),
    ("stalls after the head", [trickle([], delay=0.0, done=False), FINE], "fine", 2),
    (
        "slow trickle within the idle limit",
        [trickle(stream_text(["fine"]), delay=IDLE / 8, bytes_per_write=32)],
        "fine",
        1,
    ),
    ("trickle slower than the idle limit", [trickle(stream_text(["late"]), delay=IDLE * 2), FINE], "fine", 2),
    (
        "keep-alive comments while queued",
        [trickle([": keep-alive\n\n"] * 4 + stream_text(["fine"]), delay=IDLE / 3, bytes_per_write=4096)],
        "fine",
        1,
    ),
    ("non-JSON body", [non_json()], EngineRequestError, 1),
    ("SSE without [DONE], complete", [sse(stream_text(["fine"]), done=False)], "fine", 1),
    ("SSE without [DONE], cut before a token", [sse([chat_event(0, None)], done=False), FINE], "fine", 2),
    ("SSE without [DONE], cut after a token", [sse([text_event(0, "x")], done=False)], EngineStreamBroken, 1),
    ("garbage event", [sse(["data: {not json\n\n"])], EngineRequestError, 1),
    ("400", [error(400, "bad request")], EngineRequestError, 1),
]


@pytest.mark.parametrize(("behaviours", "expected", "per_round"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
async def test_each_fault_ends_in_a_retry_or_a_typed_error_and_leaves_nothing(
    fault_server: FaultServer, engines: Any, behaviours: list[Behaviour], expected: Any, per_round: int
) -> None:
    # One slot and one URL: the pool holds two connections, so a connection leaked per round would make the
    # third round (or the final call) wait for the pool until its first-byte timeout and fail.
    engine = engines(fault_server.url, max_concurrency=1, max_retries=2)
    budget_s = (per_round * (FIRST_BYTE + IDLE * 3)) + 2.0
    for _ in range(2):
        fault_server.push(*behaviours)
        start = time.monotonic()
        if expected == "fine":
            assert await collect(engine) == "fine"
        else:
            with pytest.raises(expected):
                await collect(engine)
        assert time.monotonic() - start < budget_s
        await fault_server.wait_until(lambda: not fault_server.busy_connections, WAIT)
    assert len(fault_server.requests) == 2 * per_round  # nothing retried that should not be
    fault_server.push(FINE)
    assert await collect(engine) == "fine"  # with a connection leaked per round, the pool would have none left
    await assert_nothing_left(engine, fault_server)


async def test_generate_survives_every_retryable_fault(fault_server: FaultServer, engines: Any) -> None:
    retryable = [f[1][0] for f in FAULTS if f[2] == "fine" and f[3] == 2]
    fault_server.push(*retryable, FINE)
    engine = engines(fault_server.url, max_retries=len(retryable))
    generation = await engine.generate(PROMPT)
    assert generation.text == "fine"
    assert len(fault_server.requests) == len(retryable) + 1
    await assert_nothing_left(engine, fault_server)


async def test_429_retry_waits_for_retry_after(fault_server: FaultServer, engines: Any) -> None:
    fault_server.push(error(429, "slow down", retry_after="0.3"), FINE)
    engine = engines(fault_server.url)
    assert await collect(engine) == "fine"
    first, second = fault_server.requests
    assert second.arrived - first.arrived >= 0.3


async def test_a_server_that_always_hangs_ends_in_engine_timeout_within_the_per_attempt_limits(
    fault_server: FaultServer, engines: Any
) -> None:
    fault_server.default = hang(fault_server)
    engine = engines(fault_server.url, max_retries=2, request_timeout_s=600.0)
    start = time.monotonic()
    with pytest.raises(EngineTimeout, match="first_byte_timeout_s"):
        await collect(engine)
    assert time.monotonic() - start < 3 * FIRST_BYTE + 1.0  # three attempts, not request_timeout_s
    assert len(fault_server.requests) == 3
    await assert_nothing_left(engine, fault_server)


async def test_idle_timeout_after_tokens_breaks_the_stream(fault_server: FaultServer, engines: Any) -> None:
    fault_server.push(sse([text_event(0, "a", ids=[1])], then="wait", server=fault_server))
    engine = engines(fault_server.url)
    got: list[Delta] = []
    start = time.monotonic()
    with pytest.raises(EngineStreamBroken, match="idle_timeout_s") as info:
        await collect(engine, into=got)
    assert IDLE * 0.9 <= time.monotonic() - start < IDLE + 1.0
    assert info.value.url == fault_server.url
    assert [d.text for d in got] == ["a"] and len(fault_server.requests) == 1
    await asyncio.wait_for(fault_server.disconnected.wait(), WAIT)
    await assert_nothing_left(engine, fault_server)


async def test_hung_url_fails_over_to_the_healthy_one_within_seconds(
    fault_server: FaultServer, fault_server_b: FaultServer, engines: Any
) -> None:
    fault_server.default = hang(fault_server)
    fault_server_b.default = FINE
    # Default backoff: the failover must not wait it out; the hung URL comes first in turn.
    engine = engines([fault_server.url, fault_server_b.url], backoff_base_s=0.25, first_byte_timeout_s=1.0)
    start = time.monotonic()
    assert await collect(engine) == "fine"
    assert time.monotonic() - start < 1.0 + 2.0
    assert (len(fault_server.requests), len(fault_server_b.requests)) == (1, 1)
    await asyncio.wait_for(fault_server.disconnected.wait(), WAIT)  # the hung request was given up
    # The hung URL cools down: the next calls go to the healthy one without waiting.
    start = time.monotonic()
    for _ in range(3):
        assert await collect(engine) == "fine"
    assert time.monotonic() - start < 2.0
    assert len(fault_server.requests) == 1
    await assert_nothing_left(engine, fault_server, fault_server_b)


async def test_default_timeouts_end_a_hang_in_seconds() -> None:
    engine = OpenAIEngine("m", "http://127.0.0.1:9/v1", api_key_env=None)
    assert engine._connect_timeout_s <= 5 and engine._first_byte_timeout_s <= 10 and engine._idle_timeout_s <= 30
    await engine.aclose()


# -- budget stops (issue 12 #10) ----------------------------------------------------------------------------------
async def test_wall_clock_stops_close_the_request_and_free_the_connection(
    fault_server: FaultServer, engines: Any
) -> None:
    """A budget ending in-flight streams: the server sees each request closed, the pool gets its connection back."""
    max_concurrency = 2
    engine = engines(fault_server.url, max_concurrency=max_concurrency, idle_timeout_s=30.0)
    for _ in range(max_concurrency + 2):
        fault_server.disconnected.clear()
        fault_server.push(sse([text_event(0, "a", ids=[1])], then="wait", server=fault_server))
        llm = Budget(wall_clock_s=0.3).bind(engine)
        with pytest.raises(BudgetExhausted):
            await collect(llm)
        await asyncio.wait_for(fault_server.disconnected.wait(), 1.0)  # the server saw the request closed
        await fault_server.wait_until(lambda: not fault_server.busy_connections, 1.0)
        assert client_tasks(fault_server) == []
    fault_server.push(FINE)
    assert await collect(engine) == "fine"  # after max_concurrency + 2 stops, a connection is still there
    await assert_nothing_left(engine, fault_server)


async def test_token_cap_stops_the_other_calls_and_frees_their_connections(
    fault_server: FaultServer, engines: Any
) -> None:
    """One call crosses the token cap; the calls still streaming are aborted and their connections closed."""
    max_concurrency = 3
    engine = engines(fault_server.url, max_concurrency=max_concurrency, idle_timeout_s=30.0)
    for _ in range(2):
        started = asyncio.Event()
        release = asyncio.Event()
        waiting = [sse([text_event(0, "a", ids=[1])], then="wait", server=fault_server) for _ in range(2)]

        async def crosser(
            req: Any, reader: Any, writer: Any, started: asyncio.Event = started, release: asyncio.Event = release
        ) -> bool:
            started.set()
            await release.wait()
            return await sse([text_event(0, "b" * 30, ids=list(range(30)))], then="wait", server=fault_server)(
                req, reader, writer
            )

        fault_server.push(*waiting, crosser)
        budget = Budget(max_tokens=24)  # room for the prompts and the first tokens; the crosser's 30 end it
        llm = budget.bind(engine)
        calls = [asyncio.create_task(collect(llm)) for _ in range(3)]
        await asyncio.wait_for(started.wait(), WAIT)
        await fault_server.wait_until(lambda: len(fault_server.busy_connections) == 3, WAIT)
        release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, BudgetExhausted) for r in results), results
        await fault_server.wait_until(lambda: not fault_server.busy_connections, 1.0)
        assert client_tasks(fault_server) == []
    fault_server.push(FINE)
    assert await collect(engine) == "fine"
    await assert_nothing_left(engine, fault_server)


async def test_repeated_cancellation_of_a_consumer_does_not_leak_the_connection(
    fault_server: FaultServer, engines: Any
) -> None:
    """A task cancelled twice in a row (task groups and timeouts do it) while its stream is being closed."""
    engine = engines(fault_server.url, max_concurrency=1, idle_timeout_s=30.0)
    for _ in range(3):
        fault_server.disconnected.clear()
        fault_server.push(sse([text_event(0, "a", ids=[1])], then="wait", server=fault_server))
        got_one = asyncio.Event()

        async def consume(got_one: asyncio.Event = got_one) -> None:
            async for _ in engine.stream(PROMPT):
                got_one.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_one.wait(), WAIT)
        task.cancel()
        for _ in range(5):  # and again while the first cancellation is being handled
            await asyncio.sleep(0)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.wait_for(fault_server.disconnected.wait(), 1.0)
    fault_server.push(FINE)
    assert await collect(engine) == "fine"
    await assert_nothing_left(engine, fault_server)


async def test_closing_the_engine_ends_calls_in_flight(fault_server: FaultServer, engines: Any) -> None:
    fault_server.default = hang(fault_server)
    engine = engines(fault_server.url, first_byte_timeout_s=30.0)
    call = asyncio.create_task(collect(engine))
    await asyncio.wait_for(fault_server.arrived.wait(), WAIT)
    await engine.aclose()
    with pytest.raises(EngineUnavailable, match="closed"):
        await asyncio.wait_for(call, WAIT)
    await fault_server.wait_until(lambda: not fault_server.open_connections, WAIT)
    assert client_tasks(fault_server) == []
