"""A fault-injecting OpenAI-compatible HTTP/1.1 server for tests: real sockets on 127.0.0.1, an ephemeral port.

Each request is answered by the next scripted behaviour (`FaultServer.push`; `FaultServer.default` when the
script is empty): a JSON reply, an SSE stream, an error status with ``Retry-After``, a connection reset in the
middle of a stream, a server that accepts and never answers, a slow trickle, a non-JSON body, a stream that ends
without ``[DONE]``. The server records every request and every connection: when it opened, when it closed and
who closed it, and whether a response is in progress on it, so tests can check what the server saw.

Fixtures (marker ``server``): ``fault_server`` and ``fault_server_b`` (a second, independent server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest_asyncio

__all__ = [
    "Behaviour",
    "Connection",
    "FaultServer",
    "Received",
    "chat_event",
    "completion_json",
    "drop",
    "error",
    "fault_server",
    "fault_server_b",
    "gated",
    "hang",
    "non_json",
    "reply",
    "reset_after",
    "sse",
    "stream_text",
    "text_event",
    "trickle",
    "usage_event",
]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    arrived: float
    connection: int


@dataclass
class Connection:
    """One TCP connection as the server saw it."""

    id: int
    opened: float
    closed: float | None = None
    closed_by: str | None = None  # "client" (EOF or reset seen) or "server"
    busy: bool = False  # a response is in progress
    requests: int = 0


Behaviour = Callable[[Received, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one request; returns False to close the connection afterwards."""


class ClientGone(Exception):
    """The client closed the connection while a behaviour was waiting or writing."""


class _ClientLeft(Exception):
    """The client closed the connection (between requests, or in the middle of a response)."""


class FaultServer:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.connections: list[Connection] = []
        self.script: deque[Behaviour] = deque()
        self.default: Behaviour | None = None
        self.disconnected = asyncio.Event()  # a client closed a connection in the middle of a response
        self.arrived = asyncio.Event()  # set on every request (clear it to wait for the next one)
        self._changed = asyncio.Event()  # set whenever a connection opens or closes
        self._handlers: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._stopping = False
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def open_connections(self) -> list[Connection]:
        return [c for c in self.connections if c.closed is None]

    @property
    def handler_tasks(self) -> set[asyncio.Task[None]]:
        """The server's own tasks (one per open connection), to tell them from the client's."""
        return set(self._handlers)

    @property
    def busy_connections(self) -> list[Connection]:
        """Connections with a response in progress (a request the server still works on)."""
        return [c for c in self.connections if c.closed is None and c.busy]

    def push(self, *behaviours: Behaviour) -> None:
        self.script.extend(behaviours)

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Wait until ``condition()`` holds (checked whenever a connection opens or closes)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._stopping = True
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = Connection(len(self.connections) + 1, time.monotonic())
        self.connections.append(conn)
        self._changed.set()
        closed_by = "server"
        try:
            await self._serve(conn, reader, writer)
        except _ClientLeft:
            closed_by = "client"
        except asyncio.CancelledError:
            # The server is shutting down; ending normally keeps asyncio from logging the cancelled handler.
            if not self._stopping:
                raise
        finally:
            conn.closed = time.monotonic()
            conn.closed_by = closed_by
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)
            self._changed.set()

    async def _serve(self, conn: Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                req = await self._read_request(reader, conn)
            except (asyncio.IncompleteReadError, ConnectionError):
                raise _ClientLeft from None  # the client went away between requests
            behaviour = self.script.popleft() if self.script else self.default
            assert behaviour is not None, f"unscripted request {req.method} {req.path}"
            conn.busy = True
            try:
                keep = await behaviour(req, reader, writer)
            except (ClientGone, ConnectionError):
                self.disconnected.set()
                raise _ClientLeft from None
            conn.busy = False
            if not keep:
                return

    async def _read_request(self, reader: asyncio.StreamReader, conn: Connection) -> Received:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        body = json.loads(raw) if raw else None
        conn.requests += 1
        req = Received(method, path, headers, body, time.monotonic(), conn.id)
        self.requests.append(req)
        self.arrived.set()
        return req


async def _until_client_leaves(reader: asyncio.StreamReader) -> None:
    while await reader.read(1024):
        pass


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    if writer.is_closing():
        raise ClientGone
    writer.write(data)
    await writer.drain()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _events(events: Sequence[Any], done: bool) -> list[bytes]:
    payloads = [e if isinstance(e, str) else f"data: {json.dumps(e)}\n\n" for e in events]
    if done:
        payloads.append("data: [DONE]\n\n")
    return [p.encode() for p in payloads]


# -- behaviours ---------------------------------------------------------------------------------------------------
def reply(
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> Behaviour:
    """A complete response with a Content-Length body (JSON of ``body``, or ``raw`` bytes)."""

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        payload = raw if raw is not None else json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n{extra}\r\n"
        await _send(writer, head.encode() + payload)
        return True

    return behave


def error(status: int, message: str = "boom", retry_after: str | None = None) -> Behaviour:
    """An OpenAI-style error body with ``status`` (and ``Retry-After`` when given)."""
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return reply({"error": {"message": message, "type": "Err", "code": status}}, status=status, headers=headers)


def non_json(text: str = "<html><body>502 Bad Gateway</body></html>") -> Behaviour:
    """A 200 answer whose body is not JSON (a proxy's page)."""
    return reply(None, raw=text.encode(), content_type="text/html")


def sse(
    events: Sequence[Any],
    *,
    done: bool = True,
    then: str = "end",
    gate: asyncio.Event | None = None,
    server: FaultServer | None = None,
) -> Behaviour:
    """Stream ``events`` (dicts, or raw strings sent as they are) as chunked server-sent events.

    done: send ``data: [DONE]`` after the events (only when ``then`` is "end").
    then: "end" finishes the response; "drop" closes the socket mid-response; "reset" resets the connection
        (RST); "wait" keeps the response open until the client disconnects (recorded on ``server.disconnected``).
    """

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if gate is not None:
            await gate.wait()
        await _send(writer, _SSE_HEAD)
        for data in _events(events, done and then == "end"):
            await _send(writer, _chunk(data))
        if then == "drop":
            return False
        if then == "reset":
            _reset(writer)
            return False
        if then == "wait":
            await _until_client_leaves(reader)
            if server is not None:
                server.disconnected.set()
            raise ClientGone
        await _send(writer, b"0\r\n\r\n")
        return True

    return behave


def reset_after(events: Sequence[Any]) -> Behaviour:
    """Send the SSE head and ``events``, then reset the connection (TCP RST) in the middle of the stream."""
    return sse(events, then="reset")


def trickle(events: Sequence[Any], *, delay: float, done: bool = True, bytes_per_write: int = 8) -> Behaviour:
    """Stream ``events`` a few bytes at a time with ``delay`` seconds between writes (a slow or stalling server)."""

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await _send(writer, _SSE_HEAD)
        for data in _events(events, done):
            for k in range(0, len(data), bytes_per_write):
                await asyncio.sleep(delay)
                await _send(writer, _chunk(data[k : k + bytes_per_write]))
        await _send(writer, b"0\r\n\r\n")
        return True

    return behave


def hang(server: FaultServer | None = None) -> Behaviour:
    """Accept the request and never answer (until the client gives up and closes the connection)."""

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await _until_client_leaves(reader)
        if server is not None:
            server.disconnected.set()
        raise ClientGone

    return behave


def drop(partial: bytes = b"") -> Behaviour:
    """Close the connection after sending ``partial`` (e.g. headers promising a longer body)."""

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await _send(writer, partial)
        return False

    return behave


def gated(gate: asyncio.Event, inner: Behaviour, started: asyncio.Event | None = None) -> Behaviour:
    """Wait for ``gate`` before behaving like ``inner`` (``started`` is set when the request arrives)."""

    async def behave(req: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if started is not None:
            started.set()
        await gate.wait()
        return await inner(req, reader, writer)

    return behave


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # A zero linger time makes close send RST instead of FIN: the client sees "connection reset".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- response builders --------------------------------------------------------------------------------------------
def text_event(index: int, text: str, ids: list[int] | None = None, finish: str | None = None, **extra: Any) -> dict:
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    choice.update(extra)
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}


def chat_event(
    index: int, content: str | None, ids: list[int] | None = None, finish: str | None = None, **extra: Any
) -> dict:
    delta = {} if content is None else {"content": content}
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    choice.update(extra)
    return {"id": "chat-1", "object": "chat.completion.chunk", "model": "m", "choices": [choice]}


def usage_event(prompt: int, completion: int) -> dict:
    return {"id": "x", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def completion_json(texts: Sequence[str], *, prompt: int = 7, with_ids: bool = True) -> dict:
    choices = []
    for i, t in enumerate(texts):
        c: dict[str, Any] = {"index": i, "text": t, "logprobs": None, "finish_reason": "length"}
        if with_ids:
            c["token_ids"] = list(range(100, 100 + len(t.split())))
        choices.append(c)
    completion = sum(len(t.split()) for t in texts)
    return {"choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def stream_text(words: Sequence[str], *, prompt: int = 5) -> list[dict]:
    events = [text_event(0, w, ids=[200 + k]) for k, w in enumerate(words)]
    events[-1]["choices"][0]["finish_reason"] = "stop"
    return [*events, usage_event(prompt, len(words))]


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest_asyncio.fixture
async def fault_server() -> AsyncIterator[FaultServer]:
    srv = FaultServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest_asyncio.fixture
async def fault_server_b() -> AsyncIterator[FaultServer]:
    srv = FaultServer()
    await srv.start()
    yield srv
    await srv.close()
