"""Mapping OpenAI-compatible responses to branchwise types: whole JSON bodies, server-sent event streams, errors.

Pure and synchronous (no I/O), so the parsing of untrusted server output can be tested and fuzzed on its own.
Everything a server can send maps either to `Completion` / `Delta` values of the documented types or to
`EngineRequestError`; counts and indices are checked, so a malformed answer never reaches a budget or a strategy.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

from ..errors import EngineRequestError
from .types import Completion, Delta, FinishReason, TokenLogprob

__all__ = [
    "MAX_EVENT_BYTES",
    "PLACEHOLDER_TOKEN_ID",
    "EventMapper",
    "ResponseShape",
    "describe",
    "error_message",
    "parse_whole",
    "retry_after",
]

PLACEHOLDER_TOKEN_ID = -1
"""Token id used when the server does not return token ids."""

MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Longest server-sent event line accepted (one token's event is a few KB even with top-20 logprobs)."""

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
    "tool_calls": "stop",
    "function_call": "stop",
    "content_filter": "stop",
}
# What a malformed value raises on its way through the mapping (json: ValueError/RecursionError; float(): Overflow).
_MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError)
_decode_json = json.JSONDecoder().decode  # skips json.loads' per-call encoding sniffing on the hot path
_NO_IDS: tuple[int, ...] = ()


class ResponseShape:
    """What a response must look like: how many samples, which API, whether logprobs were asked for."""

    __slots__ = ("chat", "n", "top_k", "want_lp")

    def __init__(self, *, n: int, chat: bool, logprobs: int | None) -> None:
        self.n = n
        self.chat = chat
        self.want_lp = logprobs is not None
        self.top_k = logprobs or 0


class _Samples:
    """Per-sample bookkeeping while a response is mapped to deltas (token counts and finishes)."""

    __slots__ = ("approx", "counted", "finished", "usage_completion")

    def __init__(self, n: int) -> None:
        self.counted = [0] * n
        self.approx = [False] * n  # the count is a guess (one token per chunk), to be corrected from usage
        self.finished = [False] * n
        self.usage_completion: int | None = None

    def shortfall(self) -> list[int]:
        """Placeholder tokens to add to each approximately counted sample so the total matches the usage."""
        n = len(self.counted)
        extra = [0] * n
        guessed = [i for i in range(n) if self.approx[i]]
        if self.usage_completion is None or not guessed:
            return extra
        missing = self.usage_completion - sum(self.counted)
        if missing <= 0:
            return extra
        share, rest = divmod(missing, len(guessed))
        for k, i in enumerate(guessed):
            extra[i] = share + (1 if k < rest else 0)
        return extra


# -- field checks (a wrong type is an error here, not a surprise in a strategy) ----------------------------------
def _count(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r:.80}")
    return value


def _index(choice: Any, n: int, url: str) -> int:
    index = choice["index"]
    if type(index) is not int or not 0 <= index < n:
        raise EngineRequestError(f"{url} sent choice index {index!r:.40} for a request with n={n}")
    return index


def _text(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        raise TypeError(f"text must be a string, got {type(value).__name__}")
    return value


def _token_ids(value: Any) -> tuple[int, ...] | None:
    if not value:
        return None
    if type(value) is not list or not all(type(i) is int for i in value):
        raise TypeError(f"token ids must be a list of integers, got {value!r:.80}")
    return tuple(value)


def _finish(reason: Any) -> FinishReason | None:
    if reason is None:
        return None
    return _FINISH.get(reason, "stop") if isinstance(reason, str) else "stop"


def _stop_reason(value: Any) -> str | int | None:
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


# -- logprobs -----------------------------------------------------------------------------------------------------
def _text_logprobs(lp: Any, ids: Sequence[int] | None, top_k: int) -> tuple[TokenLogprob, ...]:
    """Completions API: ``{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}]}``.

    vLLM returns up to top_k + 1 alternatives (the sampled token is added); the k most likely are kept.
    """
    if not lp:
        return ()
    tokens = lp.get("tokens") or ()
    values = lp.get("token_logprobs") or ()
    tops = lp.get("top_logprobs") or () if top_k else ()
    out = []
    for j, token in enumerate(tokens):
        value = values[j] if j < len(values) else None
        top: tuple[tuple[str, float], ...] = ()
        if top_k and j < len(tops) and tops[j]:
            ranked = sorted(tops[j].items(), key=_by_logprob, reverse=True)[:top_k]
            top = tuple((str(t), float(v)) for t, v in ranked)
        out.append(
            TokenLogprob(
                ids[j] if ids and j < len(ids) else PLACEHOLDER_TOKEN_ID,
                str(token),
                -math.inf if value is None else float(value),
                top,
            )
        )
    return tuple(out)


def _chat_logprobs(lp: Any, ids: Sequence[int] | None, top_k: int) -> tuple[TokenLogprob, ...]:
    """Chat API: ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``."""
    content = lp.get("content") if lp else None
    if not content:
        return ()
    out = []
    for j, entry in enumerate(content):
        top: tuple[tuple[str, float], ...] = ()
        if top_k:
            alternatives = entry.get("top_logprobs") or ()
            ranked = sorted(((str(a["token"]), float(a["logprob"])) for a in alternatives), key=_by_value, reverse=True)
            top = tuple(ranked[:top_k])
        value = entry.get("logprob")
        out.append(
            TokenLogprob(
                ids[j] if ids and j < len(ids) else PLACEHOLDER_TOKEN_ID,
                str(entry["token"]),
                -math.inf if value is None else float(value),
                top,
            )
        )
    return tuple(out)


def _by_logprob(item: tuple[str, Any]) -> float:
    return float(item[1]) if item[1] is not None else -math.inf


def _by_value(item: tuple[str, float]) -> float:
    return item[1]


# -- whole (non-streamed) responses -------------------------------------------------------------------------------
def parse_whole(content: bytes, url: str, shape: ResponseShape) -> tuple[tuple[Completion, ...], int]:
    """Map a non-streaming response body to completions and the prompt token count.

    Raises:
        EngineRequestError: the body is not a complete, well-formed response for this request.
    """
    n = shape.n
    try:
        data = json.loads(content)
        choices = data.get("choices")
        if choices is None:
            if "error" in data:
                raise_event_error(data, url)
            raise EngineRequestError(f"response from {url} has no choices: {content[:200]!r}")
        usage = data.get("usage") or {}
        prompt_tokens = _count(usage.get("prompt_tokens") or len(data.get("prompt_token_ids") or ()), "prompt_tokens")
        samples = _Samples(n)
        if usage.get("completion_tokens") is not None:
            samples.usage_completion = _count(usage["completion_tokens"], "completion_tokens")
        parsed: dict[int, tuple[str, tuple[int, ...], tuple[TokenLogprob, ...] | None, FinishReason, Any]] = {}
        for choice in choices:
            index = _index(choice, n, url)
            text = _text((choice.get("message") or {}).get("content") if shape.chat else choice.get("text"))
            if not prompt_tokens and choice.get("prompt_token_ids"):
                prompt_tokens = len(choice["prompt_token_ids"])
            ids = _token_ids(choice.get("token_ids"))
            lp = choice.get("logprobs")
            logprobs = None
            if shape.want_lp:
                logprobs = (_chat_logprobs if shape.chat else _text_logprobs)(lp, ids, shape.top_k)
            if ids:
                token_ids = ids
            elif logprobs:
                token_ids = (PLACEHOLDER_TOKEN_ID,) * len(logprobs)
            else:
                token_ids = _NO_IDS
                samples.approx[index] = True
            samples.counted[index] = len(token_ids)
            parsed[index] = (text, token_ids, logprobs, _finish(choice.get("finish_reason")) or "stop", choice)
    except EngineRequestError:
        raise
    except _MALFORMED as err:
        raise EngineRequestError(f"malformed response from {url}: {describe(err)}: {content[:200]!r}") from err
    missing = [i for i in range(n) if i not in parsed]
    if missing:
        raise EngineRequestError(f"response from {url} lacks samples {missing} of n={n}")
    if samples.usage_completion is None:
        # No usage reported: roughly four characters a token, so budgets are not charged nothing.
        for i in range(n):
            if samples.approx[i] and parsed[i][0]:
                samples.counted[i] = max(1, len(parsed[i][0]) // 4)
        extra = samples.counted
    else:
        extra = samples.shortfall()
    completions = []
    for i in range(n):
        text, token_ids, logprobs, finish, choice = parsed[i]
        if samples.approx[i] and extra[i]:
            token_ids = (PLACEHOLDER_TOKEN_ID,) * extra[i]
        stop_reason = _stop_reason(choice.get("stop_reason"))
        completions.append(Completion(i, text, token_ids, logprobs, finish, stop_reason))
    return tuple(completions), prompt_tokens


# -- server-sent event streams ------------------------------------------------------------------------------------
class EventMapper:
    """Maps the bytes of a ``stream: true`` response to deltas, incrementally (the hot path: an event a token).

    Feed it the body's chunks as they arrive; `feed` yields the deltas they complete. ``done`` turns True at
    ``data: [DONE]``; after the body ended, `complete` says whether every sample finished and `held` yields the
    final deltas of samples whose token counts were corrected from the reported usage.

    Args:
        shape: what the response must look like.
        url: the base URL, for error messages.
        meter: anything with a ``prompt_tokens`` attribute, set as soon as the server reports the prompt length.
    """

    __slots__ = ("_data", "_held", "_meter", "_pending", "_samples", "_shape", "_size", "_url", "done")

    def __init__(self, shape: ResponseShape, url: str, meter: Any) -> None:
        self._shape = shape
        self._url = url
        self._meter = meter
        self._samples = _Samples(shape.n)
        self._held: dict[int, Delta] = {}
        self._pending = bytearray()
        self._data: list[bytes] = []
        self._size = 0  # bytes of data lines in the event being read
        self.done = False

    def feed(self, chunk: bytes) -> Iterator[Delta]:
        """The deltas completed by ``chunk``; raises `EngineRequestError` on malformed or oversized events."""
        if self.done:
            return
        if b"\n" not in chunk:
            self._pending += chunk
            if len(self._pending) > MAX_EVENT_BYTES:
                raise EngineRequestError(f"{self._url} sent an event line longer than {MAX_EVENT_BYTES} bytes")
            return
        lines = (bytes(self._pending) + chunk if self._pending else chunk).split(b"\n")
        self._pending = bytearray(lines.pop())
        data = self._data
        for raw in lines:
            line = raw[:-1] if raw[-1:] == b"\r" else raw
            if line:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                    self._size += len(line)
                    if self._size > MAX_EVENT_BYTES:
                        raise EngineRequestError(f"{self._url} sent an event longer than {MAX_EVENT_BYTES} bytes")
                continue  # comments, event names and ids carry nothing in the OpenAI protocol
            if not data:
                continue
            # A blank line ends the event.
            payload = data[0] if len(data) == 1 else b"\n".join(data)
            data.clear()
            self._size = 0
            if payload == b"[DONE]":
                self.done = True
                return
            yield from self._event(payload)

    @property
    def complete(self) -> bool:
        """Whether every sample has finished (a stream may end without ``[DONE]`` once they have)."""
        return all(self._samples.finished)

    def held(self) -> Iterator[Delta]:
        """At the end of the body: the held final deltas, their token counts corrected from the usage."""
        if not self._held:
            return
        extra = self._samples.shortfall()
        for index in sorted(self._held):
            d = self._held[index]
            if extra[index]:
                ids = (*d.token_ids, *(PLACEHOLDER_TOKEN_ID,) * extra[index])
                d = Delta(d.index, d.text, ids, d.logprobs, d.finish_reason, d.stop_reason)
            yield d
        self._held.clear()

    def _event(self, payload: bytes) -> Iterator[Delta]:
        url, meter, samples = self._url, self._meter, self._samples
        try:
            event = _decode_json(payload.decode())
            choices = event.get("choices")
            if choices is None and "error" in event:
                raise_event_error(event, url)
            if not meter.prompt_tokens:
                ids = event.get("prompt_token_ids")
                if ids:
                    meter.prompt_tokens = len(ids)
            usage = event.get("usage")
            if usage:
                meter.prompt_tokens = _count(usage.get("prompt_tokens") or meter.prompt_tokens, "prompt_tokens")
                if usage.get("completion_tokens") is not None:
                    samples.usage_completion = _count(usage["completion_tokens"], "completion_tokens")
            for choice in choices or ():
                delta = self._choice(choice)
                if delta is not None:
                    yield delta
        except EngineRequestError:
            raise
        except _MALFORMED as err:
            raise EngineRequestError(f"malformed event from {url}: {describe(err)}: {payload[:200]!r}") from err

    def _choice(self, choice: Any) -> Delta | None:
        shape, samples = self._shape, self._samples
        index = _index(choice, shape.n, self._url)
        chat = shape.chat
        text = _text((choice.get("delta") or {}).get("content") if chat else choice.get("text"))
        if not self._meter.prompt_tokens:
            prompt_ids = choice.get("prompt_token_ids")
            if prompt_ids:
                self._meter.prompt_tokens = len(prompt_ids)
        ids = _token_ids(choice.get("token_ids"))
        lp = choice.get("logprobs")
        logprobs: tuple[TokenLogprob, ...] | None = None
        if shape.want_lp:
            logprobs = (_chat_logprobs if chat else _text_logprobs)(lp, ids, shape.top_k)
        if ids:
            token_ids = ids
        elif logprobs:
            token_ids = (PLACEHOLDER_TOKEN_ID,) * len(logprobs)
        elif lp and chat and lp.get("content"):
            token_ids = (PLACEHOLDER_TOKEN_ID,) * len(lp["content"])
        elif text:
            token_ids = (PLACEHOLDER_TOKEN_ID,)
            samples.approx[index] = True
        else:
            token_ids = _NO_IDS
        finish = _finish(choice.get("finish_reason"))
        if not (text or token_ids or finish):
            return None  # role announcements, keep-alives
        samples.counted[index] += len(token_ids)
        stop = _stop_reason(choice.get("stop_reason")) if finish is not None else None
        delta = Delta(index, text, token_ids, logprobs, finish, stop)
        if finish is not None:
            samples.finished[index] = True
            if samples.approx[index]:
                self._held[index] = delta  # its count may still be corrected from the usage
                return None
        return delta


# -- errors -------------------------------------------------------------------------------------------------------
def raise_event_error(event: Mapping[str, Any], url: str) -> NoReturn:
    """Raise the error a server reported inside a 200 response (``{"error": ...}``)."""
    error = event.get("error")
    message = error.get("message") if isinstance(error, Mapping) else error
    code = error.get("code") if isinstance(error, Mapping) else None
    status = code if isinstance(code, int) and not isinstance(code, bool) else None
    raise EngineRequestError(f"{url} reported an error: {str(message)[:2000]}", status_code=status)


def error_message(body: bytes) -> str:
    """The server's own error message: OpenAI/vLLM ``{"error": {"message"}}``, FastAPI ``{"detail"}``, or text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return text[:500] or "(empty body)"
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])[:2000]
        for key in ("error", "detail", "message"):
            if data.get(key):
                return str(data[key])[:2000]
    return text[:500]


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def describe(err: BaseException) -> str:
    """``Type: message`` (or just the type when the message is empty)."""
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
