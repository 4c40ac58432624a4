"""A pool of Ray actors, one per engine replica, and the fault-tolerant loop that spreads items over them.

Each actor serves ``concurrency`` items at a time. The driver awaits every actor call as an asyncio future (an
`ObjectRef` is awaitable), so nothing blocks its event loop, and hands each result to a callback as it arrives.

Faults: when an actor dies (killed, out of memory, node lost) every item it had in flight is put back on the
queue for the other actors, and a replacement actor is started while restarts remain. An item that was in flight
on ``max_tries`` actors that died is given up (the callback ``on_lost`` gets the reason): a problem that kills
its worker every time must not take the whole fleet down. Cancelling the loop (Ctrl-C) cancels the actor calls
in flight (`ray.cancel`, which cancels the call's coroutine on the actor, down to its engine requests); leaving
the pool kills the actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..errors import ConfigError, EngineUnavailable

__all__ = ["INSTALL_HINT", "ReplicaOptions", "ReplicaPool", "connect", "require_ray"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'branchwise[distributed]'"
"""How to get Ray."""

T = TypeVar("T")
R = TypeVar("R")

MAX_REPLICAS = 4096
STOP_TIMEOUT_S = 30.0
"""Seconds the actors get to close their engines before they are killed."""


def require_ray() -> Any:
    """The ``ray`` module; `ConfigError` naming the extra to install when it is missing."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(f"distributed runs need Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


def connect(address: str | None = None, **init: Any) -> bool:
    """Join the Ray cluster at ``address`` ("auto": the one this node belongs to; None: the one ``RAY_ADDRESS``
    names or this machine runs, else a cluster of this machine started for the process), unless this process is
    connected already. Returns True when it connected (then ``ray.shutdown()`` is the caller's). Blocking: call it
    before the event loop runs (the CLI does), or from a worker thread."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, **init}
    try:
        ray.init(address=address, **options)
    except ConnectionError as err:
        raise EngineUnavailable(f"cannot join the Ray cluster at {address!r}: {err}") from err
    return True


@dataclass(frozen=True)
class ReplicaOptions:
    """How many engine replicas, where Ray places them, and how faults are handled.

    Attributes:
        replicas: actors to start (each builds its own engines).
        num_cpus: CPUs Ray reserves for each actor.
        num_gpus: GPUs Ray reserves for each actor (vLLM on the actor sees only those).
        resources: other Ray resources each actor needs (e.g. ``{"node:10.0.0.5": 0.01}`` pins a node).
        concurrency: items one actor works on at once.
        max_tries: an item in flight on this many actors that died is given up.
        max_restarts: replacement actors started after deaths, in all (None: as many as ``replicas``).
        env: environment variables of the actors' processes.
    """

    replicas: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    concurrency: int = 4
    max_tries: int = 3
    max_restarts: int | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigError(f"replicas must be in 1..{MAX_REPLICAS}, got {self.replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or any(v < 0 for v in self.resources.values()):
            raise ConfigError("replica resources must be >= 0")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_tries < 1:
            raise ConfigError(f"max_tries must be >= 1, got {self.max_tries}")
        if self.max_restarts is not None and self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be >= 0, got {self.max_restarts}")


class _Stop(Exception):
    """A result callback asked for no more items."""


@dataclass
class _Actor:
    handle: Any
    name: str
    dead: bool = False


class ReplicaPool(Generic[T, R]):
    """Actors made by ``make``, each started by ``start`` (its result, e.g. the engines it built, is in
    ``started``); use as ``async with pool:``, then `map` items over them.

    Args:
        options: replicas, placement and fault handling.
        make: creates one actor from Ray actor options (``num_cpus``, ``num_gpus``, ``resources``,
            ``runtime_env``); e.g. ``lambda **o: Worker.options(**o).remote()``.
        start: the call that readies an actor (builds its engines); awaited before the actor gets items.
        stop: the call that lets a live actor release what it holds (closes its engines) before it is killed;
            given ``STOP_TIMEOUT_S`` seconds.
    """

    def __init__(
        self,
        options: ReplicaOptions,
        make: Callable[..., Any],
        start: Callable[[Any], Any],
        stop: Callable[[Any], Any] | None = None,
    ) -> None:
        self.options = options
        self._make, self._start, self._stop = make, start, stop
        self.actors: list[_Actor] = []
        self.started: list[Any] = []
        self.restarts_left = options.replicas if options.max_restarts is None else options.max_restarts
        self.deaths = 0
        self._count = 0

    async def __aenter__(self) -> ReplicaPool[T, R]:
        require_ray()
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.options.replicas):
                    group.create_task(self._spawn())
        except ExceptionGroup as failed:  # e.g. an engine that cannot start: as itself
            await self.close()
            raise _first_leaf(failed) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _spawn(self) -> _Actor:
        o = self.options
        actor_options: dict[str, Any] = {"num_cpus": o.num_cpus, "num_gpus": o.num_gpus}
        if o.resources:
            actor_options["resources"] = dict(o.resources)
        if o.env:
            actor_options["runtime_env"] = {"env_vars": dict(o.env)}
        self._count += 1
        actor = _Actor(self._make(**actor_options), f"replica-{self._count}")
        self.actors.append(actor)
        try:
            self.started.append(await _call(self._start(actor.handle)))
        except BaseException:
            actor.dead = True
            _kill(actor)
            raise
        logger.info("%s ready", actor.name)
        return actor

    async def close(self) -> None:
        """Let the live actors close their engines (``stop``, bounded), then kill every actor."""
        live = [actor for actor in self.actors if not actor.dead]
        if self._stop is not None and live:
            # Bounded and shielded: this also runs while Ctrl-C cancels the driver, and the kill follows anyway.
            stops = asyncio.gather(*(_call(self._stop(a.handle)) for a in live), return_exceptions=True)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(stops), STOP_TIMEOUT_S)
        for actor in self.actors:
            _kill(actor)
            actor.dead = True
        self.actors = []

    async def map(
        self,
        items: Sequence[T],
        submit: Callable[[Any, T], Any],
        on_result: Callable[[T, R], Awaitable[bool]],
        on_lost: Callable[[T, str], Awaitable[bool]],
    ) -> bool:
        """Run every item on some actor (``submit(actor, item)`` makes the call) and await ``on_result(item,
        result)`` for each as it arrives, or ``on_lost(item, reason)`` for one given up after actors died under
        it. Returns True when a callback returned False (the rest were cancelled), else False once all are done.

        Raises:
            EngineUnavailable: every actor died and no restart is left, with items still to run.
            The error an actor call raised, as itself (e.g. an engine that cannot start).
        """
        ray = require_ray()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        for index in range(len(items)):
            queue.put_nowait(index)
        state = {"outstanding": len(items)}
        tries = [0] * len(items)
        if not items:
            return False

        def settle() -> None:
            state["outstanding"] -= 1
            if state["outstanding"] == 0:
                queue.put_nowait(None)  # wakes the idle slots; each passes it on

        async def slot(actor: _Actor) -> None:
            while True:
                index = await queue.get()
                if index is None:
                    queue.put_nowait(None)
                    return
                if actor.dead:  # the item never reached the actor: no blame
                    queue.put_nowait(index)
                    return
                item = items[index]
                ref = submit(actor.handle, item)
                try:
                    result = await _call(ref)
                except asyncio.CancelledError:
                    ray.cancel(ref)  # the call's coroutine on the actor is cancelled, down to its engine requests
                    raise
                except ray.exceptions.RayActorError as err:
                    died_now = not actor.dead
                    actor.dead = True
                    if died_now:
                        self.deaths += 1
                        logger.warning("%s died: %s", actor.name, _first_line(err))
                    tries[index] += 1
                    if tries[index] < self.options.max_tries:
                        queue.put_nowait(index)
                        return
                    reason = f"ReplicaLost: in flight on {tries[index]} Ray actors that died (last: {_first_line(err)})"
                    keep_going = await on_lost(item, reason)
                    settle()
                    if not keep_going:
                        raise _Stop from None
                    return
                keep_going = await on_result(item, result)
                settle()
                if not keep_going:
                    raise _Stop

        async def serve(actor: _Actor | None) -> None:
            while True:
                if actor is None:
                    if self.restarts_left <= 0 or state["outstanding"] == 0:
                        return
                    self.restarts_left -= 1
                    try:
                        actor = await self._spawn()
                    except ray.exceptions.RayActorError as err:
                        logger.warning("a replacement replica died while starting: %s", _first_line(err))
                        continue
                async with asyncio.TaskGroup() as group:
                    for _ in range(self.options.concurrency):
                        group.create_task(slot(actor))
                if not actor.dead or state["outstanding"] == 0:
                    return
                actor = None  # it died: start a replacement while restarts remain

        try:
            async with asyncio.TaskGroup() as group:
                for actor in [a for a in self.actors if not a.dead]:
                    group.create_task(serve(actor))
        except ExceptionGroup as failed:
            # A stop asked for by a callback, or an error (e.g. an engine that cannot start): as itself.
            first = _first_leaf(failed)
            if isinstance(first, _Stop):
                return True
            raise first from None
        finally:
            self.actors = [a for a in self.actors if not a.dead]
        if state["outstanding"]:
            raise EngineUnavailable(
                f"every Ray replica died ({self.deaths} deaths, no restart left) with {state['outstanding']} "
                "items not done; finished results are kept"
            )
        return False


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


async def _call(ref: Any) -> Any:
    """Await an actor call; an error raised by the call's code is raised as itself (not as Ray's wrapper)."""
    import ray

    try:
        return await ref
    except ray.exceptions.RayTaskError as err:
        cause = err.cause
        if isinstance(cause, BaseException) and not isinstance(cause, ray.exceptions.RayActorError):
            raise cause from None
        raise


def _kill(actor: _Actor) -> None:
    import ray

    with contextlib.suppress(Exception):  # already gone (dead, or its node lost) is what we want
        ray.kill(actor.handle, no_restart=True)
