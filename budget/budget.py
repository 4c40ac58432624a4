"""`Budget` (caps, admission, charging, aborts) and `BudgetedEngine`, the engine wrapper every call goes through.

See the package documentation (`branchwise.budget`) for what is counted when and the guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import asdict
from typing import Final

from ..engine.base import CallMeter, Engine
from ..engine.types import CallUsage, Capabilities, Delta, GenerationRequest
from ..errors import BudgetExhausted, ConfigError
from ..events import current_sink, emit
from .call import Call
from .cost import CostModel
from .usage import Remaining, Usage, capped, smaller

__all__ = ["Budget", "BudgetedEngine", "Remaining"]

logger = logging.getLogger(__name__)

# Caps whose reaching aborts the calls in flight (max_calls only refuses new calls).
_ABORTING_CAPS: Final = frozenset({"max_tokens", "max_completion_tokens", "max_cost", "wall_clock_s"})


class Budget:
    """Hard caps on what a run may spend, shared by everything that runs under it.

    See the module documentation for what is counted when, how calls are clipped and aborted, and the exact
    guarantee. A budget with no caps is valid: it only meters.

    Args:
        max_tokens: cap on prompt plus completion tokens.
        max_completion_tokens: cap on generated tokens.
        max_calls: cap on engine calls.
        wall_clock_s: seconds from the budget's start (its first call, or `start`) to its deadline.
        max_cost: cap on estimated compute (FLOP-equivalents, see `CostModel`); needs a cost model, from
            ``cost_model`` here or on an ancestor, given to `bind`, or a preset matching the engine's model.
        cost_model: the `CostModel` (or a preset name) for calls under this budget, unless a binding gives one.
        name: a label; a child's `path` joins the names from the root.

    Attributes:
        name: the label.
        parent: the budget this is a child of, or None for a root.
        children: the children, in creation order.
    """

    def __init__(
        self,
        *,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        max_calls: int | None = None,
        wall_clock_s: float | None = None,
        max_cost: float | None = None,
        cost_model: CostModel | str | None = None,
        name: str = "run",
    ) -> None:
        self.max_tokens: int | None = capped("max_tokens", max_tokens, integer=True)
        self.max_completion_tokens: int | None = capped("max_completion_tokens", max_completion_tokens, integer=True)
        self.max_calls: int | None = capped("max_calls", max_calls, integer=True)
        self.wall_clock_s: float | None = capped("wall_clock_s", wall_clock_s, integer=False)
        self.max_cost: float | None = capped("max_cost", max_cost, integer=False)
        if isinstance(cost_model, str):
            cost_model = CostModel.preset(cost_model)
        elif cost_model is not None and not isinstance(cost_model, CostModel):
            raise ConfigError(f"cost_model must be a CostModel or a preset name, got {cost_model!r}")
        self.cost_model: CostModel | None = cost_model
        if not isinstance(name, str) or not name:
            raise ConfigError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.parent: Budget | None = None
        self.children: list[Budget] = []
        self._chain: tuple[Budget, ...] = (self,)
        self._usage = Usage()
        self._inflight: set[Call[Budget]] = set()
        self._reserved = 0  # prompt tokens reserved by calls in flight whose real count is not known yet
        self._reserved_cost = 0.0  # and their prompt cost
        self._exhausted_cap: str | None = None
        self._clipped_calls = 0
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- tree ---------------------------------------------------------------------------------------------------
    def child(
        self,
        name: str,
        *,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        max_calls: int | None = None,
        wall_clock_s: float | None = None,
        max_cost: float | None = None,
        cost_model: CostModel | str | None = None,
    ) -> Budget:
        """A budget for a part of the run (a DAG node, a nested strategy) with its own `Usage`.

        Everything charged to the child is charged to this budget (and its ancestors) too, and the child obeys
        their caps: reaching a cap here aborts the child's calls as well. The child's own caps, if given, apply
        to it (and its descendants) only; its wall clock starts at its own first call. Without a cost model of
        its own it uses its ancestors'.
        """
        kid = Budget(
            max_tokens=max_tokens,
            max_completion_tokens=max_completion_tokens,
            max_calls=max_calls,
            wall_clock_s=wall_clock_s,
            max_cost=max_cost,
            cost_model=cost_model,
            name=name,
        )
        kid.parent = self
        kid._chain = (kid, *self._chain)
        self.children.append(kid)
        return kid

    @property
    def path(self) -> str:
        """The names from the root to this budget, joined by "/"."""
        return "/".join(b.name for b in reversed(self._chain))

    def bind(self, engine: Engine, *, cost_model: CostModel | None = None) -> BudgetedEngine:
        """``BudgetedEngine(engine, self, cost_model=cost_model)``: ``engine`` with every call under this budget."""
        return BudgetedEngine(engine, self, cost_model=cost_model)

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def usage(self) -> Usage:
        """The live total of everything charged to this budget and its descendants."""
        self._usage.wall_time_s = self.elapsed
        return self._usage

    @property
    def elapsed(self) -> float:
        """Seconds since the budget started (0 before), up to now or to `stop`."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else time.monotonic()
        return end - self._started_at

    @property
    def in_flight(self) -> int:
        """Calls running under this budget (its descendants' included)."""
        return len(self._inflight)

    @property
    def clipped_calls(self) -> int:
        """Calls under this budget (its descendants' included) whose ``max_tokens`` a cap lowered at admission.

        A sample of such a call that stops for "length" before the ``max_tokens`` it asked for was cut short by
        the budget, even if no cap was reached when it ended (with ``n`` samples each gets ``allowance // n``).
        """
        return self._clipped_calls

    @property
    def exhausted(self) -> bool:
        """True once a cap of this budget or of an ancestor has been reached."""
        return self.exhausted_cap is not None

    @property
    def exhausted_cap(self) -> str | None:
        """The cap reached ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s", "max_cost").

        The first cap reached, looking at this budget before its ancestors; None if none was.
        """
        for b in self._chain:
            if b._exhausted_cap is not None:
                return b._exhausted_cap
            if b._past_deadline():
                return "wall_clock_s"
        return None

    def remaining(self) -> Remaining:
        """What is left before a cap of this budget or an ancestor is reached (never negative)."""
        tokens = completion = calls = None
        seconds = cost = None
        for b in self._chain:
            u = b._usage
            if b.max_tokens is not None:
                tokens = smaller(tokens, max(0, b.max_tokens - u.total_tokens - b._reserved))
            if b.max_completion_tokens is not None:
                completion = smaller(completion, max(0, b.max_completion_tokens - u.completion_tokens))
            if b.max_calls is not None:
                calls = smaller(calls, max(0, b.max_calls - u.calls))
            if b.wall_clock_s is not None:
                seconds = smaller(seconds, max(0.0, b.wall_clock_s - b.elapsed))
            if b.max_cost is not None:
                cost = smaller(cost, max(0.0, b.max_cost - u.estimated_cost - b._reserved_cost))
        return Remaining(tokens=tokens, completion_tokens=completion, calls=calls, seconds=seconds, cost=cost)

    def start(self) -> None:
        """Start the wall clock of this budget and its ancestors now (otherwise their first call does). Idempotent."""
        now = time.monotonic()
        for b in self._chain:
            if b._started_at is None:
                b._started_at = now

    def stop(self) -> None:
        """Freeze this budget's wall clock (``wall_time_s``) and drop its timer: the run it meters is over.

        Calls made afterwards are still admitted and metered against the other caps; the wall-clock cap no
        longer applies.
        """
        if self._started_at is None:
            self._started_at = time.monotonic()
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        self._disarm()

    def close(self) -> None:
        """The part of the run this child metered is over: `stop` its clock and let its parent forget it.

        Its parent's `children` no longer lists it, so a long run that makes a child per item (an evaluation,
        one per problem) does not keep them all; what it spent stays in its ancestors' usage. Idempotent.
        """
        self.stop()
        parent = self.parent
        if parent is not None and self in parent.children:
            parent.children.remove(self)

    def __repr__(self) -> str:
        caps = {
            k: v
            for k, v in (
                ("max_tokens", self.max_tokens),
                ("max_completion_tokens", self.max_completion_tokens),
                ("max_calls", self.max_calls),
                ("wall_clock_s", self.wall_clock_s),
                ("max_cost", self.max_cost),
            )
            if v is not None
        }
        inner = ", ".join(f"{k}={v}" for k, v in caps.items())
        return f"Budget({self.path!r}{', ' if inner else ''}{inner})"

    # -- internals: the chain of budgets a call is charged to ---------------------------------------------------
    def _resolve_cost_model(self) -> CostModel | None:
        for b in self._chain:
            if b.cost_model is not None:
                return b.cost_model
        return None

    def _past_deadline(self, now: float | None = None) -> bool:
        if self.wall_clock_s is None or self._started_at is None or self._stopped_at is not None:
            return False
        return (time.monotonic() if now is None else now) - self._started_at >= self.wall_clock_s

    def _blocking_cap(self, now: float) -> str | None:
        """The cap of this budget (not its ancestors) that forbids a new call, if any."""
        if self._exhausted_cap is not None:
            return self._exhausted_cap
        if self._past_deadline(now):
            return "wall_clock_s"
        u = self._usage
        if self.max_calls is not None and u.calls >= self.max_calls:
            return "max_calls"
        return self._reached_cap()

    def _reached_cap(self) -> str | None:
        """The token or cost cap this budget has reached, if any (checked after every charge).

        Prompt tokens (and cost) reserved by calls in flight count as spent: they will be.
        """
        u = self._usage
        if self.max_completion_tokens is not None and u.completion_tokens >= self.max_completion_tokens:
            return "max_completion_tokens"
        if self.max_tokens is not None and u.total_tokens + self._reserved >= self.max_tokens:
            return "max_tokens"
        if self.max_cost is not None and u.estimated_cost + self._reserved_cost >= self.max_cost:
            return "max_cost"
        return None

    def _describe(self, cap: str) -> str:
        u = self._usage
        if cap == "max_tokens":
            reserved = f" + {self._reserved} reserved for prompts in flight" if self._reserved else ""
            figures = f"{u.total_tokens}{reserved} of {self.max_tokens} tokens"
        elif cap == "max_completion_tokens":
            figures = f"{u.completion_tokens} of {self.max_completion_tokens} completion tokens"
        elif cap == "max_calls":
            figures = f"{u.calls} of {self.max_calls} calls"
        elif cap == "wall_clock_s":
            figures = f"{self.elapsed:.3f} of {self.wall_clock_s} s"
        else:
            figures = f"{u.estimated_cost:.4g} of {self.max_cost} estimated cost"
        return f"budget {self.path!r} exhausted: {cap} ({figures})"

    def _error(self, cap: str) -> BudgetExhausted:
        return BudgetExhausted(cap, self._describe(cap))

    def _exhaust(self, cap: str, *, abort: bool = True) -> None:
        """Record that ``cap`` was reached; for token, cost and time caps, abort the unfinished calls in flight.

        With ``abort=False`` (a call refused because its prompt does not fit) the calls in flight run on: they may
        still finish in what is left, and are aborted if they reach the cap.
        """
        if self._exhausted_cap is None:
            self._exhausted_cap = cap
            logger.info("%s", self._describe(cap))
            emit("budget_exhausted", {"budget": self.path, "cap": cap, "detail": self._describe(cap)})
        if cap not in _ABORTING_CAPS or not abort:
            return
        for call in list(self._inflight):
            if call.unfinished and call.abort is None and not call.done:
                call.abort_by(self._error(cap))

    def _arm(self) -> None:
        if self.wall_clock_s is None or self._timer is not None or self._stopped_at is not None:
            return
        assert self._started_at is not None
        delay = self._started_at + self.wall_clock_s - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._on_deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_deadline(self) -> None:
        self._timer = None
        if self._stopped_at is None:
            self._exhaust("wall_clock_s")

    # -- internals: admission and charging (synchronous: no awaits between check and charge) --------------------
    def _admit(self, request: GenerationRequest, cost_model: CostModel | None, prompt: int) -> Call[Budget]:
        """Admit a call whose prompt is ``prompt`` tokens (exact or over-estimated): check, reserve, clip, count."""
        chain = self._chain
        now = time.monotonic()
        for b in chain:
            if b._started_at is None:
                b._started_at = now
        for b in chain:
            cap = b._blocking_cap(now)
            if cap is not None:
                b._exhaust(cap)
                raise b._error(cap)
        prompt_cost = cost_model.cost(cost_model.prompt_flops(prompt), 0.0) if cost_model is not None else 0.0
        self._check_prompt_fits(prompt, prompt_cost)
        request = self._clip(request, cost_model, prompt, prompt_cost)
        call = Call(chain, request, cost_model, prompt, prompt_cost)
        for b in chain:
            b._usage.calls += 1
            b._reserved += prompt
            b._reserved_cost += prompt_cost
            b._inflight.add(call)
            b._arm()
        for b in chain:
            if b.max_calls is not None and b._usage.calls >= b.max_calls:
                b._exhaust("max_calls")
        return call

    def _check_prompt_fits(self, prompt: int, prompt_cost: float) -> None:
        """Refuse a call whose prompt would reach a token or cost cap by itself (no room for one token)."""
        for b in self._chain:
            cap = None
            if b.max_tokens is not None and b._usage.total_tokens + b._reserved + prompt >= b.max_tokens:
                cap, need = "max_tokens", f"its prompt needs {prompt} tokens"
            elif b.max_cost is not None and b._usage.estimated_cost + b._reserved_cost + prompt_cost >= b.max_cost:
                cap, need = "max_cost", f"its prompt costs {prompt_cost:.4g}"
            if cap is not None:
                b._exhaust(cap, abort=False)
                raise BudgetExhausted(cap, f"{b._describe(cap)}: a call was refused, {need}")

    def _clip(
        self, request: GenerationRequest, cost_model: CostModel | None, prompt: int, prompt_cost: float
    ) -> GenerationRequest:
        """Lower the request's per-sample ``max_tokens`` to what the chain has left once its prompt is paid."""
        n = request.n
        left = self.remaining()
        per_sample = request.max_tokens
        allowance = smaller(None if left.tokens is None else left.tokens - prompt, left.completion_tokens)
        if allowance is not None:
            per_sample = min(per_sample, max(1, allowance // n))
        if left.cost is not None and cost_model is not None:
            within = cost_model.max_tokens_within(left.cost - prompt_cost, n, prompt)
            per_sample = min(per_sample, max(1, within))
        if per_sample >= request.max_tokens:
            return request
        for b in self._chain:
            b._clipped_calls += 1
        return request.replace(max_tokens=per_sample, min_tokens=min(request.min_tokens, per_sample))

    def _charge_prompt(self, call: Call[Budget]) -> None:
        """The backend reported the prompt length: release the call's reservation and charge the real figures."""
        p = call.meter.prompt_tokens
        call.prompt_charged = True
        flops = kv = 0.0
        model = call.cost_model
        if model is not None:
            flops = model.prompt_flops(p)
            # completion tokens charged before the prompt length was known were charged with the reserved length
            kv = float(model.kv_bytes_per_token * (p - call.reserved) * call.completion_tokens)
        cost = model.cost(flops, kv) if model is not None else 0.0
        for b in call.chain:
            u = b._usage
            u.prompt_tokens += p
            u.estimated_flops += flops
            u.estimated_kv_bytes += kv
            u.estimated_cost += cost
        self._release(call)

    @staticmethod
    def _release(call: Call[Budget]) -> None:
        for b in call.chain:
            b._reserved -= call.reserved
            b._reserved_cost -= call.reserved_cost
        call.reserved, call.reserved_cost = 0, 0.0

    def _charge(self, call: Call[Budget], delta: Delta) -> None:
        """Charge one delivered delta (and the prompt, once known) to the chain, then enforce the caps."""
        if not call.prompt_charged and call.meter.prompt_tokens:
            self._charge_prompt(call)
        m = len(delta.token_ids)
        i = delta.index
        known = 0 <= i < len(call.sample_tokens)
        if m:
            generated = call.sample_tokens[i] if known else 0
            if known:
                call.sample_tokens[i] = generated + m
            call.completion_tokens += m
            model = call.cost_model
            flops = kv = cost = 0.0
            if model is not None:
                prompt = call.meter.prompt_tokens if call.prompt_charged else call.reserved
                flops = model.decode_flops(m)
                kv = float(model.decode_kv_bytes(prompt, generated, m))
                cost = model.cost(flops, kv)
            for b in call.chain:
                u = b._usage
                u.completion_tokens += m
                u.estimated_flops += flops
                u.estimated_kv_bytes += kv
                u.estimated_cost += cost
        if delta.finish_reason is not None and known and not call.finished[i]:
            call.finished[i] = True
            call.unfinished -= 1
        self._enforce(call.chain)

    @staticmethod
    def _enforce(chain: tuple[Budget, ...]) -> None:
        for b in chain:
            cap = b._reached_cap()
            if cap is not None:
                b._exhaust(cap)

    def _settle(self, call: Call[Budget], *, aborted: bool) -> None:
        """The call has left the engine: unregister it, charge a prompt reported late, count aborted tokens."""
        if call.settled:
            return
        call.settled = True
        for b in call.chain:
            b._inflight.discard(call)
            if not b._inflight:
                b._disarm()
        if aborted and call.completion_tokens:
            for b in call.chain:
                b._usage.aborted_tokens += call.completion_tokens
        if not call.prompt_charged and call.meter.prompt_tokens:
            self._charge_prompt(call)
            self._enforce(call.chain)
        elif call.reserved or call.reserved_cost:  # never reported (e.g. refused by the backend): nothing to charge
            self._release(call)
        if current_sink() is None:  # the events below cost a `remaining()` per budget; skip them unobserved
            return
        for b in call.chain:
            emit(
                "budget_charge",
                {
                    "budget": b.path,
                    "prompt_tokens": call.meter.prompt_tokens,
                    "completion_tokens": call.completion_tokens,
                    "aborted": aborted,
                    "usage": b.usage.to_dict(),
                    "remaining": {k: v for k, v in asdict(b.remaining()).items() if v is not None},
                },
            )


class BudgetedEngine(Engine):
    """An `Engine` whose every call runs under a `Budget`: admitted, clipped, metered and abortable.

    ``capabilities``, ``model`` and ``backend`` are the wrapped engine's. Each call's request is admitted and
    clipped by the budget, then the wrapped engine's stream runs in a task owned by the call, which charges
    every delta as it arrives and hands it to the consumer; the budget cancels that task to abort the call.
    `generate` collects the stream (the base class default), so it is metered the same way. The wrapped
    engine's usage hooks still see every call (with the clipped request); this wrapper's own hooks see the
    caller's request.

    Wrapping an engine already bound to this budget or to one of its ancestors re-binds the underlying engine
    instead of charging twice. `aclose` does not close the wrapped engine, which may be shared.

    Args:
        engine: the engine to wrap.
        budget: the budget every call runs under.
        cost_model: how to estimate compute for this engine; by default the budget's (or its ancestors'),
            else the preset matching the engine's model name, else none (compute is then not estimated).

    Raises:
        ConfigError: the budget (or an ancestor) caps cost but no cost model is known for this engine, or the
            engine is bound to a budget of the same tree that is not an ancestor of ``budget``.
    """

    engine: Engine
    budget: Budget
    cost_model: CostModel | None
    _own_cost_model: CostModel | None

    def __init__(self, engine: Engine, budget: Budget, *, cost_model: CostModel | None = None) -> None:
        if not isinstance(engine, Engine):
            raise ConfigError(f"engine must be an Engine, got {type(engine).__name__}")
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget must be a Budget, got {type(budget).__name__}")
        if isinstance(engine, BudgetedEngine) and engine.budget._chain[-1] is budget._chain[-1]:
            if engine.budget not in budget._chain:
                raise ConfigError(
                    f"engine is already bound to budget {engine.budget.path!r}, which is not an ancestor of "
                    f"{budget.path!r}; bind the unwrapped engine instead"
                )
            cost_model = cost_model or engine._own_cost_model
            engine = engine.engine
        self.engine = engine
        self.budget = budget
        self._own_cost_model = cost_model
        super().__init__(model=engine.model)
        self.backend = engine.backend
        self.cost_model = cost_model or budget._resolve_cost_model() or CostModel.find(engine.model)
        if self.cost_model is None and any(b.max_cost is not None for b in budget._chain):
            raise ConfigError(
                f"max_cost of budget {budget.path!r} needs a cost model for engine model {engine.model!r}: pass "
                f"cost_model= to the Budget or to bind() (presets: {', '.join(CostModel.PRESETS)})"
            )

    @property
    def model(self) -> str:
        return self.engine.model

    @model.setter
    def model(self, value: str) -> None:
        # Engine.__init__ assigns it; the wrapped engine's name always wins.
        pass

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.engine.count_prompt_tokens(request)

    async def start(self) -> None:
        await self.engine.start()

    async def aclose(self) -> None:
        """Nothing to release: the wrapped engine is not closed (it may be shared)."""

    def _emit(self, request: GenerationRequest, usage: CallUsage) -> None:
        # The wrapped engine reports the call on the event channel (with the request as clipped and sent); this
        # wrapper only tells its own usage hooks, so a listener sees each call once.
        self._call_hooks(request, usage)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        budget = self.budget
        prompt = self.engine.count_prompt_tokens(request)
        call = budget._admit(request, self.cost_model, prompt)  # raises BudgetExhausted before the engine is called
        try:
            call.task = asyncio.get_running_loop().create_task(self._pump(call), name=f"budgeted-call[{budget.path}]")
            while True:
                if call.abort is not None:
                    raise BudgetExhausted(call.abort.cap, str(call.abort))
                if call.buffer:
                    delta = call.buffer.popleft()
                    meter.prompt_tokens = call.meter.prompt_tokens
                    meter.prompt_logprobs = call.meter.prompt_logprobs
                    yield delta
                    continue
                if call.done:
                    if call.error is not None:
                        raise call.error
                    break
                await call.wait()
        finally:
            await self._close(call)
            meter.prompt_tokens = call.meter.prompt_tokens
            meter.prompt_logprobs = call.meter.prompt_logprobs

    async def _close(self, call: Call[Budget]) -> None:
        task = call.task
        if task is not None and not task.done():
            if call.abort is None:
                # A call the budget aborted is already stopping (`Call.abort_by`); cancelling it (again) would
                # interrupt the engine's own clean-up, e.g. an HTTP response being closed or vLLM's abort.
                task.cancel()
            # Wait for the abort to reach the engine even if we are cancelled meanwhile, then pass that on.
            interrupted = False
            while not task.done():
                try:
                    await asyncio.wait((task,))
                except asyncio.CancelledError:
                    interrupted = True
            if interrupted:
                raise asyncio.CancelledError
        # A task cancelled before it ran never got to settle (and the engine never saw the call).
        self.budget._settle(call, aborted=not call.completed and call.error is None)

    async def _pump(self, call: Call[Budget]) -> None:
        """Pull the wrapped engine's deltas as soon as they exist, charge them, and buffer them for the consumer."""
        inner, request, meter = self.engine, call.request, call.meter
        try:
            try:
                # Our own meter lets us see the prompt length as soon as the backend knows it; we report to
                # the wrapped engine's usage hooks ourselves.
                async with contextlib.aclosing(inner._metered(request, meter)) as deltas:
                    async for delta in deltas:
                        call.buffer.append(delta)
                        self.budget._charge(call, delta)
                        call.wake()
                        if call.abort is not None:
                            break
            except Exception as err:
                inner._report(request, meter, err)
                call.error = err
                return
            except BaseException as err:  # cancelled by the budget or by the consumer going away
                inner._report(request, meter, err)
                raise
            if call.abort is not None:
                inner._emit(request, meter.usage(request, aborted=True))
            else:
                call.completed = True
                inner._emit(request, meter.usage(request))
        finally:
            call.done = True
            self.budget._settle(call, aborted=not call.completed and call.error is None)
            call.wake()

    def __repr__(self) -> str:
        return f"BudgetedEngine({self.engine!r}, {self.budget!r})"
