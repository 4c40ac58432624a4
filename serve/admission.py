"""Admission of runs: at most ``max_concurrent_runs`` at once, a bounded first-come-first-served queue behind them,
and at most ``max_runs_per_key`` running or waiting for one API key.

A request that finds the queue full, or its key at its limit, is refused at once (`Overloaded`: HTTP 429 with a
``Retry-After`` estimated from recent run times); one that waits is woken when a slot frees (no polling). When
the server starts draining, waiting requests are refused (`Draining`: 503) and no new run starts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from .limits import ServerLimits

__all__ = ["Admission", "Draining", "Overloaded", "Ticket"]


class Overloaded(Exception):
    """Too many runs: the queue is full or the key is at its limit.

    Attributes:
        reason: ``queue_full`` or ``key_limit``.
        retry_after: whole seconds after which a retry may be admitted.
    """

    def __init__(self, reason: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and starts no new run."""


@dataclass
class Ticket:
    """A run slot, held from admission until `Admission.release`."""

    key: str
    waited: float
    released: bool = False


class Admission:
    """Run slots, the queue in front of them, and per-key counts.

    Args:
        limits: ``max_concurrent_runs``, ``max_queued`` and ``max_runs_per_key`` are used.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._per_key: Counter[str] = Counter()
        self._draining = False
        self._mean_run_s = 1.0  # exponentially weighted mean of run times, for Retry-After

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def try_acquire(self, key: str) -> Ticket | None:
        """A run slot if one is free now and nobody waits for one; None if the request has to queue (`acquire`).

        Raises:
            Overloaded: ``key`` already has ``max_runs_per_key`` runs running or waiting.
            Draining: the server is shutting down.
        """
        if self._draining:
            raise Draining("the server is shutting down")
        if self._per_key[key] >= self.limits.max_runs_per_key:
            raise Overloaded(
                "key_limit",
                self._retry_after(1),
                f"this API key already has {self._per_key[key]} runs running or waiting, the server's limit",
            )
        if self.running < self.limits.max_concurrent_runs and not self._waiting:
            self.running += 1
            self._per_key[key] += 1
            return Ticket(key, 0.0)
        return None

    async def acquire(self, key: str) -> Ticket:
        """Wait for a run slot (`try_acquire` first, then in line).

        Raises:
            Overloaded: the queue is full or ``key`` already has ``max_runs_per_key`` runs running or waiting.
            Draining: the server is shutting down (also raised to requests already waiting when it starts).
        """
        now = self.try_acquire(key)
        if now is not None:
            return now
        arrived = time.perf_counter()
        if len(self._waiting) >= self.limits.max_queued:
            raise Overloaded(
                "queue_full",
                self._retry_after(len(self._waiting) + 1),
                f"the server is busy: {self.running} runs running and {len(self._waiting)} waiting, its limit",
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        self._per_key[key] += 1
        try:
            await turn  # set by `release` with the slot already counted as ours, or failed by `drain`
        except BaseException:
            self._per_key[key] -= 1
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release_slot()  # the slot was handed over as we were cancelled: pass it on
            else:
                self._remove(turn)
            raise
        return Ticket(key, time.perf_counter() - arrived)

    def release(self, ticket: Ticket, run_seconds: float | None = None) -> None:
        """Give a slot back (idempotent); ``run_seconds`` updates the Retry-After estimate."""
        if ticket.released:
            return
        ticket.released = True
        self._per_key[ticket.key] -= 1
        if self._per_key[ticket.key] <= 0:
            del self._per_key[ticket.key]
        if run_seconds is not None:
            self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * run_seconds
        self._release_slot()

    def drain(self) -> None:
        """Refuse every waiting request and every later one."""
        self._draining = True
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(Draining("the server is shutting down"))

    def _release_slot(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next request in line
                return
        self.running -= 1

    def _remove(self, turn: asyncio.Future[None]) -> None:
        try:
            self._waiting.remove(turn)
        except ValueError:
            pass

    def _retry_after(self, ahead: int) -> int:
        """Seconds until ``ahead`` more runs have likely finished at the current concurrency (at least 1)."""
        rounds = ahead / self.limits.max_concurrent_runs
        return max(1, min(600, math.ceil(rounds * self._mean_run_s)))
