"""Request and response types shared by every engine backend.

Requests validate at construction and raise `RequestValidationError` naming the field, so a bad request fails
before any engine call. All types are frozen dataclasses: cheap to build (they sit on the hot path of every
sampled token) and safe to share between tasks; use `GenerationRequest.replace` to derive a variant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import RequestValidationError

__all__ = [
    "CallUsage",
    "Capabilities",
    "ChatMessage",
    "Completion",
    "Delta",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "StructuredOutput",
    "TokenLogprob",
]

FinishReason = Literal["stop", "length", "abort", "error"]
Role = Literal["system", "user", "assistant", "tool"]
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn.

    Attributes:
        role: "system", "user", "assistant" or "tool".
        content: the message text.
    """

    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise RequestValidationError("messages", f"role must be one of {_ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise RequestValidationError("messages", f"content must be a string, got {type(self.content).__name__}")

    @classmethod
    def coerce(cls, value: ChatMessage | Mapping[str, Any]) -> ChatMessage:
        """Accept a `ChatMessage` or an OpenAI-style ``{"role": ..., "content": ...}`` mapping."""
        if isinstance(value, ChatMessage):
            return value
        if isinstance(value, Mapping) and set(value) <= {"role", "content"} and "role" in value:
            return cls(role=value["role"], content=value.get("content", ""))
        raise RequestValidationError(
            "messages", f"expected a ChatMessage or {{'role', 'content'}} mapping, got {value!r}"
        )

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """A constraint on the generated text. Exactly one field must be set.

    Attributes:
        json_schema: a JSON schema (dict) the output must satisfy.
        regex: a regular expression the whole output must match.
        choices: the output must be exactly one of these strings.
    """

    json_schema: Mapping[str, Any] | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_fields = [f for f in ("json_schema", "regex", "choices") if getattr(self, f) is not None]
        if len(set_fields) != 1:
            raise RequestValidationError(
                "structured", f"set exactly one of json_schema, regex, choices (got {set_fields or 'none'})"
            )
        if self.json_schema is not None:
            if not isinstance(self.json_schema, Mapping):
                raise RequestValidationError("structured.json_schema", "must be a mapping (a JSON schema object)")
            try:
                json.dumps(self.json_schema)
            except (TypeError, ValueError) as err:
                raise RequestValidationError("structured.json_schema", f"not JSON-serialisable: {err}") from err
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise RequestValidationError("structured.regex", f"invalid regular expression: {err}") from err
        if self.choices is not None:
            if isinstance(self.choices, str) or not self.choices:
                raise RequestValidationError("structured.choices", "must be a non-empty list of strings")
            object.__setattr__(self, "choices", tuple(self.choices))
            if not all(isinstance(c, str) and c for c in self.choices):
                raise RequestValidationError("structured.choices", "every choice must be a non-empty string")

    @property
    def kind(self) -> Literal["json_schema", "regex", "choices"]:
        if self.json_schema is not None:
            return "json_schema"
        return "regex" if self.regex is not None else "choices"


def _check_number(name: str, value: Any, *, integer: bool = False) -> None:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise RequestValidationError(name, f"must be {kind}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise RequestValidationError(name, f"must be finite, got {value!r}")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation call: a prompt (or chat messages) and how to sample from it.

    Attributes:
        prompt: raw prompt text, sent as is. Exactly one of ``prompt`` and ``messages`` is required.
        messages: chat messages, rendered with the model's chat template by the engine.
        continue_final_message: with ``messages`` ending in an assistant turn, continue that turn's text
            instead of opening a new one (how a beam's shared prefix is extended).
        n: number of samples drawn from the same prompt (>= 1); sent to the backend as one request so the
            prompt's KV cache is shared.
        temperature: sampling temperature (>= 0; 0 is greedy).
        top_p: nucleus sampling mass, in (0, 1].
        top_k: keep the k most likely tokens (>= 1), or None for no limit.
        min_p: minimum probability relative to the most likely token, in [0, 1].
        max_tokens: cap on generated tokens per sample (>= 1).
        min_tokens: generate at least this many tokens before stop conditions apply (>= 0, <= max_tokens).
        stop: strings that end a sample (not included in the text).
        seed: per-request sampling seed. Backends that cannot honour it say so in `Capabilities`.
        logprobs: None for no logprobs; 0 for the sampled token's logprob only; k > 0 adds the top-k
            alternatives at every position.
        prompt_logprobs: the same for the prompt's own tokens (returned by `Engine.generate` as
            `Generation.prompt_logprobs`; only backends whose `Capabilities.prompt_logprobs` is set return them).
        prompt_logprobs_last: with ``prompt_logprobs``, only the prompt's last N positions are needed (e.g. a
            text appended to a context the engine has seen): `Engine.generate` returns those, and a backend may
            serve the rest of the prompt from its prefix cache and return None for them (a full prefill, with
            every position, otherwise).
        structured: constrain the output (JSON schema, regex or choice list).
        ignore_eos: keep generating past the end-of-sequence token (benchmarks, fixed-length workloads).
        presence_penalty, frequency_penalty, repetition_penalty: the usual penalties.
    """

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    continue_final_message: bool = False
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    max_tokens: int = 256
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_last: int | None = None
    structured: StructuredOutput | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # Normalise sequence fields first so the checks below see tuples.
        if self.messages is not None:
            if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Sequence):
                raise RequestValidationError("messages", "must be a list of chat messages")
            object.__setattr__(self, "messages", tuple(ChatMessage.coerce(m) for m in self.messages))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self._validate()

    def _validate(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise RequestValidationError("prompt", "give exactly one of prompt and messages")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise RequestValidationError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if self.messages is not None:
            if not self.messages:
                raise RequestValidationError("messages", "must not be empty")
            if self.continue_final_message and self.messages[-1].role != "assistant":
                raise RequestValidationError(
                    "continue_final_message", "needs the last message to be an assistant turn to continue"
                )
        elif self.continue_final_message:
            raise RequestValidationError("continue_final_message", "only applies to chat messages")
        _check_number("n", self.n, integer=True)
        if self.n < 1:
            raise RequestValidationError("n", f"must be >= 1, got {self.n}")
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            raise RequestValidationError("temperature", f"must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise RequestValidationError(
                "n", f"greedy decoding (temperature 0) gives identical samples; got n={self.n}"
            )
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise RequestValidationError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            _check_number("top_k", self.top_k, integer=True)
            if self.top_k < 1:
                raise RequestValidationError("top_k", f"must be >= 1 or None, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise RequestValidationError("min_p", f"must be in [0, 1], got {self.min_p}")
        _check_number("max_tokens", self.max_tokens, integer=True)
        if self.max_tokens < 1:
            raise RequestValidationError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check_number("min_tokens", self.min_tokens, integer=True)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestValidationError(
                "min_tokens", f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestValidationError("stop", "every stop sequence must be a non-empty string")
        if self.seed is not None:
            _check_number("seed", self.seed, integer=True)
            if self.seed < 0:
                raise RequestValidationError("seed", f"must be >= 0, got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value, integer=True)
                if not 0 <= value <= 20:
                    raise RequestValidationError(name, f"must be in [0, 20] or None, got {value}")
        if self.prompt_logprobs_last is not None:
            _check_number("prompt_logprobs_last", self.prompt_logprobs_last, integer=True)
            if self.prompt_logprobs_last < 1:
                raise RequestValidationError(
                    "prompt_logprobs_last", f"must be >= 1 or None, got {self.prompt_logprobs_last}"
                )
            if self.prompt_logprobs is None:
                raise RequestValidationError("prompt_logprobs_last", "needs prompt_logprobs")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise RequestValidationError("structured", "must be a StructuredOutput")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2 <= value <= 2:
                raise RequestValidationError(name, f"must be in [-2, 2], got {value}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise RequestValidationError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")

    def replace(self, **changes: Any) -> GenerationRequest:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one generated token, with optional top-k alternatives.

    Attributes:
        token_id: the sampled token id.
        token: its decoded text.
        logprob: natural-log probability of the sampled token.
        top: the k most likely tokens at this position as (token text, logprob), most likely first.
    """

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """An increment of one sample in a stream.

    Attributes:
        index: which of the request's n samples this belongs to.
        text: newly generated text.
        token_ids: the new token ids.
        logprobs: per-token logprobs of the new tokens, if requested.
        finish_reason: set on the sample's last delta.
        stop_reason: on the last delta, the stop string or token that ended the sample, when the backend
            reports one (None for end of sequence or when unknown).
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished sample.

    Attributes:
        index: position among the request's n samples.
        text: the generated text.
        token_ids: generated token ids.
        logprobs: per-token logprobs, if requested.
        finish_reason: "stop" (EOS or a stop string), "length" (max_tokens), "abort" or "error".
        stop_reason: the stop string or token that ended it, when the backend reports one.
    """

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason = "stop"
    stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class CallUsage:
    """What one engine call cost. Reported to every usage hook when the call ends, however it ends.

    Attributes:
        prompt_tokens: tokens in the prompt (counted once, even for n samples).
        completion_tokens: tokens generated over all samples, including those of aborted samples.
        latency_s: wall time from the call to its end.
        ttft_s: time to the first generated token, None if none arrived.
        num_samples: n of the request.
        aborted: True if the call was cancelled before it finished.
        error: the exception type name, if the call failed.
    """

    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    num_samples: int = 1
    aborted: bool = False
    error: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Generation:
    """The result of `Engine.generate`: every sample of one request.

    Attributes:
        request: the request as sent (after any backend adjustment).
        completions: one per sample, ordered by index.
        prompt_tokens: tokens in the rendered prompt.
        usage: cost of the call.
        model: the model that produced it.
        prompt_logprobs: with ``request.prompt_logprobs`` on a backend that returns them, one entry per prompt
            token (None for the first, which has no context); otherwise None.
    """

    request: GenerationRequest
    completions: tuple[Completion, ...]
    prompt_tokens: int
    usage: CallUsage
    model: str = ""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def text(self) -> str:
        """Text of the first sample (convenient for n=1)."""
        return self.completions[0].text

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.completions)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; strategies check these instead of catching failures.

    Attributes:
        streaming: `Engine.stream` yields deltas as tokens are generated.
        logprobs: per-token logprobs are available.
        max_top_logprobs: largest top-k the backend returns (0: sampled token only).
        structured_output: JSON schema / regex / choice constraints are honoured.
        chat: chat messages are rendered with the model's template.
        per_request_seed: a request's ``seed`` makes its samples reproducible.
        prefix_caching: shared prompt prefixes reuse the KV cache.
        abort: cancelling a stream stops generation inside the backend.
        max_model_len: context length in tokens, if known.
        prompt_logprobs: `GenerationRequest.prompt_logprobs` is honoured (`Generation.prompt_logprobs`).
    """

    streaming: bool = True
    logprobs: bool = True
    max_top_logprobs: int = 20
    structured_output: bool = False
    chat: bool = True
    per_request_seed: bool = True
    prefix_caching: bool = False
    abort: bool = True
    max_model_len: int | None = None
    prompt_logprobs: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
