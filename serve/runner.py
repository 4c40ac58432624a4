"""Running the server: bind the port, start every engine, serve with uvicorn, drain on SIGTERM / Ctrl-C, close.

The order matters: the socket is bound first (a port in use fails at once, before any model loads), the engines
start next, and only then does the socket listen, so a client never reaches a server whose models are loading.
SIGTERM or Ctrl-C starts the drain: the socket closes, waiting requests get 503, `/health` answers 503, runs in
flight get ``drain_timeout_s`` to finish and are then cancelled (their engine requests aborted); a second Ctrl-C
stops at once. Engines are closed whichever way the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from ..errors import ConfigError
from .app import ServerState, create_app
from .pipelines import PipelineSet

__all__ = ["BranchwiseServer", "is_loopback"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BranchwiseServer:
    """One server over loaded pipelines.

    Args:
        pipelines: the pipelines (their engines are started by `serve` and closed when it returns).
        host: the address to bind; a non-loopback one needs ``api_keys``.
        port: the port (0: a free one, see `url` once bound).
        api_keys: keys clients must present; none for an open server on a loopback address.
        trace_dir: an existing folder for run traces.
        access_log: log every request (uvicorn's access log).

    Raises:
        ConfigError: a non-loopback host without API keys, or a port that cannot be bound.
    """

    def __init__(
        self,
        pipelines: PipelineSet,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_keys: Sequence[str] = (),
        trace_dir: Path,
        access_log: bool = False,
    ) -> None:
        if not api_keys and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve on {host!r} without an API key: anyone who can reach it could run the pipelines. "
                "Give --api-key (or BRANCHWISE_API_KEYS), or bind 127.0.0.1"
            )
        self.pipelines = pipelines
        self.app = create_app(pipelines, trace_dir=trace_dir, api_keys=api_keys)
        self.state: ServerState = self.app.state
        self.host = host
        self.socket = _bind(host, port)
        drain = pipelines.limits.drain_timeout_s
        config = uvicorn.Config(
            self.app,
            lifespan="off",  # engines are started and closed around `serve`, whichever way it ends
            ws="none",
            log_config=None,
            access_log=access_log,
            timeout_graceful_shutdown=int(drain) + 5,  # a backstop: runs are cancelled at the drain deadline
        )
        self._server = _Uvicorn(config, self.state)

    @property
    def url(self) -> str:
        """The server's root URL (the OpenAI base URL is this plus ``/v1``)."""
        address, port = self.socket.getsockname()[:2]
        return f"http://{f'[{address}]' if ':' in address else address}:{port}"

    @property
    def signalled(self) -> bool:
        """SIGTERM or Ctrl-C stopped the server."""
        return self._server.signalled

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Start the engines, listen, and serve until stopped; then cancel what is left and close everything.

        Args:
            on_ready: called once the port is listening.
        """
        try:
            await self.pipelines.start()
            self._server.on_ready = on_ready
            await self._server.serve(sockets=[self.socket])
        finally:
            await self.state.shutdown()
            await self.pipelines.aclose()
            self.socket.close()

    def stop(self) -> None:
        """Start the drain and stop, as SIGTERM does (callable from any thread)."""
        self._server.request_exit()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling the app when the drain starts and leaving signals handled once it returns."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.signalled = False
        self.on_ready: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def request_exit(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.state.begin_drain)
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signalled = True
        if self._loop is not None:  # a signal handler must not touch the loop's objects: schedule it
            self._loop.call_soon_threadsafe(self.state.begin_drain)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own re-raises the signal after a graceful stop, which would interrupt closing the engines; the
        # caller learns of it from `signalled` instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` but not yet listening.

    Raises:
        ConfigError: the address cannot be resolved or bound (in use, not this machine's).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise ConfigError(f"cannot resolve host {host!r}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock
