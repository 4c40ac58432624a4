"""One HTTP request and its response, run in a task of its own under per-attempt timeouts.

Why a task of its own: httpcore cleans a connection up (marks it closed, returns it to the pool, closes the
socket) inside the read that a cancellation interrupts, and those clean-up steps await. A caller's task is
often cancelled twice in a row (a budget aborting a call and then closing it, a task group and a timeout, ...);
a second cancellation landing in that clean-up leaves the connection open and counted as in use forever, so the
server keeps generating and the pool eventually has no connection left. Here the caller never reads the socket
itself: the exchange's task reads ahead into a bounded buffer, is cancelled at most once, and `Exchange.aclose`
waits for its clean-up to finish however often the caller is cancelled meanwhile.

The timeouts of one attempt are enforced with one timer, re-armed lazily (a timer per chunk would cost a good
part of the client's time per token): the first byte (from sending the request to the response head), the idle
gap (no byte from the server while it is expected to send), and the whole call's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque

import httpx

from ..errors import EngineError, EngineRequestError, EngineTimeout, EngineUnavailable
from ._http_parse import describe

__all__ = ["Exchange", "Retryable"]

logger = logging.getLogger(__name__)

_HIGH_WATER = 1 << 20  # bytes read ahead of the consumer before reading pauses (keeps TCP flow control working)
_LOW_WATER = 1 << 16
_CLOSE_S = 5.0  # longest wait for a connection's clean-up; past it, it finishes in the background


class Retryable(Exception):
    """An attempt failed in a way another attempt may fix; ``error`` is what to raise if none is left.

    Attributes:
        error: the typed error for the caller.
        retry_after: the server's ``Retry-After`` in seconds, if it sent one.
        index: the base URL that failed (filled in by the code that chose it).
    """

    def __init__(
        self, error: EngineError, *, retry_after: float | None = None, cause: BaseException | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.index: int | None = None
        if cause is not None:
            self.__cause__ = cause


class Exchange:
    """Sends ``request`` on ``client`` at once and reads the response in a task owned by this object.

    Args:
        client: the HTTP client.
        request: the request to send (streamed response).
        url: the base URL, for messages.
        deadline: the whole call's deadline (event-loop time); past it, `response`/`read` raise TimeoutError.
        first_byte_s: longest wait from sending to the response head; then `Retryable` (`EngineTimeout`).
        idle_s: longest gap without a byte from the server while one is awaited; then `Retryable`.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closing",
        "_deadline",
        "_discard",
        "_eof",
        "_error",
        "_expired",
        "_first_byte_s",
        "_idle_s",
        "_last",
        "_loop",
        "_response",
        "_resume",
        "_started",
        "_stopping",
        "_task",
        "_timer",
        "_url",
        "_waiter",
    )

    def __init__(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        url: str,
        *,
        deadline: float,
        first_byte_s: float,
        idle_s: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._url = url
        self._deadline = deadline
        self._first_byte_s = first_byte_s
        self._idle_s = idle_s
        self._started = self._last = loop.time()
        self._response: httpx.Response | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._discard = False  # the consumer wants no more data: read to the end only to reuse the connection
        self._error: BaseException | None = None  # raised to the consumer once the buffered chunks are read
        self._expired = False  # the call's deadline passed
        self._stopping = False  # the task was cancelled (by us, once)
        self._closing = False  # the task is closing the response
        self._waiter: asyncio.Future[None] | None = None
        self._resume: asyncio.Future[None] | None = None
        self._task = loop.create_task(self._run(client, request), name=f"http-exchange[{url}]")
        self._timer: asyncio.TimerHandle | None = loop.call_at(min(deadline, self._started + first_byte_s), self._check)

    # -- the consumer's side --------------------------------------------------------------------------------------
    async def response(self) -> httpx.Response:
        """The response once its head has arrived."""
        while self._response is None:
            self._raise_if_failed()
            await self._wait()
        return self._response

    async def read(self) -> bytes | None:
        """The next chunk of the body, None at its end."""
        while True:
            if self._expired:
                raise TimeoutError
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._resume is not None and self._buffered <= _LOW_WATER and not self._resume.done():
                    self._resume.set_result(None)
                return chunk
            if self._eof:
                return None
            self._raise_if_failed()
            await self._wait()

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, cut at ``limit`` bytes."""
        body = bytearray()
        while len(body) <= limit and (chunk := await self.read()) is not None:
            body += chunk
        return bytes(body[:limit])

    async def drain(self, seconds: float) -> None:
        """Let the rest of the body arrive for up to ``seconds`` (and the call's deadline), discarding it.

        A response read to its end leaves its connection in the pool for reuse; one cut short is dropped.
        """
        self._discard = True
        self._chunks.clear()
        self._buffered = 0
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        left = min(seconds, self._deadline - self._loop.time())
        if left > 0 and not self._task.done():
            await asyncio.wait((self._task,), timeout=left)

    async def aclose(self) -> None:
        """Stop reading and wait for the connection's clean-up, even if the caller is cancelled meanwhile.

        Re-raises a cancellation received while waiting, once the clean-up is done (or after `_CLOSE_S`).
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop()
        task = self._task
        interrupted = False
        until = self._loop.time() + _CLOSE_S
        while not task.done():
            left = until - self._loop.time()
            if left <= 0:
                logger.warning(
                    "closing the connection to %s took over %.0f s; it finishes in the background", self._url, _CLOSE_S
                )
                break
            try:
                await asyncio.wait((task,), timeout=left)
            except asyncio.CancelledError:
                interrupted = True
        if interrupted:
            raise asyncio.CancelledError

    def _raise_if_failed(self) -> None:
        if self._expired:
            raise TimeoutError
        if self._error is not None:
            raise self._error
        if self._task.done():
            raise Retryable(EngineUnavailable(f"the response from {self._url} ended unexpectedly"))

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the exchange's task ----------------------------------------------------------------------------------------
    async def _run(self, client: httpx.AsyncClient, request: httpx.Request) -> None:
        url = self._url
        try:
            response = await client.send(request, stream=True)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            return
        except httpx.TransportError as err:
            self._fail(Retryable(EngineUnavailable(f"cannot reach {url}: {describe(err)}"), cause=err))
            return
        except Exception as err:  # handed to the consumer, who raises it
            if client.is_closed:  # httpx raises RuntimeError for a client closed under the call
                err = Retryable(EngineUnavailable(f"the HTTP client was closed: {describe(err)}"), cause=err)
            self._fail(err)
            return
        self._response = response
        self._last = self._loop.time()
        self._wake()
        try:
            await self._read_body(response)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except httpx.TransportError as err:
            self._fail(Retryable(EngineUnavailable(f"connection to {url} lost: {describe(err)}"), cause=err))
        except httpx.HTTPError as err:
            self._fail(EngineRequestError(f"unreadable response from {url}: {describe(err)}"))
        except Exception as err:  # handed to the consumer, who raises it
            self._fail(err)
        finally:
            # Never cancelled from here on (see `_stop`): an interrupted close is what leaks connections.
            self._closing = True
            try:
                await response.aclose()
            except httpx.HTTPError as err:  # the connection is being discarded anyway
                logger.debug("closing the response from %s failed: %s", url, describe(err))
            self._wake()

    async def _read_body(self, response: httpx.Response) -> None:
        loop = self._loop
        # The raw stream, not `aiter_bytes`: that one closes the response itself at the end of the body, inside
        # the iteration, where a cancellation could interrupt the close. Requests ask for no content encoding;
        # a server that encodes anyway is decoded by httpx.
        stream = response.stream
        encoded = response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")
        chunks = response.aiter_bytes() if encoded or not isinstance(stream, httpx.AsyncByteStream) else stream
        async for chunk in chunks:
            self._last = loop.time()
            if self._discard or not chunk:
                continue
            self._chunks.append(chunk)
            self._buffered += len(chunk)
            self._wake()
            if self._buffered > _HIGH_WATER:
                self._resume = loop.create_future()
                try:
                    await self._resume
                finally:
                    self._resume = None
                self._last = loop.time()  # the server could not send while we did not read
        self._eof = True

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._eof:
            self._error = error
            self._stop()
        self._wake()

    def _stop(self) -> None:
        """Cancel the task, at most once and never while it closes the response."""
        if not self._stopping and not self._closing and not self._task.done():
            self._stopping = True
            self._task.cancel()

    def _check(self) -> None:
        """The timer: expire the call, or fail the attempt on a first-byte or idle timeout, or re-arm."""
        self._timer = None
        now = self._loop.time()
        if now >= self._deadline:
            self._expired = True
            self._stop()
            self._wake()
            return
        due = math.inf
        if not self._task.done() and self._error is None:
            if self._response is None:
                due = self._started + self._first_byte_s
                if now >= due:
                    limit = f"first_byte_timeout_s={self._first_byte_s:g} s"
                    self._fail(Retryable(EngineTimeout(f"{self._url} sent no response head within {limit}")))
                    due = math.inf
            elif self._resume is None:
                due = self._last + self._idle_s
                if now >= due:
                    limit = f"idle_timeout_s={self._idle_s:g} s"
                    self._fail(Retryable(EngineTimeout(f"{self._url} sent nothing for {limit}")))
                    due = math.inf
        self._timer = self._loop.call_at(min(self._deadline, due), self._check)
