"""The `Engine` base class: one small interface every backend implements.

A backend implements `Engine._stream` (required) and may override `Engine._generate` when it has a cheaper
non-streaming path. The public `generate` and `stream` wrap them to meter every call (prompt and completion
tokens, latency, time to first token) and report each call when it ends, however it ends (finished, failed, or
cancelled): as an ``engine_call`` event on the event channel (`branchwise.events`) and as a `CallUsage` to the
usage hooks. Optional abilities raise `NotImplementedError`.

Cancellation contract: cancelling the task that consumes `stream` (or closing the stream early, e.g. leaving an
``async with contextlib.aclosing(engine.stream(req))`` block) must abort the request inside the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Self

from ..events import LiveRef, emit
from .seeding import seeded
from .types import CallUsage, Capabilities, Completion, Delta, FinishReason, Generation, GenerationRequest, TokenLogprob

__all__ = ["CHAT_TEMPLATE_ALLOWANCE", "CallMeter", "Engine", "UsageHook", "assemble", "estimate_prompt_tokens"]

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_ALLOWANCE = (48, 8)
"""Tokens a chat template may add: per request (a default system turn, the generation prompt), per message."""


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """An over-estimate of the prompt tokens of ``request``, for backends that cannot count them.

    Every token of a byte-level tokenizer (GPT-2, Llama 3, Qwen, SmolLM) or of one with byte fallback covers at
    least one UTF-8 byte, so the text's byte count bounds its tokens; chat requests add `CHAT_TEMPLATE_ALLOWANCE`
    for the template's own tokens. On English text this is about four times the real count.
    """
    if request.prompt is not None:
        return len(request.prompt.encode("utf-8", "surrogatepass")) + 1  # + a BOS token
    messages = request.messages or ()
    per_request, per_message = CHAT_TEMPLATE_ALLOWANCE
    text = sum(len(m.content.encode("utf-8", "surrogatepass")) for m in messages)
    return text + per_request + per_message * len(messages)


UsageHook = Callable[[GenerationRequest, CallUsage], None]
"""Called once per engine call when it ends, with the request and what the call cost."""


class CallMeter:
    """Per-call counters a backend fills in while it runs (the prompt token count is its job, and the prompt's
    logprobs when the request asks for them and the backend returns them)."""

    __slots__ = ("completion_tokens", "first_token_at", "prompt_logprobs", "prompt_tokens", "started_at")

    def __init__(self) -> None:
        self.started_at = time.perf_counter()
        self.prompt_tokens = 0
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def usage(self, request: GenerationRequest, *, aborted: bool = False, error: str | None = None) -> CallUsage:
        now = time.perf_counter()
        ttft = None if self.first_token_at is None else self.first_token_at - self.started_at
        return CallUsage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=now - self.started_at,
            ttft_s=ttft,
            num_samples=request.n,
            aborted=aborted,
            error=error,
        )


def assemble(n: int, deltas: list[Delta]) -> tuple[Completion, ...]:
    """Join the deltas of a stream into one `Completion` per sample index (0..n-1)."""
    texts: list[list[str]] = [[] for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    lps: list[list[TokenLogprob] | None] = [None] * n
    finish: list[FinishReason] = ["abort"] * n
    stops: list[str | int | None] = [None] * n
    for d in deltas:
        texts[d.index].append(d.text)
        ids[d.index].extend(d.token_ids)
        if d.logprobs is not None:
            bucket = lps[d.index]
            if bucket is None:
                bucket = lps[d.index] = []
            bucket.extend(d.logprobs)
        if d.finish_reason is not None:
            finish[d.index] = d.finish_reason
            stops[d.index] = d.stop_reason
    return tuple(
        Completion(
            index=i,
            text="".join(texts[i]),
            token_ids=tuple(ids[i]),
            logprobs=None if lps[i] is None else tuple(lps[i] or ()),
            finish_reason=finish[i],
            stop_reason=stops[i],
        )
        for i in range(n)
    )


class Engine(ABC):
    """A text-generation backend.

    Attributes:
        backend: registry name of the backend ("vllm", "openai", "test", ...).
        model: the model it serves.
    """

    backend: str = "base"

    def __init__(self, *, model: str = "") -> None:
        self.model = model
        self._usage_hooks: list[UsageHook] = []

    # -- public API -------------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this backend supports."""

    def add_usage_hook(self, hook: UsageHook) -> Callable[[], None]:
        """Register ``hook`` to receive every call's `CallUsage`; returns a function that removes it."""
        self._usage_hooks.append(hook)
        return lambda: self._usage_hooks.remove(hook) if hook in self._usage_hooks else None

    async def generate(self, request: GenerationRequest) -> Generation:
        """Run ``request`` to completion and return all its samples (seeded from the run's seed, see
        `branchwise.engine.seeding`, unless it has its own)."""
        request = seeded(request)
        meter = CallMeter()
        try:
            completions = await self._generate(request, meter)
        except BaseException as err:
            self._report(request, meter, err)
            raise
        usage = meter.usage(request)
        self._emit(request, usage)
        return Generation(
            request=request,
            completions=completions,
            prompt_tokens=meter.prompt_tokens,
            usage=usage,
            model=self.model,
            prompt_logprobs=meter.prompt_logprobs,
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Yield `Delta` increments of every sample as they are generated.

        Deltas of different samples interleave; each sample's last delta carries its ``finish_reason``.
        Cancelling the consumer, or closing the generator early, aborts the request in the backend. Seeded as
        `generate` is.
        """
        request = seeded(request)
        meter = CallMeter()
        try:
            # aclosing: an early close of this generator must close the backend's at once (that is the abort),
            # not whenever the garbage collector gets to it.
            async with contextlib.aclosing(self._metered(request, meter)) as deltas:
                async for delta in deltas:
                    yield delta
        except BaseException as err:
            self._report(request, meter, err)
            raise
        self._emit(request, meter.usage(request))

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The prompt tokens ``request`` will cost, known before it is sent (a `Budget` reserves them).

        Backends with a tokenizer return the exact count; the default is `estimate_prompt_tokens`, an
        over-estimate. Must be cheap and must not block: it runs on the event loop before every call.
        """
        return estimate_prompt_tokens(request)

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare the backend (load weights, open connections). Optional: the first request does it lazily."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release the backend's resources. Idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- for backends -----------------------------------------------------------------------------------------
    @abstractmethod
    def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        """Backend streaming implementation; must set ``meter.prompt_tokens``.

        Token counting and time to first token are done by the caller from the yielded deltas.
        """

    async def _generate(self, request: GenerationRequest, meter: CallMeter) -> tuple[Completion, ...]:
        """Backend non-streaming implementation; by default collects `_stream`.

        Overrides must set ``meter.prompt_tokens``, ``meter.completion_tokens`` and ``meter.first_token_at``
        when known.
        """
        collected: list[Delta] = []
        async with contextlib.aclosing(self._metered(request, meter)) as deltas:
            async for delta in deltas:
                collected.append(delta)
        return assemble(request.n, collected)

    async def _metered(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        """`_stream` with completion tokens and time to first token counted into ``meter`` (no hooks called).

        For the public methods and for engine wrappers (e.g. a budget) that report to this engine's hooks
        themselves with `_report` / `_emit`.
        """
        async with contextlib.aclosing(self._stream(request, meter)) as deltas:
            async for delta in deltas:
                if delta.token_ids:
                    if meter.first_token_at is None:
                        meter.first_token_at = time.perf_counter()
                    meter.completion_tokens += len(delta.token_ids)
                yield delta

    def _report(self, request: GenerationRequest, meter: CallMeter, err: BaseException) -> None:
        # GeneratorExit is an early close by the consumer: an abort, like cancellation.
        aborted = isinstance(err, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt))
        self._emit(request, meter.usage(request, aborted=aborted, error=None if aborted else type(err).__name__))

    def _emit(self, request: GenerationRequest, usage: CallUsage) -> None:
        emit(
            "engine_call",
            {
                "engine": LiveRef(self),  # a run's recorder maps the engine to the role the run gave it
                "model": self.model,
                "backend": self.backend,
                "n": request.n,
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "latency_s": usage.latency_s,
                "ttft_s": usage.ttft_s,
                "aborted": usage.aborted,
                "error": usage.error,
            },
        )
        self._call_hooks(request, usage)

    def _call_hooks(self, request: GenerationRequest, usage: CallUsage) -> None:
        """Give a finished call's usage to this engine's usage hooks."""
        for hook in list(self._usage_hooks):
            try:
                hook(request, usage)
            except Exception:  # a broken observer must not break generation
                logger.exception("usage hook %r failed", hook)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r})"
