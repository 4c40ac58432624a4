"""Engines for tests: `ScriptedEngine` (queued responses) and `FunctionEngine` (a function decides).

They behave like a real backend where the layers above can tell: text is split into tokens (words with their
leading whitespace), ``max_tokens`` and stop strings are honoured, logprobs are produced when asked, deltas
stream token by token (optionally paced by ``token_delay`` to simulate latency), and cancelling a stream is
counted as an abort. Every request is recorded in ``calls``; `ScriptedEngine.assert_complete` checks that
every scripted response was used.

```python
engine = ScriptedEngine(["The answer is 4.", ScriptedResponse(["5", "4"], logprobs=-0.2)])
```
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .base import CallMeter, Engine
from .types import Capabilities, Delta, FinishReason, GenerationRequest, TokenLogprob

__all__ = ["FunctionEngine", "ScriptedEngine", "ScriptedResponse", "render_prompt", "tokenize"]

_TOKEN = re.compile(r"\s*\S+|\s+")


def tokenize(text: str) -> list[str]:
    """Split text into pseudo-tokens (a word with its leading whitespace); joining them gives ``text`` back."""
    return _TOKEN.findall(text)


def _token_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) % 50_000 + 3


def render_prompt(request: GenerationRequest) -> str:
    """The prompt text the simulated engines see: the raw prompt or a plain rendering of the chat."""
    if request.prompt is not None:
        return request.prompt
    assert request.messages is not None
    return "\n".join(f"<{m.role}> {m.content}" for m in request.messages)


@dataclass(frozen=True)
class ScriptedResponse:
    """What a simulated engine answers to one request.

    Attributes:
        texts: one text per sample; when the request asks for more samples than texts, they repeat in order.
        logprobs: per-token logprob used when the request asks for logprobs: one number for every token,
            or one list of numbers per text (the last value repeats past the end of a list).
        finish_reason: reported for samples that end without hitting ``max_tokens`` or a stop string.
        error: raise this instead of answering.
        token_delay: seconds between tokens (overrides the engine's default).
    """

    texts: Sequence[str]
    logprobs: float | Sequence[Sequence[float]] = -0.1
    finish_reason: FinishReason = "stop"
    error: BaseException | None = None
    token_delay: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.texts, str):
            object.__setattr__(self, "texts", (self.texts,))
        if not self.texts and self.error is None:
            raise ConfigError("ScriptedResponse needs at least one text (or an error)")

    def logprob(self, sample: int, position: int) -> float:
        if isinstance(self.logprobs, (int, float)):
            return float(self.logprobs)
        values = self.logprobs[sample % len(self.logprobs)]
        return float(values[min(position, len(values) - 1)]) if values else -0.1


Reply = str | Sequence[str] | ScriptedResponse | BaseException
ReplyFn = Callable[[GenerationRequest], Reply | Awaitable[Reply]]


def _as_response(reply: Reply) -> ScriptedResponse:
    if isinstance(reply, ScriptedResponse):
        return reply
    if isinstance(reply, BaseException):
        return ScriptedResponse((), error=reply)
    if isinstance(reply, str):
        return ScriptedResponse((reply,))
    return ScriptedResponse(tuple(reply))


def _cut(text: str, request: GenerationRequest) -> tuple[list[str], FinishReason | None, str | None]:
    """Apply stop strings and max_tokens; returns the tokens kept, the finish reason if forced, the stop hit."""
    reason: FinishReason | None = None
    stop_hit = None
    if request.stop:
        hits = [(text.find(s), s) for s in request.stop if s in text]
        if hits:
            pos, stop_hit = min(hits)
            text, reason = text[:pos], "stop"
    tokens = tokenize(text)
    if len(tokens) > request.max_tokens:
        return tokens[: request.max_tokens], "length", None
    return tokens, reason, stop_hit


class _SimulatedEngine(Engine):
    """Shared machinery: turns a `ScriptedResponse` into a token stream."""

    backend = "test"

    def __init__(
        self, *, model: str = "scripted", token_delay: float = 0.0, prompt_logprob: Callable[[str], float] | None = None
    ) -> None:
        super().__init__(model=model)
        self.token_delay = token_delay
        self.prompt_logprob = prompt_logprob or (lambda token: -0.1)
        """The logprob of a prompt token given its text (for requests asking for prompt logprobs)."""
        self.calls: list[GenerationRequest] = []
        self.active = 0
        """Streams currently running (a real engine's running + waiting requests)."""
        self.aborted = 0
        """Calls cancelled or closed before they finished."""
        self.closed = False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(structured_output=True, prefix_caching=True, prompt_logprobs=True)

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Exact: the prompt's pseudo-tokens, as the simulated call reports them."""
        return len(tokenize(render_prompt(request)))

    async def _reply(self, request: GenerationRequest) -> ScriptedResponse:
        raise NotImplementedError

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        if self.closed:
            raise ConfigError(f"{type(self).__name__} is closed")
        self.calls.append(request)
        response = await self._reply(request)
        prompt = tokenize(render_prompt(request))
        meter.prompt_tokens = len(prompt)
        if request.prompt_logprobs is not None and prompt:
            # Like a backend serving the rest from its prefix cache: only the last N positions when that is all
            # the request needs.
            skipped = len(prompt) - min(request.prompt_logprobs_last or len(prompt), len(prompt) - 1)
            rest = (TokenLogprob(_token_id(t), t, self.prompt_logprob(t)) for t in prompt[skipped:])
            meter.prompt_logprobs = (*(None,) * skipped, *rest)
        if response.error is not None:
            raise response.error
        delay = self.token_delay if response.token_delay is None else response.token_delay
        plans = []
        for i in range(request.n):
            tokens, reason, stop_hit = _cut(response.texts[i % len(response.texts)], request)
            plans.append((tokens, reason or response.finish_reason, stop_hit))
        self.active += 1
        finished = False
        try:
            longest = max((len(t) for t, _, _ in plans), default=0)
            for pos in range(max(longest, 1)):
                if delay:
                    await asyncio.sleep(delay)
                for i, (tokens, reason, stop_hit) in enumerate(plans):
                    if pos >= len(tokens) and not (pos == 0 and not tokens):
                        continue
                    piece = tokens[pos] if tokens else ""
                    last = pos >= len(tokens) - 1
                    yield Delta(
                        index=i,
                        text=piece,
                        token_ids=(_token_id(piece),) if piece else (),
                        logprobs=self._logprobs(request, response, i, pos, piece) if piece else None,
                        finish_reason=reason if last else None,
                        stop_reason=stop_hit if last else None,
                    )
            finished = True
        finally:
            self.active -= 1
            if not finished:
                self.aborted += 1

    @staticmethod
    def _logprobs(
        request: GenerationRequest, response: ScriptedResponse, sample: int, pos: int, piece: str
    ) -> tuple[TokenLogprob, ...] | None:
        if request.logprobs is None:
            return None
        lp = response.logprob(sample, pos)
        # The alternatives share the probability mass the sampled token leaves, as in a real distribution:
        # a confident token (logprob near 0) has very unlikely alternatives, an unsure one has close rivals.
        k = max(request.logprobs, 1)
        rest = max(1.0 - math.exp(lp), 1e-9) / max(k - 1, 1)
        alt = max(math.log(rest), -20.0)
        top = tuple([(piece, lp)] + [(f"<alt{i}>", alt) for i in range(1, k)])
        return (TokenLogprob(_token_id(piece), piece, lp, top[: request.logprobs]),)

    async def aclose(self) -> None:
        self.closed = True


class ScriptedEngine(_SimulatedEngine):
    """Answers requests from a queue of scripted replies, in order.

    Args:
        replies: each a text (all samples), a list of texts (one per sample), a `ScriptedResponse`,
            an exception to raise, or a function of the request returning one of those.
        default: the reply once the queue is empty; without it an exhausted queue raises `AssertionError`.
        token_delay: seconds between streamed tokens.
        prompt_logprob: the logprob of a prompt token given its text, for requests asking for prompt logprobs
            (default -0.1 for every token).
    """

    def __init__(
        self,
        replies: Iterable[Reply | ReplyFn] = (),
        *,
        default: Reply | ReplyFn | None = None,
        model: str = "scripted",
        token_delay: float = 0.0,
        prompt_logprob: Callable[[str], float] | None = None,
    ) -> None:
        super().__init__(model=model, token_delay=token_delay, prompt_logprob=prompt_logprob)
        self._queue: deque[Reply | ReplyFn] = deque(replies)
        self._default = default

    def push(self, *replies: Reply | ReplyFn) -> None:
        """Queue more replies."""
        self._queue.extend(replies)

    @property
    def remaining(self) -> int:
        return len(self._queue)

    def assert_complete(self) -> None:
        """Fail if scripted replies were never used or a stream is still running."""
        assert not self._queue, f"{len(self._queue)} scripted replies were never requested"
        assert self.active == 0, f"{self.active} streams are still running"

    async def _reply(self, request: GenerationRequest) -> ScriptedResponse:
        if self._queue:
            reply = self._queue.popleft()
        elif self._default is not None:
            reply = self._default
        else:
            raise AssertionError(f"ScriptedEngine got call #{len(self.calls)} but its script is exhausted: {request}")
        return await _resolve(reply, request)


class FunctionEngine(_SimulatedEngine):
    """Answers every request with ``fn(request)`` (sync or async), like a programmable model (other arguments as
    for `ScriptedEngine`)."""

    def __init__(
        self,
        fn: ReplyFn,
        *,
        model: str = "function",
        token_delay: float = 0.0,
        prompt_logprob: Callable[[str], float] | None = None,
    ) -> None:
        super().__init__(model=model, token_delay=token_delay, prompt_logprob=prompt_logprob)
        self._fn = fn

    async def _reply(self, request: GenerationRequest) -> ScriptedResponse:
        return await _resolve(self._fn, request)


async def _resolve(reply: Reply | ReplyFn, request: GenerationRequest) -> ScriptedResponse:
    if callable(reply) and not isinstance(reply, (BaseException, ScriptedResponse)):
        value = reply(request)
        if inspect.isawaitable(value):
            value = await value
        return _as_response(value)
    return _as_response(reply)
