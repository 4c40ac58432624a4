"""The OpenAI chat-completions protocol as `branchwise serve` speaks it: requests, errors, responses and chunks.

A request names a loaded pipeline as its ``model``; its messages become the pipeline's query (`query_of`), its
sampling fields and the ``branchwise`` extension become spec overrides (see `branchwise.serve.pipelines`). Every
refusal is an `APIError`, sent as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..engine.seeding import MAX_SEED
from ..orchestrator.pipeline import RunResult
from ..orchestrator.spec_models import did_you_mean

__all__ = [
    "APIError",
    "BranchwiseOptions",
    "ChatRequest",
    "Message",
    "Query",
    "completion_body",
    "completion_chunk",
    "finish_reason",
    "now",
    "parse_chat_request",
    "query_of",
    "run_section",
    "usage_of",
]

ErrorType = Literal["invalid_request_error", "rate_limit_error", "server_error"]


class APIError(Exception):
    """A request refused or failed, as an HTTP status and OpenAI's error object.

    Attributes:
        status: the HTTP status.
        message: what went wrong, naming the field.
        type: OpenAI's error type.
        param: the request field at fault (dotted, e.g. ``branchwise.overrides.thought.n``), if one is.
        code: a machine-readable reason (``model_not_found``, ``invalid_api_key``, ``queue_full``...).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A text part of a message's content (the only kind of part a pipeline can read)."""

    type: Literal["text"]
    text: str


class Message(_Strict):
    """One chat turn. Tool calls and tool results are not part of a pipeline's query and are refused."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class BranchwiseOptions(_Strict):
    """The ``branchwise`` extension of a request (``extra_body={"branchwise": {...}}`` in the openai client).

    Attributes:
        overrides: dotted spec paths and values for this request, e.g. ``{"thought.n": 8}``; checked by the spec
            loader like ``--set`` (values are taken as typed: a string stays a string).
        budget: caps of this run's budget, e.g. ``{"max_tokens": 4000}`` (short for ``budget.*`` overrides).
        seed: the run's seed (the same as the request's ``seed``): every engine call of the run gets a seed derived
            from it, so the same request on the same server gives the same answer and usage
            (`branchwise.engine.seeding`).
        progress: with ``stream``, send the run's progress every second while it works, as SSE comment lines
            ``: progress {"seconds": ..., "calls": ..., "prompt_tokens": ..., "completion_tokens": ...}`` (clients
            that do not look for them ignore comments, as the SSE format says).
    """

    overrides: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    progress: bool = False


class ChatRequest(_Strict):
    """``POST /v1/chat/completions``. Fields a pipeline cannot honour are refused, never ignored."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    user: str | None = None
    branchwise: BranchwiseOptions = Field(default_factory=lambda: BranchwiseOptions())

    @property
    def run_seed(self) -> int | None:
        """The run's seed, from ``seed`` or ``branchwise.seed``."""
        return self.seed if self.seed is not None else self.branchwise.seed


_UNSUPPORTED_WHEN_SET = {
    "presence_penalty": "presence_penalty is not supported: a pipeline samples with its own settings",
    "frequency_penalty": "frequency_penalty is not supported: a pipeline samples with its own settings",
    "logprobs": "logprobs are not returned: the content is the pipeline's answer, not one sampled text",
}


def parse_chat_request(data: Any) -> ChatRequest:
    """Validate a decoded request body.

    Raises:
        APIError: 400 naming the first field at fault (unknown fields with the closest known name).
    """
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None
    for field, why in _UNSUPPORTED_WHEN_SET.items():
        if getattr(request, field):
            raise APIError(400, why, param=field, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise APIError(
            400,
            f"n must be 1, got {request.n}: a pipeline returns one answer (set how many traces it samples with "
            '{"branchwise": {"overrides": {"thought.n": N}}})',
            param="n",
            code="unsupported_parameter",
        )
    if None not in (request.seed, request.branchwise.seed) and request.seed != request.branchwise.seed:
        raise APIError(
            400, f"seed {request.seed} and branchwise.seed {request.branchwise.seed} differ: give one", param="seed"
        )
    return request


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    loc = tuple(first.get("loc", ()))
    param = _param_of(loc)
    if first.get("type") == "extra_forbidden" and loc:
        parent = _param_of(loc[:-1])
        model = BranchwiseOptions if parent == "branchwise" else ChatRequest if not parent else None
        kind = f"field of {parent!r}" if parent else "request argument"
        allowed = sorted(model.model_fields) if model is not None else []
        return APIError(400, did_you_mean(kind, str(loc[-1]), allowed), param=param, code="unknown_parameter")
    return APIError(400, f"invalid {param or 'request'}: {first.get('msg', 'invalid value')}", param=param or None)


def _param_of(loc: Sequence[int | str]) -> str:
    """A pydantic location as a request path: ``messages[0].content``; union member tags dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]"):
            continue
        else:
            out += ("." if out else "") + part
    return out


# -- messages -> query -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Query:
    """What a pipeline gets from a request's messages.

    Attributes:
        text: the query: the last user turn, after a transcript of the earlier user and assistant turns if any
            (``user: ...`` / ``assistant: ...`` lines, then ``user: <last turn>``).
        system: the system and developer turns joined, appended to the pipeline's own system prompt; None if none.
    """

    text: str
    system: str | None


def query_of(messages: Sequence[Message], *, max_chars: int) -> Query:
    """The pipeline query of a chat.

    Raises:
        APIError: 400: the last turn is not the user's, the query is empty, or the messages hold more than
            ``max_chars`` characters.
    """
    size = sum(len(m.text) for m in messages)
    if size > max_chars:
        raise APIError(
            400,
            f"the messages hold {size} characters, more than this server's limit of {max_chars}",
            param="messages",
            code="query_too_long",
        )
    last = messages[-1]
    if last.role != "user":
        raise APIError(400, f"the last message must be the user's (the query), got {last.role!r}", param="messages")
    if not last.text.strip():
        raise APIError(400, "the last user message is empty", param=f"messages[{len(messages) - 1}].content")
    system = "\n\n".join(m.text for m in messages if m.role in ("system", "developer") and m.text.strip())
    turns = [m for m in messages[:-1] if m.role in ("user", "assistant")]
    text = last.text
    if turns:
        text = "\n".join(f"{m.role}: {m.text}" for m in [*turns, last])
    return Query(text, system or None)


# -- responses -------------------------------------------------------------------------------------------------------
def run_section(result: RunResult, strategy: str, trace_id: str | None) -> dict[str, Any]:
    """The ``branchwise`` section of a response: how the pipeline reached its answer."""
    return {
        "answer": result.answer,
        "strategy": strategy,
        "pruned": result.pruned,
        "budget_exhausted": result.budget_exhausted,
        "llm_calls": result.usage.calls,
        "aborted_tokens": result.usage.aborted_tokens,
        "seconds": round(result.seconds, 6),
        "run_id": result.run_id,
        "trace_id": trace_id,
    }


def usage_of(result: RunResult) -> dict[str, int]:
    """OpenAI's ``usage``: every token the run spent, over all its engine calls (aborted samples included)."""
    u = result.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def finish_reason(result: RunResult) -> str:
    """``length`` when a budget cap cut the run short (the answer is the best so far), else ``stop``."""
    return "length" if result.budget_exhausted else "stop"


def completion_body(
    completion_id: str, model: str, created: int, result: RunResult, section: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` object whose content is the run's answer ("" when it found none)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer or ""},
                "logprobs": None,
                "finish_reason": finish_reason(result),
            }
        ],
        "usage": usage_of(result),
        "branchwise": dict(section),
    }


def completion_chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: Mapping[str, Any] | None,
    *,
    finish: str | None = None,
    usage: Mapping[str, int] | None = None,
    section: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` is the usage chunk (no choices)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = dict(usage)
    if section is not None:
        chunk["branchwise"] = dict(section)
    return chunk


def now() -> int:
    """OpenAI's ``created``: whole seconds since the epoch."""
    return int(time.time())
