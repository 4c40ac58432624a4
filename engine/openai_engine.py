"""`OpenAIEngine`: any OpenAI-compatible HTTP server (vLLM's ``vllm serve``, OpenAI, ...) over httpx.

Requests with a ``prompt`` go to ``/completions``, requests with ``messages`` to ``/chat/completions``; `stream`
reads the server-sent events of a ``stream: true`` request, `generate` makes one non-streaming call. Around
every call the engine adds what a client needs against a shared server:

- several base URLs, each request sent to the one with the fewest outstanding requests (ties in turn), and a
  URL that fails is left alone for a short cool-down while the request moves to another one;
- retries with exponential backoff and full jitter on 408, 429, 5xx and connection errors, honouring
  ``Retry-After``; a streamed request is never retried once a delta has been handed to the consumer;
- a client-side rate limit (asyncio-throttle) and a cap on concurrent requests;
- a hard time limit on the whole call (queueing, retries and streaming included) raising `EngineTimeout`;
- typed errors: 4xx -> `EngineRequestError` (with ``status_code`` and the server's message), 429 after every
  retry -> `RateLimited`, unreachable -> `EngineUnavailable`, unparseable output -> `EngineRequestError`.

Token ids: with ``structured_style="vllm"`` the engine asks vLLM for them (``return_token_ids``). Servers that do
not return ids get placeholder ids of ``-1``, one per generated token, so token counts stay right: the count
comes from the logprobs when requested, otherwise each streamed chunk counts as one token and the total is
corrected against the server's reported usage when the sample ends (the sample's final delta then carries the
missing placeholders).

Cancelling the consumer of `stream` closes the HTTP connection, which makes vLLM abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Literal, NoReturn

import httpx

from ..errors import (
    ConfigError,
    EngineError,
    EngineRequestError,
    EngineTimeout,
    EngineUnavailable,
    RateLimited,
    RequestValidationError,
    UnknownNameError,
)
from .base import CallMeter, Engine
from .types import Capabilities, Completion, Delta, FinishReason, GenerationRequest, TokenLogprob

__all__ = ["OpenAIEngine", "StructuredStyle"]

logger = logging.getLogger(__name__)

StructuredStyle = Literal["vllm", "openai"]

PLACEHOLDER_TOKEN_ID = -1
"""Token id used when the server does not return token ids."""

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
    "tool_calls": "stop",
    "function_call": "stop",
    "content_filter": "stop",
}
_RETRY_STATUS_UNAVAILABLE = frozenset({502, 503, 504})
_MAX_ERROR_BODY = 64 * 1024
_DRAIN_S = 1.0
_decode_json = json.JSONDecoder().decode  # skips json.loads' per-call encoding sniffing on the hot path
_NO_IDS: tuple[int, ...] = ()


class _Retryable(Exception):
    """An attempt failed in a way another attempt may fix; ``error`` is what to raise if none is left."""

    def __init__(self, error: EngineError, *, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.index: int | None = None  # the base URL that failed, filled in by `_Slot`


class _Call:
    """One engine call prepared for sending: endpoint, encoded body and what to expect back."""

    __slots__ = ("attempts", "avoid", "body", "chat", "deadline", "n", "path", "top_k", "want_lp")

    def __init__(self, request: GenerationRequest, path: str, body: bytes, deadline: float) -> None:
        self.path = path
        self.body = body
        self.chat = request.messages is not None
        self.n = request.n
        self.want_lp = request.logprobs is not None
        self.top_k = request.logprobs or 0
        self.deadline = deadline
        self.attempts = 0
        self.avoid: set[int] = set()  # URLs that failed during this call


class _Watchdog:
    """The deadline of a stream's reads, armed once per response.

    `asyncio.timeout_at` around every read would schedule and cancel a timer per chunk (a sixth of the client's
    time per token); this arms one timer and cancels the read in flight only if the deadline passes during it.
    """

    __slots__ = ("_fired", "_handle", "_reading", "_task")

    def __init__(self, deadline: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._reading = False
        self._fired = False
        self._handle = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._fired = True
        if self._reading:
            self._task.cancel()

    async def read(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk, None at the end; raises TimeoutError once the deadline has passed."""
        if self._fired:
            raise TimeoutError
        self._reading = True
        try:
            return await anext(chunks, None)
        except asyncio.CancelledError:
            # Ours only if the watchdog fired and nobody else asked for cancellation meanwhile.
            if self._fired and self._task.uncancel() == 0:
                raise TimeoutError from None
            raise
        finally:
            self._reading = False

    def cancel(self) -> None:
        self._handle.cancel()


class _Samples:
    """Per-sample bookkeeping while a response is mapped to deltas (token counts and finishes)."""

    __slots__ = ("approx", "counted", "finished", "usage_completion")

    def __init__(self, n: int) -> None:
        self.counted = [0] * n
        self.approx = [False] * n  # the count is a guess (one token per chunk), to be corrected from usage
        self.finished = [False] * n
        self.usage_completion: int | None = None

    def shortfall(self) -> list[int]:
        """Placeholder tokens to add to each approximately counted sample so the total matches the usage."""
        n = len(self.counted)
        extra = [0] * n
        guessed = [i for i in range(n) if self.approx[i]]
        if self.usage_completion is None or not guessed:
            return extra
        missing = self.usage_completion - sum(self.counted)
        if missing <= 0:
            return extra
        share, rest = divmod(missing, len(guessed))
        for k, i in enumerate(guessed):
            extra[i] = share + (1 if k < rest else 0)
        return extra


class OpenAIEngine(Engine):
    """An OpenAI-compatible HTTP server as a branchwise engine.

    Args:
        model: the model name the server serves (``--served-model-name`` of ``vllm serve``).
        base_url: the API root (ending in ``/v1``) or several of them; requests are balanced by least outstanding
            requests, ties in round-robin order, and a failing URL's requests move to another one.
        api_key: bearer token; when None it is read from the environment variable ``api_key_env`` (and no
            Authorization header is sent if that is unset too). The key is never logged.
        api_key_env: environment variable holding the key, or None to not look one up.
        request_timeout_s: hard limit on a whole call (waiting for a slot, retries, backoff and streaming),
            after which it raises `EngineTimeout` and closes the connection.
        connect_timeout_s: limit on opening one TCP connection (a timeout counts as a connection error).
        max_retries: retries after the first attempt on 408, 429, 5xx and connection errors.
        backoff_base_s: base of the exponential backoff; attempt k sleeps uniformly in
            ``[0, min(max_backoff_s, backoff_base_s * 2**(k-1))]`` ("full jitter").
        max_backoff_s: cap on one backoff sleep, also applied to a server's ``Retry-After``.
        rate_limit: at most this many HTTP requests (retries included) per ``rate_period_s``; None: no limit.
        rate_period_s: the rate-limit window in seconds.
        max_concurrency: at most this many requests in flight at once (over all base URLs).
        structured_style: the server's dialect. ``"vllm"`` sends vLLM's extra sampling parameters
            (top_k, min_p, repetition_penalty, ...), asks for token ids, and constrains output with vLLM's
            ``structured_outputs`` (JSON schema, regex or choice). ``"openai"`` keeps to the OpenAI API: extra
            parameters are sent only when set to non-default values, and structured output uses
            ``response_format`` (JSON schema only).
        headers: extra HTTP headers for every request.
        transport: an httpx transport to use instead of the network (tests, proxies).
    """

    backend = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | Sequence[str] = "http://127.0.0.1:8000/v1",
        *,
        api_key: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_base_s: float = 0.25,
        max_backoff_s: float = 20.0,
        rate_limit: int | None = None,
        rate_period_s: float = 1.0,
        max_concurrency: int = 64,
        structured_style: StructuredStyle = "vllm",
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a non-empty string (the served model name), got {model!r}")
        super().__init__(model=model)
        self._base_urls = _check_urls(base_url)
        _check_positive("request_timeout_s", request_timeout_s)
        _check_positive("connect_timeout_s", connect_timeout_s)
        _check_positive("rate_period_s", rate_period_s)
        _check_int("max_retries", max_retries, minimum=0)
        _check_int("max_concurrency", max_concurrency, minimum=1)
        if rate_limit is not None:
            _check_int("rate_limit", rate_limit, minimum=1)
        for name, value in (("backoff_base_s", backoff_base_s), ("max_backoff_s", max_backoff_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if structured_style not in ("vllm", "openai"):
            raise ConfigError(f"structured_style must be 'vllm' or 'openai', got {structured_style!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ConfigError("api_key must be a non-empty string or None")
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
            raise ConfigError(f"api_key_env must be a non-empty string or None, got {api_key_env!r}")
        if headers is not None and (
            not isinstance(headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise ConfigError("headers must be a mapping of strings to strings")
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigError(f"transport must be an httpx.AsyncBaseTransport, got {type(transport).__name__}")

        self.structured_style: StructuredStyle = structured_style
        self._request_timeout_s = float(request_timeout_s)
        self._connect_timeout_s = float(connect_timeout_s)
        self._max_retries = max_retries
        self._backoff_base_s = float(backoff_base_s)
        self._max_backoff_s = float(max_backoff_s)
        self._max_concurrency = max_concurrency
        self._transport = transport
        key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        self._headers: dict[str, str] = dict(headers or {})
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._throttler: Any = None
        if rate_limit is not None:
            from asyncio_throttle.throttler import Throttler

            self._throttler = Throttler(rate_limit=rate_limit, period=float(rate_period_s))
        self._semaphore = asyncio.Semaphore(max_concurrency)
        n_urls = len(self._base_urls)
        self._outstanding = [0] * n_urls
        self._failures = [0] * n_urls
        self._cooldown_until = [0.0] * n_urls
        self._next = 0
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._max_model_len: int | None = None

    # -- public API -------------------------------------------------------------------------------------------
    @property
    def base_urls(self) -> tuple[str, ...]:
        """The API roots requests are balanced over."""
        return self._base_urls

    @property
    def outstanding(self) -> dict[str, int]:
        """Requests in flight per base URL."""
        return dict(zip(self._base_urls, self._outstanding, strict=True))

    @property
    def capabilities(self) -> Capabilities:
        vllm = self.structured_style == "vllm"
        return Capabilities(
            streaming=True,
            logprobs=True,
            max_top_logprobs=20,
            # The OpenAI dialect constrains output to a JSON schema only, no regex or choice list.
            structured_output=vllm,
            chat=True,
            per_request_seed=True,
            prefix_caching=False,  # unknown for a remote server
            abort=True,
            max_model_len=self._max_model_len,
            extra={
                "base_urls": self._base_urls,
                "structured_style": self.structured_style,
                "structured_kinds": ("json_schema", "regex", "choices") if vllm else ("json_schema",),
                "token_ids": vllm,
            },
        )

    async def start(self) -> None:
        """Check that a server answers ``GET /models`` and serves this model; learn its context length.

        Optional: requests work without it. Raises `EngineUnavailable` when no base URL answers and
        `UnknownNameError` when the servers answer but do not list the model.
        """
        client = self._get_client()
        errors: list[str] = []
        for url in self._base_urls:
            try:
                async with asyncio.timeout(self._request_timeout_s):
                    response = await client.get(f"{url}/models")
                if response.status_code != 200:
                    errors.append(f"{url}: HTTP {response.status_code}: {_error_message(response.content)}")
                    continue
                served = response.json().get("data") or []
            except (httpx.HTTPError, TimeoutError, ValueError, AttributeError) as err:
                errors.append(f"{url}: {type(err).__name__}: {err}")
                continue
            ids = [str(m.get("id")) for m in served if isinstance(m, Mapping)]
            if ids and self.model not in ids:
                raise UnknownNameError(f"served model at {url}", self.model, ids)
            for m in served:
                if isinstance(m, Mapping) and m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                    self._max_model_len = int(m["max_model_len"])
            return
        raise EngineUnavailable("no OpenAI-compatible server answered: " + "; ".join(errors))

    async def aclose(self) -> None:
        """Close the HTTP client and its connections. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def payload(self, request: GenerationRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
        """The endpoint path (relative to the base URL) and JSON body that ``request`` is sent as.

        Raises:
            RequestValidationError: the request uses something the configured server dialect cannot express.
        """
        vllm = self.structured_style == "vllm"
        body: dict[str, Any] = {"model": self.model}
        if request.messages is not None:
            path = "/chat/completions"
            body["messages"] = [m.to_dict() for m in request.messages]
            body["max_completion_tokens"] = request.max_tokens
            if request.continue_final_message:
                if not vllm:
                    raise RequestValidationError(
                        "continue_final_message",
                        "the OpenAI API cannot continue an assistant turn; needs a vLLM server",
                    )
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            if request.logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = request.logprobs
        else:
            path = "/completions"
            body["prompt"] = request.prompt
            body["max_tokens"] = request.max_tokens
            if request.logprobs is not None:
                body["logprobs"] = request.logprobs
        body["n"] = request.n
        body["temperature"] = request.temperature
        body["top_p"] = request.top_p
        body["presence_penalty"] = request.presence_penalty
        body["frequency_penalty"] = request.frequency_penalty
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        # vLLM's server fills unset sampling parameters from the model's generation_config, so they are sent
        # explicitly to it; a strict OpenAI server rejects unknown ones, so it only gets those that were set.
        if vllm or request.top_k is not None:
            body["top_k"] = request.top_k or 0
        if vllm or request.min_p:
            body["min_p"] = request.min_p
        if vllm or request.repetition_penalty != 1.0:
            body["repetition_penalty"] = request.repetition_penalty
        if request.min_tokens:
            body["min_tokens"] = request.min_tokens
        if request.ignore_eos:
            body["ignore_eos"] = True
        if request.structured is not None:
            s = request.structured
            if vllm:
                if s.json_schema is not None:
                    body["structured_outputs"] = {"json": dict(s.json_schema)}
                elif s.regex is not None:
                    body["structured_outputs"] = {"regex": s.regex}
                else:
                    body["structured_outputs"] = {"choice": list(s.choices or ())}
            elif s.json_schema is not None:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": dict(s.json_schema)},
                }
            else:
                raise RequestValidationError(
                    "structured", f"{s.kind} constraints need structured_style='vllm'; the OpenAI API has JSON only"
                )
        if vllm:
            body["return_token_ids"] = True
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return path, body

    # -- requests ---------------------------------------------------------------------------------------------
    def _prepare(self, request: GenerationRequest, *, stream: bool) -> _Call:
        if self._closed:
            raise EngineUnavailable("this OpenAIEngine was closed")
        path, body = self.payload(request, stream=stream)
        deadline = asyncio.get_running_loop().time() + self._request_timeout_s
        return _Call(request, path, json.dumps(body).encode(), deadline)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        call = self._prepare(request, stream=True)
        yielded = False
        while True:
            try:
                async with self._slot(call) as (index, client):
                    url = self._base_urls[index]
                    try:
                        http_request = client.build_request(
                            "POST", url + call.path, content=call.body, headers=_STREAM_HEADERS
                        )
                        async with asyncio.timeout_at(call.deadline):
                            response = await client.send(http_request, stream=True)
                    except httpx.TransportError as err:
                        raise _Retryable(EngineUnavailable(f"cannot reach {url}: {_describe(err)}")) from err
                    try:
                        if response.status_code != 200:
                            await self._raise_for_status(response, url, call)
                        if "text/event-stream" in response.headers.get("content-type", ""):
                            deltas = self._read_events(response, url, call, meter, _Samples(call.n))
                        else:  # a server that ignored `stream`: map its whole answer
                            deltas = self._read_whole(response, url, call, meter)
                        async with contextlib.aclosing(deltas):
                            async for delta in deltas:
                                yielded = True
                                yield delta
                    finally:
                        # Closing an unfinished response drops the connection: that is how the server learns
                        # to abort the request when the consumer goes away.
                        await response.aclose()
                self._succeeded(index)
                return
            except _Retryable as failure:
                if yielded:
                    # The consumer already holds part of the output; a retry would sample a different one.
                    error = failure.error
                    error.args = (f"{error} (after output was streamed; not retried)",)
                    raise error from failure.__cause__
                await self._before_retry(call, failure)
            except TimeoutError as err:
                raise EngineTimeout(f"request exceeded request_timeout_s={self._request_timeout_s} s") from err

    async def _generate(self, request: GenerationRequest, meter: CallMeter) -> tuple[Completion, ...]:
        call = self._prepare(request, stream=False)
        while True:
            try:
                async with self._slot(call) as (index, client):
                    url = self._base_urls[index]
                    try:
                        async with asyncio.timeout_at(call.deadline):
                            response = await client.post(url + call.path, content=call.body, headers=_JSON_HEADERS)
                    except httpx.TransportError as err:
                        raise _Retryable(EngineUnavailable(f"cannot reach {url}: {_describe(err)}")) from err
                    if response.status_code != 200:
                        await self._raise_for_status(response, url, call)
                    completions, prompt_tokens = _parse_whole(response.content, url, call)
                self._succeeded(index)
                break
            except _Retryable as failure:
                await self._before_retry(call, failure)
            except TimeoutError as err:
                raise EngineTimeout(f"request exceeded request_timeout_s={self._request_timeout_s} s") from err
        meter.prompt_tokens = prompt_tokens
        meter.completion_tokens = sum(c.num_tokens for c in completions)
        return completions

    # -- stream reading ---------------------------------------------------------------------------------------
    async def _read_events(
        self, response: httpx.Response, url: str, call: _Call, meter: CallMeter, samples: _Samples
    ) -> AsyncGenerator[Delta, None]:
        """Map a server-sent event stream to deltas (the hot path: one event per generated token)."""
        chunks = response.aiter_bytes()
        deadline = call.deadline
        chat = call.chat
        n = call.n
        want_lp = call.want_lp
        top_k = call.top_k
        counted = samples.counted
        finished = samples.finished
        approx = samples.approx
        held: dict[int, Delta] = {}
        pending = b""
        data: list[bytes] = []
        done = False
        watchdog = _Watchdog(deadline)
        try:
            while not done:
                try:
                    chunk = await watchdog.read(chunks)
                except httpx.TransportError as err:
                    raise _Retryable(EngineUnavailable(f"connection to {url} lost: {_describe(err)}")) from err
                except httpx.HTTPError as err:
                    raise EngineRequestError(f"unreadable response from {url}: {_describe(err)}") from err
                if chunk is None:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for raw in lines:
                    line = raw[:-1] if raw[-1:] == b"\r" else raw
                    if line:
                        if line.startswith(b"data:"):
                            data.append(line[6:] if line[5:6] == b" " else line[5:])
                        continue  # comments, event names and ids carry nothing in the OpenAI protocol
                    if not data:
                        continue
                    # A blank line ends the event.
                    payload = data[0] if len(data) == 1 else b"\n".join(data)
                    data.clear()
                    if payload == b"[DONE]":
                        done = True
                        break
                    try:
                        event = _decode_json(payload.decode())
                        choices = event.get("choices")
                        if choices is None and "error" in event:
                            _raise_event_error(event, url)
                        if not meter.prompt_tokens:
                            ids = event.get("prompt_token_ids")
                            if ids:
                                meter.prompt_tokens = len(ids)
                        usage = event.get("usage")
                        if usage:
                            meter.prompt_tokens = int(usage.get("prompt_tokens") or meter.prompt_tokens)
                            if usage.get("completion_tokens") is not None:
                                samples.usage_completion = int(usage["completion_tokens"])
                        for choice in choices or ():
                            index = choice["index"]
                            if not 0 <= index < n:
                                raise EngineRequestError(f"{url} sent choice index {index} for a request with n={n}")
                            text = ((choice.get("delta") or {}).get("content") if chat else choice.get("text")) or ""
                            if not meter.prompt_tokens:
                                ids = choice.get("prompt_token_ids")
                                if ids:
                                    meter.prompt_tokens = len(ids)
                            ids = choice.get("token_ids")
                            lp = choice.get("logprobs")
                            logprobs: tuple[TokenLogprob, ...] | None = None
                            if want_lp:
                                logprobs = _chat_logprobs(lp, ids, top_k) if chat else _text_logprobs(lp, ids, top_k)
                            if ids:
                                token_ids = tuple(ids)
                            elif logprobs:
                                token_ids = (PLACEHOLDER_TOKEN_ID,) * len(logprobs)
                            elif lp and chat and lp.get("content"):
                                token_ids = (PLACEHOLDER_TOKEN_ID,) * len(lp["content"])
                            elif text:
                                token_ids = (PLACEHOLDER_TOKEN_ID,)
                                approx[index] = True
                            else:
                                token_ids = _NO_IDS
                            reason = choice.get("finish_reason")
                            finish = None if reason is None else _FINISH.get(reason, "stop")
                            if not (text or token_ids or finish):
                                continue  # role announcements, keep-alives
                            counted[index] += len(token_ids)
                            stop = choice.get("stop_reason") if finish is not None else None
                            delta = Delta(
                                index, text, token_ids, logprobs, finish, stop if isinstance(stop, (str, int)) else None
                            )
                            if finish is not None:
                                finished[index] = True
                                if approx[index]:
                                    held[index] = delta  # its count may still be corrected from the usage
                                    continue
                            yield delta
                    except EngineError:
                        raise
                    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
                        raise EngineRequestError(
                            f"malformed event from {url}: {_describe(err)}: {payload[:200]!r}"
                        ) from err
        finally:
            watchdog.cancel()
        if done:
            # Read the end of the response (it follows [DONE] at once) so the connection can be reused; a server
            # that keeps the response open after [DONE] only costs that connection.
            drain_s = min(_DRAIN_S, deadline - asyncio.get_running_loop().time())
            if drain_s > 0:
                with contextlib.suppress(TimeoutError, httpx.HTTPError):
                    async with asyncio.timeout(drain_s):
                        async for _ in chunks:
                            pass
        elif not all(finished):
            raise _Retryable(EngineUnavailable(f"the stream from {url} ended before it was complete"))
        if held:
            extra = samples.shortfall()
            for index in sorted(held):
                d = held[index]
                if extra[index]:
                    ids = (*d.token_ids, *(PLACEHOLDER_TOKEN_ID,) * extra[index])
                    d = Delta(d.index, d.text, ids, d.logprobs, d.finish_reason, d.stop_reason)
                yield d

    async def _read_whole(
        self, response: httpx.Response, url: str, call: _Call, meter: CallMeter
    ) -> AsyncGenerator[Delta, None]:
        try:
            async with asyncio.timeout_at(call.deadline):
                content = await response.aread()
        except httpx.TransportError as err:
            raise _Retryable(EngineUnavailable(f"connection to {url} lost: {_describe(err)}")) from err
        completions, meter.prompt_tokens = _parse_whole(content, url, call)
        for c in completions:
            yield Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)

    # -- slots, balancing, retries ----------------------------------------------------------------------------
    def _get_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise EngineUnavailable("this OpenAIEngine was closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                # The whole call has its own deadline; only connecting gets a separate limit.
                timeout=httpx.Timeout(None, connect=self._connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=self._max_concurrency + len(self._base_urls),
                    max_keepalive_connections=self._max_concurrency,
                ),
                transport=self._transport,
                trust_env=False,
            )
        return self._client

    def _slot(self, call: _Call) -> _Slot:
        return _Slot(self, call)

    def _pick(self, avoid: set[int]) -> int:
        """Least outstanding requests first; URLs that failed in this call or are cooling down come last."""
        count = len(self._base_urls)
        if count == 1:
            return 0
        now = time.monotonic()
        best = -1
        best_key: tuple[bool, bool, int] | None = None
        start = self._next
        for k in range(count):
            i = (start + k) % count
            key = (i in avoid, self._cooldown_until[i] > now, self._outstanding[i])
            if best_key is None or key < best_key:
                best, best_key = i, key
        self._next = (best + 1) % count
        return best

    def _succeeded(self, index: int) -> None:
        if self._failures[index]:
            self._failures[index] = 0
            self._cooldown_until[index] = 0.0

    async def _raise_for_status(self, response: httpx.Response, url: str, call: _Call) -> NoReturn:
        status = response.status_code
        try:
            async with asyncio.timeout_at(call.deadline):
                body = b""
                async for part in response.aiter_bytes():
                    body += part
                    if len(body) > _MAX_ERROR_BODY:
                        break
        except httpx.HTTPError:
            body = b""
        message = f"{url} answered HTTP {status}: {_error_message(body)}"
        if status == 429:
            raise _Retryable(RateLimited(message), retry_after=_retry_after(response.headers.get("retry-after")))
        if status in _RETRY_STATUS_UNAVAILABLE:
            raise _Retryable(EngineUnavailable(message), retry_after=_retry_after(response.headers.get("retry-after")))
        if status == 408 or status >= 500:
            raise _Retryable(
                EngineRequestError(message, status_code=status),
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        raise EngineRequestError(message, status_code=status)

    async def _before_retry(self, call: _Call, failure: _Retryable) -> None:
        """Record the failure, then sleep for the backoff (or not at all, if a fresh URL is left)."""
        error = failure.error
        index = failure.index
        loop = asyncio.get_running_loop()
        backoff_cap = min(self._max_backoff_s, self._backoff_base_s * 2**call.attempts)
        if index is not None:
            self._failures[index] += 1
            pause = min(
                self._max_backoff_s,
                failure.retry_after
                if failure.retry_after is not None
                else self._backoff_base_s * 2 ** (self._failures[index] - 1),
            )
            self._cooldown_until[index] = time.monotonic() + pause
            call.avoid.add(index)
            if len(call.avoid) >= len(self._base_urls):
                call.avoid.clear()
        call.attempts += 1
        if call.attempts > self._max_retries or self._closed:
            raise error from failure.__cause__
        fresh = len(self._base_urls) > 1 and any(
            i not in call.avoid and self._cooldown_until[i] <= time.monotonic() for i in range(len(self._base_urls))
        )
        if fresh:
            delay = 0.0  # another server is there to try at once
        elif failure.retry_after is not None:
            delay = min(failure.retry_after, self._max_backoff_s)
        else:
            delay = random.uniform(0.0, backoff_cap)
        if loop.time() + delay >= call.deadline:
            error.args = (f"{error} (no time left for a retry within request_timeout_s={self._request_timeout_s} s)",)
            raise error from failure.__cause__
        logger.warning("%s; retrying in %.2f s (retry %d of %d)", error, delay, call.attempts, self._max_retries)
        if delay > 0:
            await asyncio.sleep(delay)

    def __repr__(self) -> str:
        urls = self._base_urls[0] if len(self._base_urls) == 1 else list(self._base_urls)
        return f"{type(self).__name__}(model={self.model!r}, base_url={urls!r})"


class _Slot:
    """Holds a concurrency slot, passes the rate limiter, and counts an outstanding request on the chosen URL.

    The chosen URL's index is stored on the `_Retryable` raised inside, so the retry logic knows which failed.
    """

    __slots__ = ("_call", "_engine", "_index")

    def __init__(self, engine: OpenAIEngine, call: _Call) -> None:
        self._engine = engine
        self._call = call
        self._index = -1

    async def __aenter__(self) -> tuple[int, httpx.AsyncClient]:
        engine = self._engine
        client = engine._get_client()
        async with asyncio.timeout_at(self._call.deadline):
            await engine._semaphore.acquire()
        try:
            if engine._throttler is not None:
                async with asyncio.timeout_at(self._call.deadline):
                    await engine._throttler.acquire()
            self._index = engine._pick(self._call.avoid)
        except BaseException:
            engine._semaphore.release()
            raise
        engine._outstanding[self._index] += 1
        return self._index, client

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        engine = self._engine
        engine._outstanding[self._index] -= 1
        engine._semaphore.release()
        if isinstance(exc, _Retryable):
            exc.index = self._index


# vLLM's server answers 415-as-400 to a body without a JSON content type.
_JSON_HEADERS = {"Content-Type": "application/json"}
_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


# -- response mapping -------------------------------------------------------------------------------------------
def _text_logprobs(lp: Any, ids: Sequence[int] | None, top_k: int) -> tuple[TokenLogprob, ...]:
    """Completions API: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}]}``.

    vLLM returns up to top_k + 1 alternatives (the sampled token is added); the k most likely are kept.
    """
    if not lp:
        return ()
    tokens = lp.get("tokens") or ()
    values = lp.get("token_logprobs") or ()
    tops = lp.get("top_logprobs") or () if top_k else ()
    out = []
    for j, token in enumerate(tokens):
        value = values[j] if j < len(values) else None
        top: tuple[tuple[str, float], ...] = ()
        if top_k and j < len(tops) and tops[j]:
            ranked = sorted(tops[j].items(), key=_by_logprob, reverse=True)[:top_k]
            top = tuple((str(t), float(v)) for t, v in ranked)
        out.append(
            TokenLogprob(
                ids[j] if ids and j < len(ids) else PLACEHOLDER_TOKEN_ID,
                str(token),
                -math.inf if value is None else float(value),
                top,
            )
        )
    return tuple(out)


def _chat_logprobs(lp: Any, ids: Sequence[int] | None, top_k: int) -> tuple[TokenLogprob, ...]:
    """Chat API: ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``."""
    content = lp.get("content") if lp else None
    if not content:
        return ()
    out = []
    for j, entry in enumerate(content):
        top: tuple[tuple[str, float], ...] = ()
        if top_k:
            alternatives = entry.get("top_logprobs") or ()
            ranked = sorted(((str(a["token"]), float(a["logprob"])) for a in alternatives), key=_by_value, reverse=True)
            top = tuple(ranked[:top_k])
        value = entry.get("logprob")
        out.append(
            TokenLogprob(
                ids[j] if ids and j < len(ids) else PLACEHOLDER_TOKEN_ID,
                str(entry["token"]),
                -math.inf if value is None else float(value),
                top,
            )
        )
    return tuple(out)


def _by_logprob(item: tuple[str, Any]) -> float:
    return float(item[1]) if item[1] is not None else -math.inf


def _by_value(item: tuple[str, float]) -> float:
    return item[1]


def _parse_whole(content: bytes, url: str, call: _Call) -> tuple[tuple[Completion, ...], int]:
    """Map a non-streaming response body to completions and the prompt token count."""
    try:
        data = json.loads(content)
        choices = data.get("choices")
        if choices is None:
            if "error" in data:
                _raise_event_error(data, url)
            raise EngineRequestError(f"response from {url} has no choices: {content[:200]!r}")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or len(data.get("prompt_token_ids") or ()))
        samples = _Samples(call.n)
        if usage.get("completion_tokens") is not None:
            samples.usage_completion = int(usage["completion_tokens"])
        parsed: dict[int, tuple[str, tuple[int, ...], tuple[TokenLogprob, ...] | None, FinishReason, Any]] = {}
        for choice in choices:
            index = choice["index"]
            if not 0 <= index < call.n:
                raise EngineRequestError(f"{url} sent choice index {index} for a request with n={call.n}")
            text = ((choice.get("message") or {}).get("content") if call.chat else choice.get("text")) or ""
            if not prompt_tokens and choice.get("prompt_token_ids"):
                prompt_tokens = len(choice["prompt_token_ids"])
            ids = choice.get("token_ids")
            lp = choice.get("logprobs")
            logprobs = None
            if call.want_lp:
                logprobs = _chat_logprobs(lp, ids, call.top_k) if call.chat else _text_logprobs(lp, ids, call.top_k)
            if ids:
                token_ids = tuple(ids)
            elif logprobs:
                token_ids = (PLACEHOLDER_TOKEN_ID,) * len(logprobs)
            else:
                token_ids = _NO_IDS
                samples.approx[index] = True
            samples.counted[index] = len(token_ids)
            reason = choice.get("finish_reason")
            finish: FinishReason = _FINISH.get(reason, "stop") if reason is not None else "stop"
            parsed[index] = (text, token_ids, logprobs, finish, choice.get("stop_reason"))
    except EngineError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise EngineRequestError(f"malformed response from {url}: {_describe(err)}: {content[:200]!r}") from err
    missing = [i for i in range(call.n) if i not in parsed]
    if missing:
        raise EngineRequestError(f"response from {url} lacks samples {missing} of n={call.n}")
    if samples.usage_completion is None:
        # No usage reported: roughly four characters a token, so budgets are not charged nothing.
        for i in range(call.n):
            if samples.approx[i] and parsed[i][0]:
                samples.counted[i] = max(1, len(parsed[i][0]) // 4)
        extra = samples.counted
    else:
        extra = samples.shortfall()
    completions = []
    for i in range(call.n):
        text, token_ids, logprobs, finish, stop_reason = parsed[i]
        if samples.approx[i] and extra[i]:
            token_ids = (PLACEHOLDER_TOKEN_ID,) * extra[i]
        completions.append(
            Completion(
                index=i,
                text=text,
                token_ids=token_ids,
                logprobs=logprobs,
                finish_reason=finish,
                stop_reason=stop_reason if isinstance(stop_reason, (str, int)) else None,
            )
        )
    return tuple(completions), prompt_tokens


def _raise_event_error(event: Mapping[str, Any], url: str) -> NoReturn:
    error = event.get("error")
    message = error.get("message") if isinstance(error, Mapping) else error
    code = error.get("code") if isinstance(error, Mapping) else None
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    raise EngineRequestError(f"{url} reported an error: {message}", status_code=status)


def _error_message(body: bytes) -> str:
    """The server's own error message: OpenAI/vLLM ``{"error": {"message"}}``, FastAPI ``{"detail"}``, or text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])[:2000]
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])[:2000]
    return text[:500]


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- argument checks --------------------------------------------------------------------------------------------
def _check_urls(base_url: str | Sequence[str]) -> tuple[str, ...]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls:
        raise ConfigError("base_url must name at least one URL")
    out: list[str] = []
    for url in urls:
        if not isinstance(url, str):
            raise ConfigError(f"base_url entries must be strings, got {url!r}")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as err:
            raise ConfigError(f"base_url {url!r} is not a valid URL: {err}") from err
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"base_url {url!r} must be an http:// or https:// URL with a host")
        normalised = url.rstrip("/")
        if normalised in out:
            raise ConfigError(f"base_url lists {url!r} twice")
        out.append(normalised)
    return tuple(out)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
