"""Fuzzing how OpenAIEngine parses server output (hypothesis; profiles in tests/_hypothesis_profiles.py).

Properties: whatever bytes a server sends, in whatever pieces, the SSE mapper, the whole-body parser and the
engine itself end only in documented outcomes (deltas and completions of the documented types, or an
`EngineError` subclass), in bounded time per input; and a valid stream maps to the same deltas however the
network splits it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from branchwise.engine import GenerationRequest, _http_parse
from branchwise.engine._http_parse import MAX_EVENT_BYTES, EventMapper, ResponseShape, parse_whole
from branchwise.engine.openai_engine import OpenAIEngine
from branchwise.engine.types import Completion, Delta, TokenLogprob
from branchwise.errors import (
    EngineError,
    EngineRequestError,
    EngineStreamBroken,
    EngineTimeout,
    EngineUnavailable,
    RateLimited,
)

pytestmark = pytest.mark.timeout(120)

PER_INPUT_S = 1.0  # generous bound on the time one input may take (shared machines); typical: well under 10 ms
FINISH = {None, "stop", "length", "abort", "error"}
ENGINE_ERRORS = (EngineRequestError, EngineUnavailable, EngineTimeout, RateLimited, EngineStreamBroken)


class Meter:
    prompt_tokens = 0


# -- strategies ---------------------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(10**400),  # float() of it overflows
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
counts = st.one_of(st.integers(min_value=-3, max_value=50), json_values)
token_ids = st.one_of(st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4), json_values)
text_logprobs = st.fixed_dictionaries(
    {},
    optional={
        "tokens": st.one_of(st.lists(st.text(max_size=4), max_size=3), json_values),
        "token_logprobs": st.one_of(st.lists(st.one_of(st.floats(), st.none()), max_size=3), json_values),
        "top_logprobs": st.one_of(
            st.lists(st.dictionaries(st.text(max_size=3), st.one_of(st.floats(), st.none()), max_size=3), max_size=3),
            json_values,
        ),
    },
)
chat_logprobs = st.fixed_dictionaries(
    {},
    optional={
        "content": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"token": st.text(max_size=3)},
                    optional={
                        "logprob": st.one_of(st.floats(), st.none(), json_values),
                        "top_logprobs": st.one_of(
                            st.lists(st.fixed_dictionaries({"token": json_values, "logprob": json_values}), max_size=2),
                            json_values,
                        ),
                    },
                ),
                max_size=3,
            ),
            json_values,
        )
    },
)
choices = st.fixed_dictionaries(
    {"index": st.one_of(st.integers(min_value=-1, max_value=3), st.booleans(), json_values)},
    optional={
        "text": st.one_of(st.text(max_size=6), json_values),
        "delta": st.one_of(
            st.fixed_dictionaries({}, optional={"content": st.one_of(st.text(max_size=6), json_values)}), json_values
        ),
        "message": st.one_of(
            st.fixed_dictionaries({}, optional={"content": st.one_of(st.text(max_size=6), json_values)}), json_values
        ),
        "token_ids": token_ids,
        "finish_reason": st.one_of(st.sampled_from(["stop", "length", "abort", "weird", None]), json_values),
        "stop_reason": json_values,
        "logprobs": st.one_of(text_logprobs, chat_logprobs, json_values),
        "prompt_token_ids": token_ids,
    },
)
events = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.one_of(st.lists(choices, max_size=3), json_values),
        "usage": st.one_of(
            st.fixed_dictionaries({}, optional={"prompt_tokens": counts, "completion_tokens": counts}), json_values
        ),
        "error": json_values,
        "prompt_token_ids": token_ids,
    },
)
shapes = st.builds(
    ResponseShape,
    n=st.integers(min_value=1, max_value=3),
    chat=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(min_value=0, max_value=3)),
)


def _sse(payloads: list[bytes], *, done: bool, crlf: bool) -> bytes:
    end = b"\r\n" if crlf else b"\n"
    body = b"".join(b"data: " + p + end + end for p in payloads)
    return body + (b"data: [DONE]" + end + end if done else b"")


sse_bodies = st.builds(
    _sse,
    st.lists(st.one_of(events.map(lambda e: json.dumps(e).encode()), st.binary(max_size=30)), max_size=6),
    done=st.booleans(),
    crlf=st.booleans(),
)
any_body = st.one_of(sse_bodies, st.binary(max_size=300))


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into pieces at arbitrary points, as a network may deliver it."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- checks ---------------------------------------------------------------------------------------------------------
def _check_logprobs(logprobs: Any) -> None:
    assert logprobs is None or isinstance(logprobs, tuple)
    for lp in logprobs or ():
        assert isinstance(lp, TokenLogprob) and isinstance(lp.token_id, int) and isinstance(lp.token, str)
        assert isinstance(lp.logprob, float)
        assert all(isinstance(t, str) and isinstance(v, float) for t, v in lp.top)


def check_delta(d: Any, n: int) -> None:
    assert isinstance(d, Delta)
    assert type(d.index) is int and 0 <= d.index < n
    assert isinstance(d.text, str)
    assert isinstance(d.token_ids, tuple) and all(type(i) is int for i in d.token_ids)
    assert d.finish_reason in FINISH
    assert d.stop_reason is None or type(d.stop_reason) in (str, int)
    _check_logprobs(d.logprobs)


def check_completion(c: Any, n: int) -> None:
    assert isinstance(c, Completion)
    check_delta(Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason), n)
    assert c.finish_reason is not None


def map_stream(pieces: list[bytes], shape: ResponseShape) -> tuple[list[Delta], Meter]:
    meter = Meter()
    mapper = EventMapper(shape, "http://fuzz/v1", meter)
    out: list[Delta] = []
    for piece in pieces:
        out.extend(mapper.feed(piece))
        if mapper.done:
            break
    out.extend(mapper.held())
    return out, meter


# -- properties ---------------------------------------------------------------------------------------------------
@given(data=st.data(), body=any_body, shape=shapes)
@example(data=None, body=b"data: " + b"[" * 100_000 + b"\n\n", shape=ResponseShape(n=1, chat=False, logprobs=None))
@example(
    data=None,
    body=b'data: {"choices": [{"index": 0, "text": "a", "token_ids": "ab"}]}\n\n',
    shape=ResponseShape(n=1, chat=False, logprobs=None),
)
def test_sse_mapping_yields_valid_deltas_or_a_request_error(data: Any, body: bytes, shape: ResponseShape) -> None:
    pieces = data.draw(split(body)) if data is not None else [body]
    started = time.perf_counter()
    try:
        deltas, meter = map_stream(pieces, shape)
    except EngineRequestError:
        pass
    else:
        for d in deltas:
            check_delta(d, shape.n)
        assert type(meter.prompt_tokens) is int and meter.prompt_tokens >= 0
    assert time.perf_counter() - started < PER_INPUT_S


def _outcome(pieces: list[bytes], shape: ResponseShape) -> tuple[list[Delta], int] | str:
    try:
        deltas, meter = map_stream(pieces, shape)
    except EngineRequestError as err:
        return str(err)
    return deltas, meter.prompt_tokens


@given(data=st.data(), body=sse_bodies, shape=shapes)
def test_a_stream_maps_to_the_same_deltas_however_it_is_split(data: Any, body: bytes, shape: ResponseShape) -> None:
    assert _outcome(data.draw(split(body)), shape) == _outcome([body], shape)


@given(body=st.one_of(events.map(lambda e: json.dumps(e).encode()), st.binary(max_size=200)), shape=shapes)
@example(body=b"[" * 100_000, shape=ResponseShape(n=1, chat=False, logprobs=None))
def test_whole_body_parsing_yields_valid_completions_or_a_request_error(body: bytes, shape: ResponseShape) -> None:
    started = time.perf_counter()
    try:
        completions, prompt_tokens = parse_whole(body, "http://fuzz/v1", shape)
    except EngineRequestError:
        pass
    else:
        assert [c.index for c in completions] == list(range(shape.n))
        for c in completions:
            check_completion(c, shape.n)
        assert type(prompt_tokens) is int and prompt_tokens >= 0
    assert time.perf_counter() - started < PER_INPUT_S


def _feed_all(mapper: EventMapper, pieces: Any) -> None:
    for piece in pieces:
        list(mapper.feed(piece))


def test_an_endless_event_is_refused_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http_parse, "MAX_EVENT_BYTES", 1 << 20)
    shape = ResponseShape(n=1, chat=False, logprobs=None)
    mapper = EventMapper(shape, "http://fuzz/v1", Meter())
    started = time.perf_counter()
    with pytest.raises(EngineRequestError, match="line longer than"):
        _feed_all(mapper, [b"x" * 1024] * 2048)  # one line, never ended
    assert time.perf_counter() - started < 2.0  # appended, not re-copied for every piece
    with pytest.raises(EngineRequestError, match="event longer than"):
        _feed_all(EventMapper(shape, "u", Meter()), [b"data: x\n" * 200_000])  # data lines, never a blank one
    assert MAX_EVENT_BYTES >= 1 << 20


# -- the whole engine on arbitrary answers --------------------------------------------------------------------------
streamed_answers = st.tuples(st.just(200), st.just("text/event-stream"), sse_bodies)
whole_answers = st.tuples(st.just(200), st.just("application/json"), events.map(lambda e: json.dumps(e).encode()))
other_answers = st.tuples(
    st.sampled_from([200, 400, 404, 408, 429, 500, 503]),
    st.sampled_from(["text/event-stream", "application/json", "text/html", ""]),
    any_body,
)
answers = st.one_of(streamed_answers, streamed_answers, whole_answers, other_answers)


def _event(choice: dict[str, Any]) -> bytes:
    return f"data: {json.dumps({'choices': [choice]})}\n\ndata: [DONE]\n\n".encode()


# Wrongly typed fields, which must end in a request error, never in deltas of the wrong types or an untyped error.
_BAD_TEXT = _event({"index": 0, "text": 5, "finish_reason": "stop"})
_BAD_IDS = _event({"index": 0, "text": "ab", "token_ids": "ab", "finish_reason": "stop"})
_HUGE_LOGPROB = (
    b"data: "
    + json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "text": "a",
                    "finish_reason": "stop",
                    "logprobs": {"tokens": ["a"], "token_logprobs": [10**400]},
                }
            ]
        }
    ).encode()
    + b"\n\ndata: [DONE]\n\n"
)
_BOOL_PROMPT_IDS = json.dumps({"prompt_token_ids": True, "choices": [{"index": 0, "text": "a"}]}).encode()


def _run_engine(script: list[tuple[int, str, bytes]], request: GenerationRequest, use_stream: bool) -> Any:
    calls = 0

    def handle(req: httpx.Request) -> httpx.Response:
        nonlocal calls
        status, content_type, body = script[min(calls, len(script) - 1)]
        calls += 1
        headers = {"content-type": content_type} if content_type else {}
        return httpx.Response(status, headers={**headers, "retry-after": "0"}, content=body)

    async def go() -> Any:
        engine = OpenAIEngine(
            "m",
            "http://fuzz.test/v1",
            api_key_env=None,
            transport=httpx.MockTransport(handle),
            max_retries=1,
            backoff_base_s=0.0,
            request_timeout_s=5.0,
        )
        try:
            if use_stream:
                return [d async for d in engine.stream(request)]
            return (await engine.generate(request)).completions
        finally:
            await engine.aclose()
            assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # nothing left running

    return asyncio.run(go())


@given(
    script=st.lists(answers, min_size=1, max_size=3),
    n=st.integers(min_value=1, max_value=2),
    chat=st.booleans(),
    logprobs=st.one_of(st.none(), st.integers(min_value=0, max_value=2)),
    use_stream=st.booleans(),
)
@example(script=[(200, "text/event-stream", _BAD_TEXT)], n=1, chat=False, logprobs=None, use_stream=True)
@example(script=[(200, "text/event-stream", _BAD_IDS)], n=1, chat=False, logprobs=None, use_stream=False)
@example(script=[(200, "text/event-stream", _HUGE_LOGPROB)], n=1, chat=False, logprobs=1, use_stream=True)
@example(script=[(200, "application/json", _BOOL_PROMPT_IDS)], n=1, chat=False, logprobs=None, use_stream=False)
def test_the_engine_ends_every_answer_in_output_or_an_engine_error(
    script: list[tuple[int, str, bytes]], n: int, chat: bool, logprobs: int | None, use_stream: bool
) -> None:
    request = (
        GenerationRequest(messages=[{"role": "user", "content": "q"}], n=n, max_tokens=8, logprobs=logprobs)
        if chat
        else GenerationRequest(prompt="q", n=n, max_tokens=8, logprobs=logprobs)
    )
    started = time.perf_counter()
    try:
        out = _run_engine(script, request, use_stream)
    except ENGINE_ERRORS:
        pass
    except EngineError as err:  # pragma: no cover - a new subclass must be added to the documented list
        pytest.fail(f"undocumented engine error {type(err).__name__}: {err}")
    else:
        for item in out:
            (check_delta if use_stream else check_completion)(item, n)
    assert time.perf_counter() - started < PER_INPUT_S * 5


def test_logprob_overflow_and_nan_are_handled() -> None:
    shape = ResponseShape(n=1, chat=False, logprobs=1)
    body = {
        "choices": [
            {
                "index": 0,
                "text": "a",
                "token_ids": [1],
                "finish_reason": "stop",
                "logprobs": {"tokens": ["a"], "token_logprobs": [10**400], "top_logprobs": [{"a": -0.1}]},
            }
        ]
    }
    with pytest.raises(EngineRequestError, match="malformed"):
        parse_whole(json.dumps(body).encode(), "u", shape)
    body["choices"][0]["logprobs"]["token_logprobs"] = [math.nan]  # type: ignore[index]
    (completion,), _ = parse_whole(json.dumps(body).encode(), "u", shape)
    assert completion.logprobs is not None and math.isnan(completion.logprobs[0].logprob)
