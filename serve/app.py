"""The FastAPI application: OpenAI-compatible routes over loaded pipelines.

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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine.base import Engine
from ..errors import BranchwiseError, ConfigError, EngineTimeout, EngineUnavailable, RateLimited
from ..orchestrator.pipeline import RunResult
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

__all__ = ["OPEN_PATHS", "RunJob", "ServerState", "create_app"]

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
"""Routes answered without an API key (load balancers' probes); they say nothing about the pipelines."""
ANONYMOUS = "anonymous"
"""The key of every request when the server has no API keys."""
PROGRESS_S = 1.0
"""Seconds between the progress comments of a stream that asked for them."""
ENGINE_STATE_TIMEOUT_S = 5.0
"""How long ``/metrics`` waits for an engine's own state."""
_TRACE_ID = re.compile(r"[0-9a-f]{24}")
_CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; recorded, never received


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
        self.admission = Admission(self.limits)
        self.jobs: set[RunJob] = set()
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
        self.cancelled_at_deadline += len([job for job in self.jobs if not job.task.done()])
        for job in list(self.jobs):
            job.cancel("shutdown")

    async def shutdown(self) -> None:
        """Cancel every run still going and wait for them to end (their engine requests aborted); idempotent."""
        if self._deadline is not None:
            self._deadline.cancel()
        jobs = [job for job in self.jobs if not job.task.done()]
        self.cancelled_at_deadline += len(jobs)
        for job in jobs:
            job.cancel("shutdown")
        await asyncio.gather(*(job.task for job in jobs), return_exceptions=True)

    def owns(self, key: str, trace_id: str) -> bool:
        return self.trace_owners.get(trace_id) == key

    def record_owner(self, trace_id: str, key: str) -> None:
        self.trace_owners[trace_id] = key
        loop = asyncio.get_running_loop()
        while len(self.trace_owners) > self.limits.max_traces:  # the oldest run's trace goes, file and owner
            oldest, _ = self.trace_owners.popitem(last=False)
            loop.run_in_executor(None, _remove, self.trace_dir / f"{oldest}.jsonl")  # off the event loop


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
            self._run(query.text, state.trace_dir / f"{trace_id}.jsonl", seed), name=f"branchwise-serve-{trace_id}"
        )
        state.jobs.add(self)

    def cancel(self, reason: str) -> None:
        """Cancel the run (no-op once it ended); ``reason`` is its outcome in the metrics."""
        if not self.task.done():
            self.cancel_reason = self.cancel_reason or reason
            self.task.cancel()

    async def _run(self, query: str, trace: Path, seed: int | None) -> RunResult:
        started = time.perf_counter()
        outcome, result = "error", None
        try:
            # Creating a file can take a millisecond or more (seen: 0.5 ms in a crowded /tmp): not on the event loop.
            # The run then opens the empty file it finds.
            await asyncio.to_thread(trace.touch)
            result = await self.lease.pipeline.run(query, budget=self.budget, trace=trace, seed=seed)
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
            self.state.jobs.discard(self)
            await self.lease.release()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# -- the application -----------------------------------------------------------------------------------------------
def create_app(pipelines: PipelineSet, *, trace_dir: Path, api_keys: Sequence[str] = ()) -> FastAPI:
    """The ASGI application over ``pipelines`` (whose engines the caller starts and closes, see
    `branchwise.serve.runner.serve`).

    Args:
        pipelines: the loaded pipelines, with the server's limits.
        trace_dir: an existing folder for run traces.
        api_keys: keys a request must present (none: no authentication).
    """
    state = ServerState(pipelines, trace_dir)
    app = FastAPI(title="branchwise", summary="OpenAI-compatible chat completions over branchwise pipelines")
    app.state.server = state
    app.add_middleware(_ApiKeys, keys=tuple(api_keys))
    app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        model = "(unknown)"
        try:
            body = await _read_json(request, state.limits.max_body_bytes)
            chat = parse_chat_request(body)
            served = state.pipelines.get(chat.model)
            model = served.name
            query = query_of(chat.messages, max_chars=state.limits.max_query_chars)
            lease = await state.pipelines.lease(served, chat, query)
            response = await _run_request(state, request, served, lease, query, chat=chat)
        except APIError as err:
            state.metrics.request(model, err.status)
            raise
        state.metrics.request(model, response.status_code)
        return response

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(s, state.started) for s in state.pipelines.served.values()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return _model_card(state.pipelines.get(model), state.started)

    @app.get("/v1/traces/{trace_id}", response_model=None)
    async def get_trace(trace_id: str, request: Request) -> Response:
        path = state.trace_dir / f"{trace_id}.jsonl"
        if not _TRACE_ID.fullmatch(trace_id) or not state.owns(request.state.key, trace_id) or not path.is_file():
            raise APIError(404, f"no trace {trace_id!r} recorded for this API key", param="trace_id", code="not_found")
        return FileResponse(path, media_type="application/x-ndjson")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = state.metrics.render(await _engine_gauges(state.pipelines.engines))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app


async def _run_request(
    state: ServerState, request: Request, served: Served, lease: Lease, query: Query, *, chat: ChatRequest
) -> Response:
    """Wait for a slot, start the run, and answer with its result (JSON) or its stream (SSE)."""
    seed = chat.run_seed
    if seed is not None:
        try:
            lease.pipeline.check_seed(seed)
        except ConfigError as err:
            await lease.release()
            raise APIError(400, str(err), param="seed", code="unsupported_parameter") from None
    key = request.state.key
    admitted = asyncio.ensure_future(state.admission.acquire(key))
    try:
        left = await _client_left_first(request, admitted)
    except BaseException:  # the server cancelled this request (shutdown)
        await _abandon(state, admitted, lease)
        raise
    if left:
        await _abandon(state, admitted, lease)
        return Response(status_code=_CLIENT_CLOSED)
    try:
        ticket = admitted.result()
    except Overloaded as err:
        await lease.release()
        state.metrics.rejection(err.reason)
        raise APIError(
            429, str(err), type="rate_limit_error", code=err.reason, headers={"Retry-After": str(err.retry_after)}
        ) from None
    except Draining as err:
        await lease.release()
        state.metrics.rejection("draining")
        raise APIError(503, str(err), type="server_error", code="server_shutting_down") from None
    state.metrics.waited(ticket.waited)
    trace_id = uuid.uuid4().hex[:24]
    state.record_owner(trace_id, key)
    job = RunJob(state, served, lease=lease, ticket=ticket, query=query, trace_id=trace_id, seed=seed)
    completion_id, created = f"chatcmpl-{trace_id}", now()
    if chat.stream:
        usage = bool(chat.stream_options and chat.stream_options.include_usage)
        events = _sse(state, job, completion_id, created, usage=usage, progress=chat.branchwise.progress)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(_cancel_if_running, job),  # the stream may end before it began
        )
    try:
        if await _client_left_first(request, job.task):
            job.cancel("disconnected")
            return Response(status_code=_CLIENT_CLOSED)
    except asyncio.CancelledError:  # the server cancelled this request (shutdown)
        job.cancel("shutdown")
        raise
    result = _outcome(job)
    section = run_section(result, served.strategy, trace_id)
    return JSONResponse(completion_body(completion_id, served.name, created, result, section))


async def _sse(
    state: ServerState, job: RunJob, completion_id: str, created: int, *, usage: bool, progress: bool
) -> AsyncIterator[bytes]:
    """The chunks of a streamed completion: the role at once, SSE comments while the run works (keep-alives, or
    its progress every `PROGRESS_S` when asked), then the answer, the finish reason with the ``branchwise``
    section, the usage (if asked) and ``[DONE]``. A run that fails sends an error object instead. Closing the
    stream (the client left) cancels the run."""
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

    try:
        yield chunk({"role": "assistant", "content": ""})
        while not job.task.done():
            await asyncio.wait({job.task}, timeout=PROGRESS_S if progress else state.limits.keepalive_s)
            if not job.task.done():
                yield comment()
        try:
            result = _outcome(job)
        except APIError as err:
            yield _event(err.body())
        else:
            section = run_section(result, job.served.strategy, job.trace_id)
            yield chunk({"content": result.answer or ""})
            yield chunk({}, finish=finish_reason(result), section=section)
            if usage:
                yield chunk(None, usage=usage_of(result))
        yield b"data: [DONE]\n\n"
    finally:
        if not job.task.done():
            job.cancel("shutdown" if state.draining else "disconnected")


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


async def _abandon(state: ServerState, admitted: asyncio.Future[Ticket], lease: Lease) -> None:
    """Give up waiting for a slot: withdraw from the queue, or hand back a slot that was granted meanwhile."""
    admitted.cancel()
    await asyncio.gather(admitted, return_exceptions=True)
    if not admitted.cancelled() and admitted.exception() is None:
        state.admission.release(admitted.result())
    await lease.release()


async def _cancel_if_running(job: RunJob) -> None:
    job.cancel("shutdown" if job.state.draining else "disconnected")


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


async def _client_left_first(request: Request, task: asyncio.Future[Any]) -> bool:
    """Wait for ``task``; True if the client disconnected before it finished (``task`` is left running)."""
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    return not task.done()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: nothing else can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, read up to ``limit`` bytes.

    Raises:
        APIError: 413 for a larger body, 400 for one that is not JSON.
    """
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes", code="too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not JSON: {err}", code="invalid_json") from None


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
class _ApiKeys:
    """ASGI middleware: with keys configured, a request to any route but `OPEN_PATHS` needs a valid bearer key;
    the key's name (``key0``, ``key1``...; `ANONYMOUS` without keys) goes to ``request.state.key``."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        if not self.keys or scope["path"] in OPEN_PATHS:
            state["key"] = ANONYMOUS
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        matched = None
        for i, key in enumerate(self.keys):  # every key compared, each in constant time
            if hmac.compare_digest(given, key):
                matched = i
        if matched is None:
            message = "Incorrect API key provided" if given else "Missing API key: send 'Authorization: Bearer KEY'"
            err = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await _error_response(err)(scope, receive, send)
            return
        state["key"] = f"key{matched}"
        await self.app(scope, receive, send)


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
