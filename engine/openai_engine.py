"""`OpenAIEngine`: any OpenAI-compatible HTTP server (vLLM's ``vllm serve``, OpenAI, ...) over httpx.

Requests with a ``prompt`` go to ``/completions``, requests with ``messages`` to ``/chat/completions``. Every
call is sent with ``stream: true`` and read as server-sent events: `stream` hands the deltas on as they arrive,
`generate` collects them (so a hung or stalled server is noticed in `generate` too; a server that ignores
``stream`` and answers with one JSON body works as well). Around every call the engine adds what a client needs
against a shared server:

- several base URLs, each request sent to the one with the fewest outstanding requests (ties in turn); a URL
  that fails or times out is left alone for a short cool-down while the request moves to another one;
- retries with exponential backoff and full jitter on 408, 429, 5xx, connection errors and per-attempt
  timeouts, honouring ``Retry-After``; never on other 4xx;
- per-attempt timeouts, each ending that attempt (which is then retried, on another URL if there is one):
  ``connect_timeout_s`` (default 5 s) to open a connection, ``first_byte_timeout_s`` (10 s) from sending the
  request to the response head, ``idle_timeout_s`` (30 s) for any gap without a byte while the server is
  expected to send, the wait for the first token included. A server that accepts and never answers costs
  10 s per attempt; with a second base URL the call goes on there at once. A server queueing requests longer
  than ``idle_timeout_s`` before their first token needs a larger value, or SSE keep-alive comments (any byte
  counts as a sign of life; ``vllm serve --sse-keep-alive-interval 10`` sends them while a request waits);
- a hard limit on the whole call (queueing for a slot, every attempt, backoff and streaming included):
  ``request_timeout_s`` (600 s), raising `EngineTimeout`;
- a client-side rate limit (asyncio-throttle) and a cap on concurrent requests;
- typed errors: 4xx -> `EngineRequestError` (with ``status_code`` and the server's message), 429 after every
  retry -> `RateLimited`, unreachable or 502/503/504 after every retry -> `EngineUnavailable`, per-attempt
  timeouts after every retry -> `EngineTimeout`, unparseable output -> `EngineRequestError` (not retried).

A stream is retried only while nothing has been delivered to its consumer. Once a delta was handed out, a lost
connection, an idle timeout or a stream that ends before every sample finished raises `EngineStreamBroken`
(a retry would sample different text than the consumer already holds); the caller may drop that output and
call again. `generate` hands nothing out before the end, so it retries those failures like any other.

Token ids: with ``structured_style="vllm"`` the engine asks vLLM for them (``return_token_ids``). Servers that do
not return ids get placeholder ids of ``-1``, one per generated token, so token counts stay right: the count
comes from the logprobs when requested, otherwise each streamed chunk counts as one token and the total is
corrected against the server's reported usage when the sample ends (the sample's final delta then carries the
missing placeholders).

Cancelling the consumer of `stream` closes the HTTP connection, which makes vLLM abort the request. The response
is read by a task of its own (see `._http_exchange`), so that repeated cancellation (a budget stopping a call
and then closing it) cannot interrupt the connection's clean-up: the server always sees the request closed and
the connection pool always gets its connection back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Literal

import httpx
from asyncio_throttle.throttler import Throttler

from ..errors import (
    ConfigError,
    EngineRequestError,
    EngineStreamBroken,
    EngineTimeout,
    EngineUnavailable,
    RequestValidationError,
    UnknownNameError,
)
from ._http_exchange import Exchange, Retryable
from ._http_parse import (
    PLACEHOLDER_TOKEN_ID,
    EventMapper,
    ResponseShape,
    describe,
    error_message,
    parse_whole,
    retry_after,
)
from ._http_policy import Balancer, Call, RetryPolicy, Slot, check_int, check_positive, check_urls, status_error
from .base import CallMeter, Engine, assemble
from .types import Capabilities, Completion, Delta, GenerationRequest

__all__ = ["PLACEHOLDER_TOKEN_ID", "OpenAIEngine", "StructuredStyle", "retry_after"]

logger = logging.getLogger(__name__)

StructuredStyle = Literal["vllm", "openai"]

_MAX_ERROR_BODY = 64 * 1024
_MAX_BODY = 256 * 1024 * 1024  # a whole (non-streamed) answer; n x max_tokens with top-20 logprobs stays below
_DRAIN_S = 1.0
# vLLM's server answers 415-as-400 to a body without a JSON content type. No content encoding: the body is read
# as it arrives, and compression buys nothing for token-sized events.
_STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream", "Accept-Encoding": "identity"}
_MODELS_HEADERS = {"Accept-Encoding": "identity"}


class OpenAIEngine(Engine):
    """An OpenAI-compatible HTTP server as a branchwise engine.

    Args:
        model: the model name the server serves (``--served-model-name`` of ``vllm serve``).
        base_url: the API root (ending in ``/v1``) or several of them; requests are balanced by least outstanding
            requests, ties in round-robin order, and a failing URL's requests move to another one.
        api_key: bearer token; when None it is read from the environment variable ``api_key_env`` (and no
            Authorization header is sent if that is unset too). The key is never logged.
        api_key_env: environment variable holding the key, or None to not look one up.
        request_timeout_s: hard limit on a whole call (waiting for a slot, every attempt, backoff and
            streaming), after which it raises `EngineTimeout` and closes the connection.
        connect_timeout_s: limit on opening one TCP connection; the attempt then counts as a connection error.
        first_byte_timeout_s: per attempt, the longest wait from sending the request to the response head
            (status line and headers); the attempt is then retried, on another base URL if there is one. A
            streaming server sends its head at once; one that ignores ``stream`` sends it only with the finished
            answer, and needs a limit above its longest generation.
        idle_timeout_s: per attempt, the longest gap without a byte from the server while it is expected to
            send (between the response head and the first token, and between chunks); the attempt is then
            retried if nothing was delivered yet, else the stream raises `EngineStreamBroken`.
        max_retries: retries after the first attempt on 408, 429, 5xx, connection errors and per-attempt
            timeouts.
        backoff_base_s: base of the exponential backoff; attempt k sleeps uniformly in
            ``[0, min(max_backoff_s, backoff_base_s * 2**(k-1))]`` ("full jitter"); no sleep when another base
            URL is there to try.
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
        connect_timeout_s: float = 5.0,
        first_byte_timeout_s: float = 10.0,
        idle_timeout_s: float = 30.0,
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
        self._base_urls = check_urls(base_url)
        for name, value in (
            ("request_timeout_s", request_timeout_s),
            ("connect_timeout_s", connect_timeout_s),
            ("first_byte_timeout_s", first_byte_timeout_s),
            ("idle_timeout_s", idle_timeout_s),
            ("rate_period_s", rate_period_s),
        ):
            check_positive(name, value)
        check_int("max_retries", max_retries, minimum=0)
        check_int("max_concurrency", max_concurrency, minimum=1)
        if rate_limit is not None:
            check_int("rate_limit", rate_limit, minimum=1)
        for name, value in (("backoff_base_s", backoff_base_s), ("max_backoff_s", max_backoff_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if structured_style not in ("vllm", "openai"):
            raise ConfigError(f"structured_style must be 'vllm' or 'openai', got {structured_style!r}")
        _check_client_options(api_key, api_key_env, headers, transport)

        self.structured_style: StructuredStyle = structured_style
        self._request_timeout_s = float(request_timeout_s)
        self._connect_timeout_s = float(connect_timeout_s)
        self._first_byte_timeout_s = float(first_byte_timeout_s)
        self._idle_timeout_s = float(idle_timeout_s)
        self._retry = RetryPolicy(max_retries, float(backoff_base_s), float(max_backoff_s), self._request_timeout_s)
        self._max_concurrency = max_concurrency
        self._transport = transport
        key = api_key if api_key is not None else (os.environ.get(api_key_env) if api_key_env else None)
        self._headers: dict[str, str] = dict(headers or {})
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._throttler: Throttler | None = None
        if rate_limit is not None:
            self._throttler = Throttler(rate_limit=rate_limit, period=float(rate_period_s))
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._balancer = Balancer(self._base_urls)
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
        return dict(zip(self._base_urls, self._balancer.outstanding, strict=True))

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

        Optional: requests work without it. Each URL gets ``first_byte_timeout_s + idle_timeout_s`` to answer.
        Raises `EngineUnavailable` when no base URL answers and `UnknownNameError` when the servers answer but do
        not list the model.
        """
        client = self._get_client()
        errors: list[str] = []
        limit = min(self._request_timeout_s, self._first_byte_timeout_s + self._idle_timeout_s)
        for url in self._base_urls:
            try:
                async with asyncio.timeout(limit):
                    response = await client.get(f"{url}/models", headers=_MODELS_HEADERS)
                if response.status_code != 200:
                    errors.append(f"{url}: HTTP {response.status_code}: {error_message(response.content)}")
                    continue
                served = response.json().get("data") or []
                ids = [str(m.get("id")) for m in served if isinstance(m, Mapping)]
            except (httpx.HTTPError, TimeoutError, ValueError, AttributeError, TypeError, RecursionError) as err:
                errors.append(f"{url}: {describe(err)}")
                continue
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

    # -- calls --------------------------------------------------------------------------------------------------
    def _prepare(self, request: GenerationRequest) -> Call:
        if self._closed:
            raise EngineUnavailable("this OpenAIEngine was closed")
        path, body = self.payload(request, stream=True)
        shape = ResponseShape(n=request.n, chat=request.messages is not None, logprobs=request.logprobs)
        deadline = asyncio.get_running_loop().time() + self._request_timeout_s
        return Call(path, json.dumps(body).encode(), shape, deadline)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        call = self._prepare(request)
        delivered = False
        while True:
            try:
                async with contextlib.aclosing(self._attempt(call, meter)) as deltas:
                    async for delta in deltas:
                        delivered = True
                        yield delta
                return
            except Retryable as failure:
                if delivered:
                    raise self._broken(failure) from failure.__cause__
                await self._retry.before_retry(call, failure, self._balancer, closed=self._closed)
            except TimeoutError as err:
                raise EngineTimeout(f"request exceeded request_timeout_s={self._request_timeout_s} s") from err

    async def _generate(self, request: GenerationRequest, meter: CallMeter) -> tuple[Completion, ...]:
        call = self._prepare(request)
        while True:
            collected: list[Delta] = []
            first_token_at: float | None = None
            try:
                async with contextlib.aclosing(self._attempt(call, meter)) as deltas:
                    async for delta in deltas:
                        if first_token_at is None and delta.token_ids:
                            first_token_at = time.perf_counter()
                        collected.append(delta)
                break
            except Retryable as failure:
                # Nothing was handed out yet, so even a stream that broke midway can be sent again.
                await self._retry.before_retry(call, failure, self._balancer, closed=self._closed)
            except TimeoutError as err:
                raise EngineTimeout(f"request exceeded request_timeout_s={self._request_timeout_s} s") from err
        meter.completion_tokens = sum(len(d.token_ids) for d in collected)
        meter.first_token_at = first_token_at
        return assemble(request.n, collected)

    async def _attempt(self, call: Call, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        """One HTTP request to one base URL, mapped to deltas; `Retryable` when another attempt may succeed."""
        client = self._get_client()  # made before the rate limiter's clock starts: making the first one takes time
        async with Slot(call, self._balancer, self._semaphore, self._throttler) as index:
            url = self._base_urls[index]
            request = client.build_request("POST", url + call.path, content=call.body, headers=_STREAM_HEADERS)
            exchange = Exchange(
                client,
                request,
                url,
                deadline=call.deadline,
                first_byte_s=self._first_byte_timeout_s,
                idle_s=self._idle_timeout_s,
            )
            try:
                response = await exchange.response()
                if response.status_code != 200:
                    raise await _status_error(exchange, response, url)
                if "text/event-stream" in response.headers.get("content-type", ""):
                    mapper = EventMapper(call.shape, url, meter)
                    while not mapper.done and (chunk := await exchange.read()) is not None:
                        for delta in mapper.feed(chunk):
                            yield delta
                    if mapper.done:
                        await exchange.drain(_DRAIN_S)
                    elif not mapper.complete:
                        raise Retryable(EngineUnavailable(f"the stream from {url} ended before it was complete"))
                    for delta in mapper.held():
                        yield delta
                else:  # a server that ignored `stream`: map its whole answer
                    content = await exchange.read_all(_MAX_BODY)
                    if len(content) > _MAX_BODY:
                        raise EngineRequestError(f"the response from {url} is larger than {_MAX_BODY} bytes")
                    completions, meter.prompt_tokens = parse_whole(content, url, call.shape)
                    for c in completions:
                        yield Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason)
            finally:
                await exchange.aclose()
        self._balancer.succeeded(index)

    def _broken(self, failure: Retryable) -> EngineStreamBroken:
        url = self._base_urls[failure.index] if failure.index is not None else None
        return EngineStreamBroken(f"{failure.error} (after output was streamed; not retried)", url=url)

    def _get_client(self) -> httpx.AsyncClient:
        if self._closed:
            raise EngineUnavailable("this OpenAIEngine was closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                # Each attempt has its own first-byte and idle limits, the call its deadline; only connecting is
                # left to httpx.
                timeout=httpx.Timeout(None, connect=self._connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=self._max_concurrency + len(self._base_urls),
                    max_keepalive_connections=self._max_concurrency,
                ),
                transport=self._transport,
                trust_env=False,
            )
        return self._client

    def __repr__(self) -> str:
        urls = self._base_urls[0] if len(self._base_urls) == 1 else list(self._base_urls)
        return f"{type(self).__name__}(model={self.model!r}, base_url={urls!r})"


async def _status_error(exchange: Exchange, response: httpx.Response, url: str) -> Retryable | EngineRequestError:
    try:
        body = await exchange.read_all(_MAX_ERROR_BODY)
    except Retryable:
        body = b""  # the status says enough
    return status_error(response.status_code, body, response.headers, url)


def _check_client_options(api_key: Any, api_key_env: Any, headers: Any, transport: Any) -> None:
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
