"""OpenAIEngine's retry decisions on an in-memory transport (httpx.MockTransport): fast, no server, unit selection.

Which answers are retried is decision code: a 4xx other than 408/429 must fail at once with the server's status
and message (retrying it only repeats the same rejection, and costs the whole backoff), while 408, 429, 5xx and
connection errors are retried and, when every retry failed, end in their typed error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from branchwise.engine import GenerationRequest
from branchwise.engine.openai_engine import OpenAIEngine
from branchwise.errors import ConfigError, EngineRequestError, EngineStreamBroken, EngineUnavailable, RateLimited

pytestmark = pytest.mark.timeout(30)

REQUEST = GenerationRequest(prompt="p", max_tokens=8)


def sse_body(*words: str) -> bytes:
    events = [
        {"choices": [{"index": 0, "text": w, "token_ids": [k], "finish_reason": None}]} for k, w in enumerate(words)
    ]
    events[-1]["choices"][0]["finish_reason"] = "stop"
    events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(words)}})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def ok(*words: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse_body(*words or ("fine",)))


def status(code: int, message: str = "nope", **headers: str) -> httpx.Response:
    body = {"error": {"message": message, "code": code}}
    return httpx.Response(code, headers={"content-type": "application/json", **headers}, json=body)


Answer = httpx.Response | Exception


def scripted(*answers: Answer) -> tuple[OpenAIEngine, list[httpx.Request]]:
    """An engine whose transport answers each request with the next of ``answers`` (the last one repeats)."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        answer = answers[min(len(seen), len(answers) - 1)]
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    engine = OpenAIEngine(
        "m",
        "http://server.test/v1",
        api_key_env=None,
        transport=httpx.MockTransport(handle),
        backoff_base_s=0.0,
        max_retries=3,
    )
    return engine, seen


async def stream_text(engine: OpenAIEngine) -> str:
    return "".join([d.text async for d in engine.stream(REQUEST)])


async def generate_text(engine: OpenAIEngine) -> str:
    return (await engine.generate(REQUEST)).text


CALLS: list[Callable[[OpenAIEngine], Any]] = [stream_text, generate_text]


@pytest.mark.parametrize("call", CALLS, ids=["stream", "generate"])
@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 413, 422])
async def test_a_4xx_is_final_and_never_retried(code: int, call: Callable[[OpenAIEngine], Any]) -> None:
    engine, seen = scripted(status(code, "This model's maximum context length is 2048 tokens"), ok())
    with pytest.raises(EngineRequestError, match="maximum context length") as info:
        await call(engine)
    assert info.value.status_code == code
    assert len(seen) == 1
    await engine.aclose()


@pytest.mark.parametrize("call", CALLS, ids=["stream", "generate"])
@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504])
async def test_408_429_and_5xx_are_retried(code: int, call: Callable[[OpenAIEngine], Any]) -> None:
    engine, seen = scripted(status(code), ok("after", " retry"))
    assert await call(engine) == "after retry"
    assert len(seen) == 2
    await engine.aclose()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (status(429, "slow down", **{"retry-after": "0"}), RateLimited),
        (status(503, "overloaded"), EngineUnavailable),
        (status(500, "internal"), EngineRequestError),
        (httpx.ConnectError("refused"), EngineUnavailable),
    ],
)
async def test_retries_exhausted_end_in_the_typed_error(answer: Answer, expected: type[Exception]) -> None:
    engine, seen = scripted(answer)
    with pytest.raises(expected):
        await stream_text(engine)
    assert len(seen) == 4  # the first attempt and three retries
    await engine.aclose()


async def test_an_error_event_in_a_200_answer_is_not_retried() -> None:
    body = b'data: {"error": {"message": "Internal server error", "code": 500}}\n\n'
    engine, seen = scripted(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body), ok())
    with pytest.raises(EngineRequestError, match="Internal server error") as info:
        await stream_text(engine)
    assert info.value.status_code == 500 and len(seen) == 1
    await engine.aclose()


async def test_a_stream_cut_short_is_retried_before_output_and_broken_after() -> None:
    role_only = b'data: {"choices": [{"index": 0, "text": "", "finish_reason": null}]}\n\n'
    cut = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=role_only)
    engine, seen = scripted(cut, ok("whole"))
    assert await stream_text(engine) == "whole" and len(seen) == 2
    await engine.aclose()
    partial = b'data: {"choices": [{"index": 0, "text": "half", "finish_reason": null}]}\n\n'
    cut = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=partial)
    engine, seen = scripted(cut, ok("whole"))
    with pytest.raises(EngineStreamBroken):
        await stream_text(engine)
    assert len(seen) == 1
    assert await generate_text(engine) == "whole"  # generate hands nothing out early: it retries
    await engine.aclose()


def test_per_attempt_timeouts_are_validated() -> None:
    for name in ("first_byte_timeout_s", "idle_timeout_s", "connect_timeout_s"):
        with pytest.raises(ConfigError, match=name):
            OpenAIEngine("m", api_key_env=None, **{name: 0})
