"""The server's ASGI application: OpenAI-compatible routes over loaded pipelines.

=========================================  ========================================================================
route                                      what it does
=========================================  ========================================================================
``POST /v1/chat/completions``              runs the pipeline ``model`` names on the chat's query; JSON or SSE
``GET /v1/models``, ``/v1/models/{id}``    the loaded pipelines
``GET /v1/traces/{trace_id}``              a run's JSONL trace (``trace_id`` from the response's ``branchwise``)
``GET /metrics``                           Prometheus text (`branchwise.serve.metrics`)
``GET /health``                            200 ``{"status": "ok"}`` once every engine has started, 503 while
                                           draining; the only route open without an API key
=========================================  ========================================================================

With API keys configured, every other route answers 401 unless the request carries ``Authorization: Bearer KEY``
(compared in constant time); a trace is served only to the key whose request recorded it. Runs are cancelled
when their client disconnects (their engine requests aborted), and when the server shuts down after its drain
deadline.

Chat completions, the route under load, are answered on plain ASGI by `ServeApp` itself; the other routes are a
FastAPI application behind it. Each run's trace is written by a `TraceSpool` thread, so the event loop shared by
every run never waits on the disk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from ..engine.base import Engine
from ..errors import BranchwiseError, ConfigError, EngineTimeout, EngineUnavailable, RateLimited
from ..orchestrator.pipeline import RunResult
from ..orchestrator.tracing import TraceSpool
from .admission import Admission, Draining, Overloaded, Ticket
from .metrics import EngineGauges, Metrics
from .pipelines import Lease, PipelineSet, Served
from .protocol import (
    APIError,
    ChatRequest,
    Query,
    completion_body,
    completion_chunk,
    finish_reason,
    now,
    parse_chat_request,
    query_of,
    run_section,
    usage_of,
)

__all__ = ["CHAT_PATH", "OPEN_PATHS", "RunJob", "ServeApp", "ServerState", "create_app"]

logger = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
OPEN_PATHS = frozenset({"/health"})
"""Routes answered without an API key (load balancers' probes); they say nothing about the pipelines."""
ANONYMOUS = "anonymous"
"""The key of every request when the server has no API keys."""
PROGRESS_S = 1.0
"""Seconds between the progress comments of a stream that asked for them."""
ENGINE_STATE_TIMEOUT_S = 5.0
"""How long ``/metrics`` waits for an engine's own state."""
TRACE_WRITE_WAIT_S = 5.0
"""How long ``/v1/traces/{id}`` waits for the spool to finish writing a run that has ended."""
_TRACE_ID = re.compile(r"[0-9a-f]{24}")
_ids = random.Random()  # trace ids, seeded from the OS once (a uuid4 a request was 3% of the server's time under load)
_CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; recorded, never received
_JSON = (b"content-type", b"application/json")
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ServerState:
    """Everything the routes share: pipelines, admission, metrics, in-flight runs, trace owners, draining.

    Args:
        pipelines: the loaded pipelines.
        trace_dir: where each run's JSONL trace is written (``<trace_id>.jsonl``).
    """

    def __init__(self, pipelines: PipelineSet, trace_dir: Path) -> None:
        self.pipelines = pipelines
        self.limits = pipelines.limits
        self.trace_dir = trace_dir
        self.spool = TraceSpool()
        self.admission = Admission(self.limits)
        self.jobs: dict[str, RunJob] = {}  # by trace id
        self.metrics = Metrics(in_flight=lambda: len(self.jobs), queued=lambda: self.admission.queued)
        self.trace_owners: OrderedDict[str, str] = OrderedDict()
        self.draining = False
        self.started = now()
        self.cancelled_at_deadline = 0
        self._deadline: asyncio.TimerHandle | None = None

    def begin_drain(self) -> None:
        """Stop admitting runs (waiting requests get 503); cancel the runs still going after the drain deadline."""
        if self.draining:
            return
        self.draining = True
        self.admission.drain()
        logger.info("draining %d runs (deadline %g s)", len(self.jobs), self.limits.drain_timeout_s)
        self._deadline = asyncio.get_running_loop().call_later(self.limits.drain_timeout_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self.cancelled_at_deadline += len([job for job in self.jobs.values() if not job.task.done()])
        for job in list(self.jobs.values()):
            job.cancel("shutdown")

    async def shutdown(self) -> None:
        """Cancel every run still going, wait for them to end (their engine requests aborted) and for their traces
        to be written; idempotent."""
        if self._deadline is not None:
            self._deadline.cancel()
        jobs = [job for job in self.jobs.values() if not job.task.done()]
        self.cancelled_at_deadline += len(jobs)
        for job in jobs:
            job.cancel("shutdown")
        await asyncio.gather(*(job.task for job in jobs), return_exceptions=True)
        await asyncio.to_thread(self.spool.stop)

    def trace_path(self, trace_id: str) -> Path:
        return self.trace_dir / f"{trace_id}.jsonl"

    def owns(self, key: str, trace_id: str) -> bool:
        return self.trace_owners.get(trace_id) == key

    def record_owner(self, trace_id: str, key: str) -> None:
        self.trace_owners[trace_id] = key
        while len(self.trace_owners) > self.limits.max_traces:  # the oldest run's trace goes, file and owner
            oldest, _ = self.trace_owners.popitem(last=False)
            self.spool.remove(self.trace_path(oldest))  # after its writes, off the event loop


class RunJob:
    """One run in flight: a task owned by the server state, holding its run slot and pipeline until it ends.

    The run's budget is the job's, so the tokens of a run that fails or is cancelled are counted too.
    """

    def __init__(
        self,
        state: ServerState,
        served: Served,
        *,
        lease: Lease,
        ticket: Ticket,
        query: Query,
        trace_id: str,
        seed: int | None = None,
    ) -> None:
        self.state = state
        self.served = served
        self.lease = lease
        self.ticket = ticket
        self.trace_id = trace_id
        self.budget = lease.pipeline.new_budget()
        self.cancel_reason: str | None = None
        self.task: asyncio.Task[RunResult] = asyncio.get_running_loop().create_task(
            self._run(query.text, state.trace_path(trace_id), seed), name=f"branchwise-serve-{trace_id}"
        )
        state.jobs[trace_id] = self

    def cancel(self, reason: str) -> None:
        """Cancel the run (no-op once it ended); ``reason`` is its outcome in the metrics."""
        if not self.task.done():
            self.cancel_reason = self.cancel_reason or reason
            self.task.cancel()

    async def _run(self, query: str, trace: Path, seed: int | None) -> RunResult:
        started = time.perf_counter()
        outcome, result = "error", None
        try:
            pipeline = self.lease.pipeline
            result = await pipeline.run(query, budget=self.budget, trace=trace, seed=seed, trace_spool=self.state.spool)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            outcome = self.cancel_reason or "shutdown"
            raise
        finally:
            self.budget.stop()
            seconds = time.perf_counter() - started
            exhausted = result.budget_exhausted if result is not None else self.budget.exhausted
            self.state.metrics.run(
                self.served.name, outcome, self.budget.usage.snapshot(), seconds, exhausted=exhausted
            )
            self.state.admission.release(self.ticket, seconds)
            self.state.jobs.pop(self.trace_id, None)
            await self.lease.release()


# -- the application -----------------------------------------------------------------------------------------------
class ServeApp:
    """The server's ASGI application: checks the API key of every request, answers chat completions itself and
    hands every other route to ``routes`` (FastAPI).

    Attributes:
        state: what the routes share.
        routes: the FastAPI application of the other routes.
    """

    def __init__(self, state: ServerState, routes: FastAPI, keys: Sequence[str]) -> None:
        self.state = state
        self.routes = routes
        self._keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.routes(scope, receive, send)
            return
        key = self._key(scope)
        if key is None:
            given = _bearer(scope)
            message = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
            err = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await _Exchange(receive, send).refuse(err)
            return
        scope.setdefault("state", {})["key"] = key  # for the FastAPI routes' ``request.state.key``
        if scope["path"] != CHAT_PATH:
            await self.routes(scope, receive, send)
        elif scope["method"] != "POST":
            err = APIError(405, f"{CHAT_PATH} takes POST", code="method_not_allowed", headers={"Allow": "POST"})
            await _Exchange(receive, send).refuse(err)
        else:
            await _chat(self.state, _Exchange(receive, send), scope, key)

    def _key(self, scope: Scope) -> str | None:
        """The request's key name: ``key0``, ``key1``... for a valid bearer key, `ANONYMOUS` without keys or on
        `OPEN_PATHS`; None for a missing or wrong key."""
        if not self._keys or scope["path"] in OPEN_PATHS:
            return ANONYMOUS
        given = _bearer(scope)
        matched = None
        for i, key in enumerate(self._keys):  # every key compared, each in constant time
            if hmac.compare_digest(given, key):
                matched = i
        return None if matched is None else f"key{matched}"


def create_app(pipelines: PipelineSet, *, trace_dir: Path, api_keys: Sequence[str] = ()) -> ServeApp:
    """The ASGI application over ``pipelines`` (whose engines the caller starts and closes, see
    `branchwise.serve.runner.serve`; it also calls `ServerState.shutdown`).

    Args:
        pipelines: the loaded pipelines, with the server's limits.
        trace_dir: an existing folder for run traces.
        api_keys: keys a request must present (none: no authentication).
    """
    state = ServerState(pipelines, trace_dir)
    routes = FastAPI(title="branchwise", summary="OpenAI-compatible chat completions over branchwise pipelines")
    routes.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    routes.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    routes.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    routes.add_exception_handler(Exception, _internal_error)

    @routes.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s, state.started) for s in state.pipelines.served.values()]}

    @routes.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return _model_card(state.pipelines.get(model), state.started)

    @routes.get("/v1/traces/{trace_id}", response_model=None)
    async def get_trace(trace_id: str, request: Request) -> FileResponse:
        missing = APIError(404, f"no trace {trace_id!r} recorded for this API key", param="trace_id", code="not_found")
        if not _TRACE_ID.fullmatch(trace_id) or not state.owns(request.state.key, trace_id):
            raise missing
        path = state.trace_path(trace_id)
        writing = state.spool.written(path)
        if writing is not None:  # a run that has ended: its whole trace; one in flight: what it has recorded so far
            done = writing if trace_id not in state.jobs else state.spool.sync()
            await asyncio.to_thread(done.wait, TRACE_WRITE_WAIT_S)
        if not await asyncio.to_thread(path.is_file):
            raise missing
        return FileResponse(path, media_type="application/x-ndjson")

    @routes.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(await _engine_gauges(state.pipelines.engines))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @routes.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return ServeApp(state, routes, api_keys)


# -- chat completions on plain ASGI --------------------------------------------------------------------------------
class _ClientLeft(Exception):
    """The client disconnected before its request was read."""


class _Exchange:
    """One HTTP request and its response on plain ASGI: reading the body, noticing the client leave, answering."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.started = False  # the response has begun
        self._gone: asyncio.Task[None] | None = None

    async def read_json(self, scope: Scope, limit: int) -> Any:
        """The request body as JSON, read up to ``limit`` bytes.

        Raises:
            APIError: 413 for a larger body, 400 for one that is not JSON.
        """
        too_large = APIError(
            413, f"the request body is larger than this server's limit of {limit} bytes", code="too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large
        size, parts = 0, []
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
            part = message.get("body", b"")
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
            if not message.get("more_body", False):
                break
        try:
            return json.loads(b"".join(parts))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"the request body is not JSON: {err}", code="invalid_json") from None

    async def left_before(self, task: asyncio.Future[Any], timeout: float | None = None) -> bool:
        """Wait for ``task`` (at most ``timeout`` seconds); True if the client disconnected first (``task`` is
        left running). Call after the body has been read: nothing but a disconnect can arrive then."""
        if self._gone is None:
            self._gone = asyncio.ensure_future(self._disconnect())
        await asyncio.wait({task, self._gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return self._gone.done() and not task.done()

    async def _disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def close(self) -> None:
        """Stop watching for a disconnect."""
        if self._gone is not None:
            self._gone.cancel()

    async def answer(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        fields = [_JSON, (b"content-length", str(len(data)).encode())]
        fields += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await self._start(status, fields)
        await self._send({"type": "http.response.body", "body": data})

    async def refuse(self, err: APIError) -> None:
        await self.answer(err.status, err.body(), err.headers)

    async def open_stream(self) -> None:
        await self._start(200, _SSE_HEADERS)

    async def stream(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self) -> None:
        await self._send({"type": "http.response.body", "body": b""})

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        message: Message = {"type": "http.response.start", "status": status, "headers": headers}
        await self._send(message)


async def _chat(state: ServerState, exchange: _Exchange, scope: Scope, key: str) -> None:
    """``POST /v1/chat/completions``: check the request, wait for a slot, run, answer (JSON or SSE); every answer
    is counted in the metrics by model and status."""
    model, status = "(unknown)", 500
    try:
        body = await exchange.read_json(scope, state.limits.max_body_bytes)
        chat = parse_chat_request(body)
        served = state.pipelines.get(chat.model)
        model = served.name
        query = query_of(chat.messages, max_chars=state.limits.max_query_chars)
        lease = await state.pipelines.lease(served, chat, query)
        status = await _run_request(state, exchange, served, lease, query, chat=chat, key=key)
    except APIError as err:
        status = err.status
        if not exchange.started:
            await exchange.refuse(err)
    except _ClientLeft:
        status = _CLIENT_CLOSED
    except asyncio.CancelledError:
        status = _CLIENT_CLOSED if not state.draining else 503
        raise
    except Exception as err:
        logger.error("unhandled error", exc_info=err)
        if not exchange.started:
            await exchange.refuse(APIError(500, "internal error (logged by the server)", type="server_error"))
    finally:
        exchange.close()
        state.metrics.request(model, status)


async def _run_request(
    state: ServerState,
    exchange: _Exchange,
    served: Served,
    lease: Lease,
    query: Query,
    *,
    chat: ChatRequest,
    key: str,
) -> int:
    """Wait for a slot, start the run, and answer with its result (JSON) or its stream (SSE); returns the status
    (`_CLIENT_CLOSED` when the client left first)."""
    try:
        if chat.run_seed is not None:
            try:
                lease.pipeline.check_seed(chat.run_seed)
            except ConfigError as err:
                raise APIError(400, str(err), param="seed", code="unsupported_parameter") from None
        ticket = await _admit(state, exchange, key)
    except BaseException:
        await lease.release()
        raise
    if ticket is None:
        await lease.release()
        return _CLIENT_CLOSED
    state.metrics.waited(ticket.waited)
    trace_id = f"{_ids.getrandbits(96):024x}"
    state.record_owner(trace_id, key)
    job = RunJob(state, served, lease=lease, ticket=ticket, query=query, trace_id=trace_id, seed=chat.run_seed)
    completion_id, created = f"chatcmpl-{trace_id}", now()
    try:
        if chat.stream:
            usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return await _stream(state, exchange, job, completion_id, created, usage=usage,
                                 progress=chat.branchwise.progress)  # fmt: skip
        if await exchange.left_before(job.task):
            return _CLIENT_CLOSED
        result = _outcome(job)
        section = run_section(result, served.strategy, trace_id)
        await exchange.answer(200, completion_body(completion_id, served.name, created, result, section))
        return 200
    finally:
        job.cancel("shutdown" if state.draining else "disconnected")  # a no-op once the run has ended


async def _admit(state: ServerState, exchange: _Exchange, key: str) -> Ticket | None:
    """A run slot at once if one is free, else after waiting in line; None if the client left meanwhile.

    Raises:
        APIError: 429 (queue full, key at its limit) or 503 (draining).
    """
    admission = state.admission
    try:
        ticket = admission.try_acquire(key)
        if ticket is not None:
            return ticket
        waiting = asyncio.ensure_future(admission.acquire(key))
        try:
            left = await exchange.left_before(waiting)
        except BaseException:  # the server cancelled this request (shutdown)
            await _abandon(state, waiting)
            raise
        if left:
            await _abandon(state, waiting)
            return None
        return waiting.result()
    except Overloaded as err:
        state.metrics.rejection(err.reason)
        raise APIError(
            429, str(err), type="rate_limit_error", code=err.reason, headers={"Retry-After": str(err.retry_after)}
        ) from None
    except Draining as err:
        state.metrics.rejection("draining")
        raise APIError(503, str(err), type="server_error", code="server_shutting_down") from None


async def _abandon(state: ServerState, waiting: asyncio.Future[Ticket]) -> None:
    """Give up waiting for a slot: withdraw from the queue, or hand back a slot that was granted meanwhile."""
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    if not waiting.cancelled() and waiting.exception() is None:
        state.admission.release(waiting.result())


async def _stream(
    state: ServerState, exchange: _Exchange, job: RunJob, completion_id: str, created: int, *, usage: bool,
    progress: bool,
) -> int:  # fmt: skip
    """A streamed completion: the role at once, SSE comments while the run works (keep-alives, or its progress
    every `PROGRESS_S` when asked), then the answer, the finish reason with the ``branchwise`` section, the usage
    (if asked) and ``[DONE]``. A run that fails sends an error object instead. Returns 200, or `_CLIENT_CLOSED`
    if the client left (the caller cancels the run)."""
    model = job.served.name
    started = time.perf_counter()

    def chunk(delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return _event(completion_chunk(completion_id, model, created, delta, **extra))

    def comment() -> bytes:
        if not progress:
            return b": keep-alive\n\n"
        spent = job.budget.usage.snapshot()
        report = {"seconds": round(time.perf_counter() - started, 3), "calls": spent.calls}
        report |= {"prompt_tokens": spent.prompt_tokens, "completion_tokens": spent.completion_tokens}
        return b": progress " + json.dumps(report, separators=(",", ":")).encode() + b"\n\n"

    await exchange.open_stream()
    await exchange.stream(chunk({"role": "assistant", "content": ""}))
    while not job.task.done():
        if await exchange.left_before(job.task, PROGRESS_S if progress else state.limits.keepalive_s):
            return _CLIENT_CLOSED
        if not job.task.done():
            await exchange.stream(comment())
    try:
        result = _outcome(job)
    except APIError as err:
        events = [_event(err.body())]
    else:
        section = run_section(result, job.served.strategy, job.trace_id)
        events = [chunk({"content": result.answer or ""}), chunk({}, finish=finish_reason(result), section=section)]
        if usage:
            events.append(chunk(None, usage=usage_of(result)))
    await exchange.stream(b"".join(events) + b"data: [DONE]\n\n")
    await exchange.end_stream()
    return 200


async def _engine_gauges(engines: Sequence[Engine]) -> list[EngineGauges]:
    """The state of every engine that reports one (`VLLMEngine.engine_state`); one that cannot answer within
    `ENGINE_STATE_TIMEOUT_S` (busy loading, stopped) is left out."""
    out = []
    for index, engine in enumerate(engines):
        probe = getattr(engine, "engine_state", None)
        if probe is None:
            continue
        try:
            state = await asyncio.wait_for(probe(), ENGINE_STATE_TIMEOUT_S)
        except (BranchwiseError, TimeoutError):
            continue
        labels = (("engine", str(index)), ("model", engine.model))
        out.append(
            EngineGauges(labels, state.unfinished_requests, state.num_running, state.num_waiting, state.kv_cache_usage)
        )
    return out


def _outcome(job: RunJob) -> RunResult:
    """The finished run's result, or its failure as an `APIError`."""
    task = job.task
    if task.cancelled():
        raise APIError(
            503, "the run was cancelled: the server is shutting down", type="server_error", code="server_shutting_down"
        )
    err = task.exception()
    if err is None:
        return task.result()
    if isinstance(err, EngineUnavailable | EngineTimeout | RateLimited):
        raise APIError(503, f"{type(err).__name__}: {err}", type="server_error", code="engine_unavailable")
    if isinstance(err, BranchwiseError):
        raise APIError(500, f"the run failed: {type(err).__name__}: {err}", type="server_error", code="run_failed")
    logger.error("run %s failed", job.trace_id, exc_info=err)
    raise APIError(500, "internal error (logged by the server)", type="server_error", code="internal_error")


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _model_card(served: Served, created: int) -> dict[str, Any]:
    pipeline = served.pipeline
    return {
        "id": served.name,
        "object": "model",
        "created": created,
        "owned_by": "branchwise",
        "branchwise": {
            "description": served.spec.description,
            "strategy": served.strategy,
            "planner": served.spec.planner.kind if served.spec.planner else None,
            "engines": {role: {"backend": e.backend, "model": e.model} for role, e in pipeline.engines.items()},
        },
    }


# -- authentication and error bodies -------------------------------------------------------------------------------
def _bearer(scope: Scope) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return _error_response(err)


async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
    code = "not_found" if err.status_code == 404 else None
    return _error_response(APIError(err.status_code, str(err.detail), code=code, headers=err.headers))


async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {}
    return _error_response(APIError(400, f"invalid request: {first.get('msg', 'invalid value')}"))


async def _internal_error(_: Request, err: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=err)
    return _error_response(APIError(500, "internal error (logged by the server)", type="server_error"))
