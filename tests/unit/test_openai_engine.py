"""OpenAIEngine against a real HTTP/1.1 server whose answers are scripted request by request (tests/fault_server.py).

The server (asyncio.start_server on 127.0.0.1) records every request it gets and answers with the next scripted
behaviour: a JSON reply, an SSE stream, an error status, a hang, a dropped connection, malformed output.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
import pytest_asyncio
from fault_server import (
    Behaviour,
    FaultServer,
    Received,
    chat_event,
    completion_json,
    drop,
    error,
    gated,
    hang,
    reply,
    sse,
    stream_text,
    text_event,
    usage_event,
)

from branchwise.engine import CallUsage, GenerationRequest, StructuredOutput, create_engine
from branchwise.engine.base import assemble
from branchwise.engine.openai_engine import OpenAIEngine
from branchwise.engine.openai_engine import retry_after as _retry_after
from branchwise.engine.types import Delta
from branchwise.errors import (
    ConfigError,
    EngineRequestError,
    EngineStreamBroken,
    EngineTimeout,
    EngineUnavailable,
    RateLimited,
    RequestValidationError,
    UnknownNameError,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(30)]

WAIT = 5.0  # upper bound on waiting for an event that should happen at once


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture
def server(fault_server: FaultServer) -> FaultServer:
    return fault_server


@pytest.fixture
def server_b(fault_server_b: FaultServer) -> FaultServer:
    return fault_server_b


@pytest_asyncio.fixture
async def engines() -> AsyncIterator[Callable[..., OpenAIEngine]]:
    made: list[OpenAIEngine] = []

    def make(base_url: str | Sequence[str], **kw: Any) -> OpenAIEngine:
        kw.setdefault("backoff_base_s", 0.01)
        kw.setdefault("api_key_env", None)
        engine = OpenAIEngine("m", base_url, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.aclose()


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def collect(engine: OpenAIEngine, req: GenerationRequest, into: list[Delta] | None = None) -> list[Delta]:
    got = [] if into is None else into
    async for d in engine.stream(req):
        got.append(d)
    return got


# -- request bodies and response mapping ------------------------------------------------------------------------
async def test_completion_request_fields_and_parsed_result(server: FaultServer, engines: Any) -> None:
    lp0 = {
        "tokens": ["Hello", " world"],
        "token_logprobs": [-0.1, -0.7],
        "top_logprobs": [{"Hello": -0.1, "Hi": -2.5, "Hey": -1.2}, {" world": -0.7, " there": -0.9}],
        "text_offset": [0, 5],
    }
    body = {
        "choices": [
            {"index": 1, "text": "Bye now", "token_ids": [7, 8], "finish_reason": "length", "logprobs": None},
            {"index": 0, "text": "Hello world", "token_ids": [5, 6], "finish_reason": "stop", "logprobs": lp0},
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4},
    }
    server.push(reply(body))
    engine = engines(server.url, api_key="sk-secret")
    req = GenerationRequest(
        prompt="Say hi",
        n=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        max_tokens=12,
        min_tokens=2,
        stop=["\n\n"],
        seed=3,
        logprobs=2,
        ignore_eos=True,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        structured=StructuredOutput(regex="[A-Za-z ]+"),
    )
    gen = await engine.generate(req)

    (sent,) = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/completions")
    assert sent.headers["authorization"] == "Bearer sk-secret"
    assert sent.headers["content-type"] == "application/json"
    expected = {
        "model": "m",
        "prompt": "Say hi",
        "n": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "max_tokens": 12,
        "min_tokens": 2,
        "stop": ["\n\n"],
        "seed": 3,
        "logprobs": 2,
        "ignore_eos": True,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "structured_outputs": {"regex": "[A-Za-z ]+"},
        "return_token_ids": True,
        # generate streams too, so a hung or stalled server is noticed by the per-attempt timeouts
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert sent.body == expected  # nothing missing, nothing extra

    first, second = gen.completions
    assert (first.text, first.token_ids, first.finish_reason) == ("Hello world", (5, 6), "stop")
    assert (second.text, second.token_ids, second.finish_reason) == ("Bye now", (7, 8), "length")
    assert first.logprobs is not None
    assert [(lp.token_id, lp.token, lp.logprob) for lp in first.logprobs] == [(5, "Hello", -0.1), (6, " world", -0.7)]
    assert first.logprobs[0].top == (("Hello", -0.1), ("Hey", -1.2))  # k=2 most likely, most likely first
    assert second.logprobs == ()  # asked for, but the server sent none for this sample
    assert gen.prompt_tokens == gen.usage.prompt_tokens == 11
    assert gen.usage.completion_tokens == 4


async def test_chat_stream_fields_logprobs_and_reassembly(server: FaultServer, engines: Any) -> None:
    def lp(tok: str, value: float) -> dict:
        return {
            "content": [
                {
                    "token": tok,
                    "logprob": value,
                    "top_logprobs": [{"token": tok, "logprob": value}, {"token": "z", "logprob": -5.0}],
                }
            ]
        }

    events = [
        {
            "id": "c",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            "prompt_token_ids": [1, 2, 3],
        },
        chat_event(0, '{"a"', ids=[10], logprobs=lp('{"a"', -0.2)),
        chat_event(0, ": 1", ids=[11], logprobs=lp(": 1", -0.3)),
        chat_event(0, "}", ids=[12], finish="stop", logprobs=lp("}", -0.01)),
        usage_event(3, 3),
    ]
    server.push(sse(events))
    engine = engines(server.url)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = GenerationRequest(
        messages=[{"role": "system", "content": "json"}, {"role": "user", "content": "go"}],
        temperature=0.0,
        max_tokens=20,
        logprobs=1,
        structured=StructuredOutput(json_schema=schema),
    )
    usages: list[CallUsage] = []
    engine.add_usage_hook(lambda r, u: usages.append(u))
    deltas = await collect(engine, req)

    sent = server.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.headers["content-type"] == "application/json"
    assert "authorization" not in sent.headers
    assert sent.body["messages"] == [{"role": "system", "content": "json"}, {"role": "user", "content": "go"}]
    assert sent.body["max_completion_tokens"] == 20
    assert (sent.body["logprobs"], sent.body["top_logprobs"]) == (True, 1)
    assert sent.body["structured_outputs"] == {"json": schema}
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["return_token_ids"] is True
    assert "continue_final_message" not in sent.body

    assert len(deltas) == 3  # the role announcement carries no token and is not passed on
    (c,) = assemble(1, deltas)
    assert json.loads(c.text) == {"a": 1}
    assert c.token_ids == (10, 11, 12) and c.finish_reason == "stop"
    assert c.logprobs is not None
    assert [(lp.token_id, lp.logprob, lp.top) for lp in c.logprobs] == [
        (10, -0.2, (('{"a"', -0.2),)),
        (11, -0.3, ((": 1", -0.3),)),
        (12, -0.01, (("}", -0.01),)),
    ]
    (usage,) = usages
    assert (usage.prompt_tokens, usage.completion_tokens, usage.aborted, usage.error) == (3, 3, False, None)


async def test_stream_n2_interleaved_indices(server: FaultServer, engines: Any) -> None:
    words = {0: ["A", " b", " c"], 1: ["X", " y"]}
    events = [
        text_event(0, "A", ids=[1], prompt_token_ids=[9, 9, 9, 9]),
        text_event(1, "X", ids=[2], prompt_token_ids=[9, 9, 9, 9]),
        text_event(0, " b", ids=[3]),
        text_event(1, " y", ids=[4], finish="length"),
        text_event(0, " c", ids=[5], finish="stop"),
        usage_event(4, 5),
    ]
    server.push(sse(events))
    engine = engines(server.url)
    usages: list[CallUsage] = []
    engine.add_usage_hook(lambda r, u: usages.append(u))
    deltas = await collect(engine, GenerationRequest(prompt="p", n=2, max_tokens=3))
    assert [d.index for d in deltas] == [0, 1, 0, 1, 0]
    c0, c1 = assemble(2, deltas)
    assert (c0.text, c0.token_ids, c0.finish_reason) == ("".join(words[0]), (1, 3, 5), "stop")
    assert (c1.text, c1.token_ids, c1.finish_reason) == ("".join(words[1]), (2, 4), "length")
    assert usages[0].prompt_tokens == 4 and usages[0].completion_tokens == 5
    assert usages[0].ttft_s is not None


async def test_sse_split_across_reads_and_crlf(server: FaultServer, engines: Any) -> None:
    # One event cut in the middle of its JSON, CRLF line ends, a comment line, and two events in one write.
    e1 = json.dumps(text_event(0, "one", ids=[1]))
    e2 = json.dumps(text_event(0, " two", ids=[2]))
    e3 = json.dumps(text_event(0, " three", ids=[3], finish="stop"))
    raw = [": keep-alive\r\n\r\n", f"data: {e1[:10]}", f"{e1[10:]}\r\n\r\n", f"data: {e2}\n\ndata: {e3}\n\n"]
    server.push(sse(raw))
    engine = engines(server.url)
    (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
    assert (c.text, c.token_ids) == ("one two three", (1, 2, 3))


async def test_generate_reuses_connection(server: FaultServer, engines: Any) -> None:
    server.push(sse(stream_text(["a", " b"])), sse(stream_text(["c"])), reply(completion_json(["d e"])))
    engine = engines(server.url)
    await collect(engine, GenerationRequest(prompt="p"))
    await collect(engine, GenerationRequest(prompt="p"))
    gen = await engine.generate(GenerationRequest(prompt="p"))
    assert gen.text == "d e" and gen.completions[0].token_ids == (100, 101)
    assert {r.connection for r in server.requests} == {1}  # keep-alive after a fully read stream


async def test_openai_style_body_and_placeholder_ids(server: FaultServer, engines: Any) -> None:
    events = [
        chat_event(0, "Hel"),
        chat_event(0, "lo"),
        chat_event(0, "!", finish="stop"),
        usage_event(6, 5),  # the server's chunks held more tokens than there were chunks
    ]
    server.push(sse(events))
    engine = engines(server.url, structured_style="openai")
    assert engine.capabilities.structured_output is False
    schema = {"type": "object"}
    req = GenerationRequest(
        messages=[{"role": "user", "content": "hi"}], structured=StructuredOutput(json_schema=schema)
    )
    usages: list[CallUsage] = []
    engine.add_usage_hook(lambda r, u: usages.append(u))
    deltas = await collect(engine, req)
    body = server.requests[0].body
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    for vllm_only in ("return_token_ids", "top_k", "min_p", "repetition_penalty", "structured_outputs", "ignore_eos"):
        assert vllm_only not in body
    (c,) = assemble(1, deltas)
    assert c.text == "Hello!"
    assert c.token_ids == (-1,) * 5  # placeholders, corrected to the usage count on the final delta
    assert deltas[-1].finish_reason == "stop"
    assert usages[0].completion_tokens == 5 and usages[0].prompt_tokens == 6

    with pytest.raises(RequestValidationError, match="structured"):
        await engine.generate(GenerationRequest(prompt="p", structured=StructuredOutput(choices=["a", "b"])))
    assert len(server.requests) == 1  # rejected before sending


async def test_placeholder_ids_from_logprobs_and_non_streaming_usage(server: FaultServer, engines: Any) -> None:
    lp = {"tokens": ["a", "b", "c"], "token_logprobs": [-1.0, -2.0, None], "top_logprobs": None}
    server.push(
        reply(
            {
                "choices": [{"index": 0, "text": "abc", "logprobs": lp, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3},
            }
        ),
        reply(
            {
                "choices": [
                    {"index": 0, "text": "x y", "finish_reason": "stop"},
                    {"index": 1, "text": "z", "finish_reason": "stop"},
                ],
                "usage": {"prompt_tokens": 2, "completion_tokens": 5},
            }
        ),
    )
    engine = engines(server.url, structured_style="openai")
    gen = await engine.generate(GenerationRequest(prompt="p", logprobs=0))
    c = gen.completions[0]
    assert c.token_ids == (-1, -1, -1)
    assert c.logprobs is not None and [lp.logprob for lp in c.logprobs] == [-1.0, -2.0, float("-inf")]
    assert all(lp.top == () for lp in c.logprobs)
    gen2 = await engine.generate(GenerationRequest(prompt="p", n=2))
    assert gen2.usage.completion_tokens == 5  # no per-sample counts: the usage total is spread over samples
    assert sorted(c.num_tokens for c in gen2.completions) == [2, 3]


async def test_continue_final_message_body(server: FaultServer, engines: Any) -> None:
    server.push(
        reply(
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " 4."},
                        "token_ids": [1, 2],
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 2},
            }
        )
    )
    engine = engines(server.url)
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}]
    gen = await engine.generate(GenerationRequest(messages=msgs, continue_final_message=True))
    body = server.requests[0].body
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert gen.text == " 4." and gen.completions[0].token_ids == (1, 2)
    openai = engines(server.url, structured_style="openai")
    with pytest.raises(RequestValidationError, match="continue_final_message"):
        await openai.generate(GenerationRequest(messages=msgs, continue_final_message=True))


async def test_server_ignoring_stream_still_streams(server: FaultServer, engines: Any) -> None:
    server.push(reply(completion_json(["whole answer here"])))
    engine = engines(server.url)
    deltas = await collect(engine, GenerationRequest(prompt="p"))
    assert [(d.text, d.token_ids, d.finish_reason) for d in deltas] == [
        ("whole answer here", (100, 101, 102), "length")
    ]


# -- retries and errors -----------------------------------------------------------------------------------------
async def test_retry_after_is_honoured(server: FaultServer, engines: Any) -> None:
    server.push(error(429, "slow down", retry_after="0.2"), sse(stream_text(["ok"])))
    engine = engines(server.url, backoff_base_s=0.0)
    start = time.monotonic()
    (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
    assert c.text == "ok"
    assert len(server.requests) == 2
    assert server.requests[1].arrived - server.requests[0].arrived >= 0.2
    assert time.monotonic() - start < 2.0


def test_retry_after_parsing() -> None:
    assert _retry_after("1.5") == 1.5
    assert _retry_after("-3") == 0.0
    assert _retry_after("soon") is None and _retry_after(None) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = _retry_after(future)
    assert parsed is not None and 28 <= parsed <= 31


async def test_retry_after_is_capped_by_max_backoff(server: FaultServer, engines: Any) -> None:
    server.push(error(503, retry_after="30"), reply(completion_json(["fine"])))
    engine = engines(server.url, max_backoff_s=0.05)
    start = time.monotonic()
    assert (await engine.generate(GenerationRequest(prompt="p"))).text == "fine"
    assert time.monotonic() - start < 2.0


async def test_retry_that_cannot_fit_the_deadline_fails_at_once(server: FaultServer, engines: Any) -> None:
    server.push(error(429, "busy", retry_after="5"))
    engine = engines(server.url, request_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(RateLimited, match="no time left"):
        await engine.generate(GenerationRequest(prompt="p"))
    assert time.monotonic() - start < 0.5
    assert len(server.requests) == 1


async def test_5xx_retried_then_success(server: FaultServer, engines: Any) -> None:
    server.push(error(500), error(502), error(503), sse(stream_text(["fine"])))
    engine = engines(server.url, max_retries=3)
    (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
    assert c.text == "fine"
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("status", "expected"),
    [(429, RateLimited), (503, EngineUnavailable), (500, EngineRequestError)],
)
async def test_retries_exhausted(server: FaultServer, engines: Any, status: int, expected: type[Exception]) -> None:
    server.default = error(status, "still failing")
    engine = engines(server.url, max_retries=2)
    usages: list[CallUsage] = []
    engine.add_usage_hook(lambda r, u: usages.append(u))
    with pytest.raises(expected, match="still failing") as info:
        await engine.generate(GenerationRequest(prompt="p"))
    assert len(server.requests) == 3  # the first attempt and two retries
    if expected is EngineRequestError:
        assert info.value.status_code == 500  # type: ignore[attr-defined]
    assert usages[0].error == expected.__name__


async def test_4xx_is_typed_and_not_retried(server: FaultServer, engines: Any) -> None:
    server.push(error(400, "This model's maximum context length is 2048 tokens"))
    engine = engines(server.url)
    with pytest.raises(EngineRequestError, match="maximum context length") as info:
        await collect(engine, GenerationRequest(prompt="p"))
    assert info.value.status_code == 400
    assert len(server.requests) == 1
    server.push(reply(None, status=404, raw=b"no such route"))
    with pytest.raises(EngineRequestError, match="no such route") as info:
        await engine.generate(GenerationRequest(prompt="p"))
    assert info.value.status_code == 404


async def test_timeout_raises_quickly_and_closes_the_connection(server: FaultServer, engines: Any) -> None:
    server.push(hang(server))
    engine = engines(server.url, request_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(EngineTimeout):
        await collect(engine, GenerationRequest(prompt="p"))
    assert 0.25 <= time.monotonic() - start < 2.0
    await asyncio.wait_for(server.disconnected.wait(), WAIT)


async def test_timeout_covers_a_stalled_stream(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1])], then="wait", server=server))
    engine = engines(server.url, request_timeout_s=0.3)
    got: list[Delta] = []
    with pytest.raises(EngineTimeout):
        await collect(engine, GenerationRequest(prompt="p"), got)
    assert [d.text for d in got] == ["a"]
    await asyncio.wait_for(server.disconnected.wait(), WAIT)


async def test_timeout_counts_a_slow_consumer(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1])], then="wait", server=server))
    engine = engines(server.url, request_timeout_s=0.3)
    got: list[str] = []

    async def slow_consumer() -> None:
        async for d in engine.stream(GenerationRequest(prompt="p")):
            got.append(d.text)
            await asyncio.sleep(0.4)  # the consumer's own work, longer than the whole call may take

    start = time.monotonic()
    with pytest.raises(EngineTimeout):
        await slow_consumer()
    assert time.monotonic() - start < 1.0  # raised on the next read, without waiting for more data
    assert got == ["a"]
    await asyncio.wait_for(server.disconnected.wait(), WAIT)


async def test_connection_dropped_before_tokens_is_retried(server: FaultServer, engines: Any) -> None:
    sse_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    json_head = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"cho'
    server.push(drop(sse_head), sse(stream_text(["after", " retry"])), drop(json_head), reply(completion_json(["ok"])))
    engine = engines(server.url)
    (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
    assert c.text == "after retry"
    assert (await engine.generate(GenerationRequest(prompt="p"))).text == "ok"
    assert len(server.requests) == 4


async def test_connection_dropped_after_tokens_raises(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1]), text_event(0, " b", ids=[2])], then="drop"))
    server.default = sse(stream_text(["never"]))
    engine = engines(server.url)
    got: list[Delta] = []
    with pytest.raises(EngineStreamBroken, match="not retried") as info:
        await collect(engine, GenerationRequest(prompt="p"), got)
    assert not isinstance(info.value, EngineUnavailable)  # the server is up: an eval must not stop for this
    assert info.value.url == server.url
    assert [d.text for d in got] == ["a", " b"]
    assert len(server.requests) == 1


async def test_generate_retries_a_stream_dropped_midway(server: FaultServer, engines: Any) -> None:
    """generate hands nothing out before the end, so a broken stream is simply sent again."""
    server.push(sse([text_event(0, "a", ids=[1])], then="drop"), sse(stream_text(["whole", " answer"])))
    engine = engines(server.url)
    generation = await engine.generate(GenerationRequest(prompt="p"))
    assert generation.text == "whole answer" and generation.usage.completion_tokens == 2
    assert len(server.requests) == 2


async def test_malformed_output_is_a_request_error(server: FaultServer, engines: Any) -> None:
    server.push(
        reply(None, raw=b'{"choices": [ {"index": 0, "te'),
        sse(["data: {not json}\n\n"]),
        sse([text_event(5, "x", ids=[1])]),  # a sample index the request does not have
        reply({"object": "list"}),
    )
    engine = engines(server.url)
    with pytest.raises(EngineRequestError, match="malformed"):
        await engine.generate(GenerationRequest(prompt="p"))
    with pytest.raises(EngineRequestError, match="malformed"):
        await collect(engine, GenerationRequest(prompt="p"))
    with pytest.raises(EngineRequestError, match="index 5"):
        await collect(engine, GenerationRequest(prompt="p"))
    with pytest.raises(EngineRequestError, match="no choices"):
        await engine.generate(GenerationRequest(prompt="p"))
    assert len(server.requests) == 4  # none of them retried


async def test_error_event_mid_stream(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1]), {"error": {"message": "Internal server error", "code": 500}}]))
    engine = engines(server.url)
    with pytest.raises(EngineRequestError, match="Internal server error") as info:
        await collect(engine, GenerationRequest(prompt="p"))
    assert info.value.status_code == 500


async def test_unreachable_raises_engine_unavailable(engines: Any) -> None:
    engine = engines(dead_url(), max_retries=1)
    with pytest.raises(EngineUnavailable, match="cannot reach"):
        await engine.generate(GenerationRequest(prompt="p"))
    with pytest.raises(EngineUnavailable):
        await engine.start()


# -- balancing, limits ------------------------------------------------------------------------------------------
async def test_least_outstanding_balancing(server: FaultServer, server_b: FaultServer, engines: Any) -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    server.push(gated(release, sse(stream_text(["slow"])), started))
    server_b.default = sse(stream_text(["fast"]))
    server.default = sse(stream_text(["a"]))
    engine = engines([server.url, server_b.url])

    slow = asyncio.create_task(collect(engine, GenerationRequest(prompt="p")))
    await asyncio.wait_for(started.wait(), WAIT)
    assert engine.outstanding == {server.url: 1, server_b.url: 0}
    # While A holds one request, the next two go to B (fewest outstanding), one after the other.
    for _ in range(2):
        (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
        assert c.text == "fast"
    release.set()
    (c,) = assemble(1, await slow)
    assert c.text == "slow"
    assert engine.outstanding == {server.url: 0, server_b.url: 0}
    # Idle again: ties are broken in turn.
    for _ in range(4):
        await collect(engine, GenerationRequest(prompt="p"))
    assert (len(server.requests), len(server_b.requests)) == (3, 4)


async def test_dead_url_fails_over_without_backoff(server: FaultServer, engines: Any) -> None:
    server.default = sse(stream_text(["alive"]))
    engine = engines([dead_url(), server.url], backoff_base_s=5.0, max_backoff_s=5.0)
    start = time.monotonic()
    for _ in range(3):
        (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
        assert c.text == "alive"
    assert time.monotonic() - start < 2.0  # the failover did not wait out a backoff
    assert len(server.requests) == 3


async def test_failing_url_request_moves_to_other(server: FaultServer, server_b: FaultServer, engines: Any) -> None:
    server.push(error(503, "overloaded"))
    server_b.push(sse(stream_text(["from b"])))
    engine = engines([server.url, server_b.url], backoff_base_s=5.0)
    (c,) = assemble(1, await collect(engine, GenerationRequest(prompt="p")))
    assert c.text == "from b"
    assert (len(server.requests), len(server_b.requests)) == (1, 1)


async def test_rate_limit_spaces_requests(server: FaultServer, engines: Any) -> None:
    server.default = reply(completion_json(["x"]))
    engine = engines(server.url, rate_limit=1, rate_period_s=0.2)
    start = time.monotonic()
    await asyncio.gather(*(engine.generate(GenerationRequest(prompt="p")) for _ in range(3)))
    assert time.monotonic() - start >= 0.4  # the third request waited two periods
    times = sorted(r.arrived for r in server.requests)
    assert len(times) == 3
    # Measured at the server, so connection setup jitter is allowed for.
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(times))


async def test_max_concurrency_queues_requests(server: FaultServer, engines: Any) -> None:
    release = asyncio.Event()
    started = asyncio.Event()
    finished_at: list[float] = []

    def stamp(inner: Behaviour) -> Behaviour:
        async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
            keep = await inner(req, reader, writer)
            finished_at.append(time.monotonic())
            return keep

        return behave

    server.push(stamp(gated(release, reply(completion_json(["first"])), started)))
    server.default = reply(completion_json(["second"]))
    engine = engines(server.url, max_concurrency=1)
    first = asyncio.create_task(engine.generate(GenerationRequest(prompt="p")))
    await asyncio.wait_for(started.wait(), WAIT)
    second = asyncio.create_task(engine.generate(GenerationRequest(prompt="p")))
    release.set()
    assert [(await first).text, (await second).text] == ["first", "second"]
    assert server.requests[1].arrived >= finished_at[0]  # the second waited for the first's slot


# -- cancellation, lifecycle, configuration ---------------------------------------------------------------------
async def test_cancelling_consumer_closes_the_connection(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1]), text_event(0, " b", ids=[2])], then="wait", server=server))
    engine = engines(server.url)
    usages: list[CallUsage] = []
    engine.add_usage_hook(lambda r, u: usages.append(u))
    got_two = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in engine.stream(GenerationRequest(prompt="p", max_tokens=100)):
            count += 1
            if count == 2:
                got_two.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_two.wait(), WAIT)
    assert not server.disconnected.is_set()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.disconnected.wait(), WAIT)
    assert engine.outstanding == {server.url: 0}
    (usage,) = usages
    assert usage.aborted and usage.completion_tokens == 2


async def test_closing_stream_early_closes_the_connection(server: FaultServer, engines: Any) -> None:
    server.push(sse([text_event(0, "a", ids=[1]), text_event(0, " b", ids=[2])], then="wait", server=server))
    engine = engines(server.url)
    async with contextlib.aclosing(engine.stream(GenerationRequest(prompt="p"))) as stream:
        async for _ in stream:
            break
    await asyncio.wait_for(server.disconnected.wait(), WAIT)


async def test_start_learns_context_length(server: FaultServer, engines: Any) -> None:
    models = {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 2048}]}
    server.push(reply(models), reply({"data": [{"id": "other"}]}))
    engine = engines(server.url)
    await engine.start()
    assert server.requests[0].method == "GET" and server.requests[0].path == "/v1/models"
    assert engine.capabilities.max_model_len == 2048
    with pytest.raises(UnknownNameError, match="other"):
        await engine.start()


async def test_closed_engine_raises(server: FaultServer, engines: Any) -> None:
    engine = engines(server.url)
    await engine.aclose()
    await engine.aclose()  # idempotent
    with pytest.raises(EngineUnavailable, match="closed"):
        await engine.generate(GenerationRequest(prompt="p"))
    assert server.requests == []


async def test_api_key_from_env_is_sent_but_never_logged(
    server: FaultServer, engines: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BW_TEST_KEY", "sk-very-secret")
    server.push(error(500, "flaky"), reply(completion_json(["ok"])))
    engine = engines(server.url, api_key_env="BW_TEST_KEY")
    with caplog.at_level(logging.DEBUG):
        assert (await engine.generate(GenerationRequest(prompt="p"))).text == "ok"
    assert all(r.headers["authorization"] == "Bearer sk-very-secret" for r in server.requests)
    assert "retrying" in caplog.text
    assert "sk-very-secret" not in caplog.text
    assert "sk-very-secret" not in repr(engine)


def test_capabilities_and_registry() -> None:
    engine = create_engine("openai", model="m", base_url=["http://a:1/v1/", "http://b:2/v1"])
    assert isinstance(engine, OpenAIEngine)
    assert engine.base_urls == ("http://a:1/v1", "http://b:2/v1")
    caps = engine.capabilities
    assert caps.structured_output and caps.logprobs and caps.per_request_seed and not caps.prefix_caching


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"base_url": []}, "base_url"),
        ({"base_url": "ftp://x/v1"}, "base_url"),
        ({"base_url": ["http://a/v1", "http://a/v1/"]}, "base_url"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"connect_timeout_s": -1}, "connect_timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"backoff_base_s": -0.1}, "backoff_base_s"),
        ({"max_backoff_s": float("inf")}, "max_backoff_s"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_period_s": 0}, "rate_period_s"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"structured_style": "xml"}, "structured_style"),
        ({"headers": {"X": 1}}, "headers"),
        ({"model": ""}, "model"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    kwargs = {"model": "m", **kwargs}
    with pytest.raises(ConfigError, match=argument):
        OpenAIEngine(**kwargs)
