"""One engine call in flight under a budget: its accounting, its engine task and its delivery buffer."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

from ..engine.base import CallMeter
from ..engine.types import Delta, GenerationRequest
from ..errors import BudgetExhausted
from .cost import CostModel

__all__ = ["Call"]

L = TypeVar("L")
"""The budgets the call is charged to (a `Budget`; generic so this module need not import it)."""


class Call(Generic[L]):
    """One engine call in flight under a budget: its accounting, its engine task and its delivery buffer."""

    __slots__ = (
        "abort",
        "buffer",
        "chain",
        "completed",
        "completion_tokens",
        "cost_model",
        "done",
        "error",
        "finished",
        "meter",
        "prompt_charged",
        "request",
        "reserved",
        "reserved_cost",
        "sample_tokens",
        "settled",
        "task",
        "unfinished",
        "waiter",
    )

    def __init__(
        self,
        chain: tuple[L, ...],
        request: GenerationRequest,
        cost_model: CostModel | None,
        reserved: int,
        reserved_cost: float,
    ) -> None:
        self.chain = chain
        self.request = request
        self.cost_model = cost_model
        self.reserved = reserved  # prompt tokens held for the call until the backend reports the real count
        self.reserved_cost = reserved_cost
        self.meter = CallMeter()
        self.prompt_charged = False
        self.sample_tokens = [0] * request.n
        self.finished = [False] * request.n
        self.unfinished = request.n
        self.completion_tokens = 0
        self.buffer: deque[Delta] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.abort: BudgetExhausted | None = None
        self.error: Exception | None = None
        self.done = False
        self.completed = False
        self.settled = False

    def abort_by(self, error: BudgetExhausted) -> None:
        """Abort the call with ``error``: its engine task is cancelled and its consumer gets the error."""
        self.abort = error
        task = self.task
        # The call whose own charge crossed the cap is running right now: it stops pulling by itself. Cancelling
        # it too would interrupt the backend's own clean-up awaits (e.g. vLLM's abort) in its aclose.
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None
