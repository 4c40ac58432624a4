"""Process reward models served by vLLM as pooling models (e.g. Qwen2.5-Math-PRM-7B).

`VLLMRewardModelScorer` reads the solution with a step tag (``<extra_0>``) after every step and gets, per step,
the probability that it is correct. It talks to vLLM through a `PoolingClient`: `EmbeddedPoolingClient` (an
in-process ``AsyncLLM`` started with ``runner="pooling"``) or `HTTPPoolingClient` (the ``/pooling`` route of
``vllm serve <prm> --runner pooling``). Serving a 7B PRM needs a GPU; the unit tests exercise request building
and response parsing against fake clients.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import httpx

from ..engine.types import ChatMessage
from ..errors import ConfigError, EngineError, EngineRequestError, EngineUnavailable, MissingDependencyError
from .step_base import StepScorer, check_steps

__all__ = [
    "QWEN_PRM_SYSTEM",
    "EmbeddedPoolingClient",
    "HTTPPoolingClient",
    "PoolingClient",
    "VLLMRewardModelScorer",
]

logger = logging.getLogger(__name__)

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system turn Qwen2.5-Math-PRM was trained with."""


@runtime_checkable
class PoolingClient(Protocol):
    """Sends one chat to a vLLM pooling model and returns its per-token rows.

    For a step-pooling PRM the rows are one per step tag in the rendered chat, each the label probabilities
    (``[P(wrong), P(right)]`` for Qwen2.5-Math-PRM).
    """

    async def pool(self, messages: Sequence[ChatMessage]) -> list[list[float]]:
        """Pool ``messages`` (rendered with the model's chat template, no generation prompt)."""
        ...

    async def aclose(self) -> None:
        """Release the client's resources. Idempotent."""
        ...


def _rows(data: Any, source: str) -> list[list[float]]:
    """Validate a pooling output: a list of rows of numbers (one number per row is accepted too)."""
    if hasattr(data, "tolist"):  # a torch tensor from the embedded engine
        data = data.tolist()
    if not isinstance(data, list):
        raise EngineRequestError(f"{source}: expected a list of per-step rows, got {type(data).__name__}")
    rows: list[list[float]] = []
    for row in data:
        values = row if isinstance(row, list) else [row]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise EngineRequestError(f"{source}: a per-step row must hold numbers, got {row!r}")
        rows.append([float(v) for v in values])
    return rows


class HTTPPoolingClient:
    """The ``/pooling`` route of a vLLM server (``vllm serve <prm> --runner pooling``).

    The chat is sent as ``messages`` with ``task="token_classify"`` and no generation prompt; the server renders
    it with the model's chat template and returns, for a step-pooling model, one row per step tag.

    Args:
        base_url: the server root, e.g. ``http://localhost:8000`` (a trailing ``/v1`` is accepted).
        model: the served model name.
        client: an ``httpx.AsyncClient`` to use (not closed by `aclose`); by default one is made lazily.
        timeout: seconds per request.
        api_key: sent as a bearer token, if set.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        api_key: str | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"HTTPPoolingClient: base_url must be an http(s) URL, got {base_url!r}")
        if not model:
            raise ConfigError("HTTPPoolingClient: model must name the served PRM")
        if timeout <= 0:
            raise ConfigError(f"HTTPPoolingClient: timeout must be > 0, got {timeout}")
        root = base_url.rstrip("/")
        self.url = (root[: -len("/v1")] if root.endswith("/v1") else root) + "/pooling"
        self.model = model
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client: httpx.AsyncClient | None = client
        self._owns_client = client is None

    def body(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        """The JSON body sent for ``messages``."""
        return {
            "model": self.model,
            "messages": [m.to_dict() for m in messages],
            "task": "token_classify",
            "add_generation_prompt": False,
            "continue_final_message": False,
            "encoding_format": "float",
        }

    @staticmethod
    def parse(payload: Any) -> list[list[float]]:
        """The per-step rows of a ``/pooling`` response (``{"data": [{"index": 0, "data": [[...], ...]}]}``)."""
        try:
            data = payload["data"][0]["data"]
        except (KeyError, IndexError, TypeError) as err:
            raise EngineRequestError(f"unexpected /pooling response: {str(payload)[:200]}") from err
        return _rows(data, "/pooling response")

    async def pool(self, messages: Sequence[ChatMessage]) -> list[list[float]]:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        try:
            response = await self._client.post(self.url, json=self.body(messages), headers=self._headers)
        except httpx.TimeoutException as err:
            raise EngineUnavailable(f"PRM server at {self.url} timed out after {self.timeout} s") from err
        except httpx.TransportError as err:
            raise EngineUnavailable(f"cannot reach the PRM server at {self.url}: {err}") from err
        if response.status_code == 404:
            raise ConfigError(
                f"{self.url} does not exist: serve the PRM as a pooling model (vllm serve <model> --runner pooling)"
            )
        if response.status_code != 200:
            raise EngineRequestError(
                f"PRM server answered {response.status_code}: {response.text[:300]}", status_code=response.status_code
            )
        try:
            payload = response.json()
        except ValueError as err:
            raise EngineRequestError(f"PRM server sent invalid JSON: {response.text[:200]}") from err
        return self.parse(payload)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()

    def __repr__(self) -> str:
        return f"HTTPPoolingClient({self.url!r}, model={self.model!r})"


class EmbeddedPoolingClient:
    """An in-process vLLM ``AsyncLLM`` running a pooling model (``runner="pooling"``).

    The chat is rendered with the engine's tokenizer (no generation prompt) and sent to ``AsyncLLM.encode``
    with ``PoolingParams(task="token_classify")``; the final output's ``outputs.data`` holds one row per step tag.

    Args:
        llm: a started ``vllm.v1.engine.async_llm.AsyncLLM`` (or anything with the same ``encode`` and
            ``get_tokenizer``), e.g. from `EmbeddedPoolingClient.start`.
        step_tag_id: the step tag's token id, when the model's pooler config does not set it (vLLM sets
            151651, ``<extra_0>``, for Qwen2.5-Math-PRM).
        owns_engine: shut ``llm`` down in `aclose`.
    """

    def __init__(self, llm: Any, *, step_tag_id: int | None = None, owns_engine: bool = False) -> None:
        if not callable(getattr(llm, "encode", None)) or not callable(getattr(llm, "get_tokenizer", None)):
            raise ConfigError(
                "EmbeddedPoolingClient needs a vLLM AsyncLLM (with encode and get_tokenizer); "
                f"got {type(llm).__name__}. A branchwise VLLMEngine runs a generative model and cannot pool."
            )
        self.llm: Any = llm
        self.step_tag_id = step_tag_id
        self._owns_engine = owns_engine
        self._closed = False

    @classmethod
    async def start(cls, model: str, *, step_tag_id: int | None = None, **engine_args: Any) -> EmbeddedPoolingClient:
        """Start an ``AsyncLLM`` for ``model`` as a pooling model, in a worker thread. GPU only in practice.

        Args:
            model: a local folder or hub id of the PRM (e.g. ``Qwen/Qwen2.5-Math-PRM-7B``).
            step_tag_id: see the class.
            engine_args: other ``vllm.AsyncEngineArgs`` fields (``gpu_memory_utilization``, ``max_model_len``...).

        Raises:
            MissingDependencyError: vllm is not installed.
            EngineUnavailable: vLLM could not start the model.
        """
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as err:
            raise MissingDependencyError("EmbeddedPoolingClient", "vllm", "pip install vllm") from err
        try:
            args = AsyncEngineArgs(model=model, runner="pooling", **engine_args)
        except TypeError as err:
            raise ConfigError(f"invalid vLLM engine argument: {err}") from err

        def build() -> Any:
            return AsyncLLM.from_engine_args(args)

        try:
            llm = await asyncio.to_thread(build)
        except Exception as err:
            raise EngineUnavailable(f"vLLM failed to start the pooling model {model!r}: {err}") from err
        return cls(llm, step_tag_id=step_tag_id, owns_engine=True)

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text: the chat rendered with the model's template, without a generation prompt."""
        tokenizer = self.llm.get_tokenizer()
        try:
            text = tokenizer.apply_chat_template(
                [m.to_dict() for m in messages], tokenize=False, add_generation_prompt=False
            )
        except Exception as err:  # jinja errors, a tokenizer without a template
            raise EngineRequestError(f"cannot render the PRM chat with the model's template: {err}") from err
        return str(text)

    def pooling_params(self) -> Any:
        """The ``vllm.PoolingParams`` of every request."""
        try:
            from vllm.pooling_params import PoolingParams
        except ImportError as err:
            raise MissingDependencyError("EmbeddedPoolingClient", "vllm", "pip install vllm") from err
        return PoolingParams(task="token_classify", step_tag_id=self.step_tag_id)

    async def pool(self, messages: Sequence[ChatMessage]) -> list[list[float]]:
        prompt = {"prompt": self.render(messages)}
        params = self.pooling_params()
        final = None
        try:
            # The chat template already holds the special tokens.
            outputs = self.llm.encode(
                prompt, params, uuid.uuid4().hex, tokenization_kwargs={"add_special_tokens": False}
            )
            async for out in outputs:
                final = out
        except (asyncio.CancelledError, EngineError, ConfigError):
            raise
        except ValueError as err:  # vLLM's request validation (VLLMValidationError is a ValueError)
            raise ConfigError(
                f"the embedded vLLM engine cannot pool this request ({err}); a PRM must be started with "
                "runner='pooling' and support task 'token_classify'"
            ) from err
        except Exception as err:
            raise EngineError(f"vLLM pooling failed: {type(err).__name__}: {err}") from err
        if final is None:
            raise EngineError("vLLM returned no pooling output")
        return _rows(getattr(final.outputs, "data", None), "vLLM pooling output")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            await asyncio.to_thread(self.llm.shutdown)

    def __repr__(self) -> str:
        return f"EmbeddedPoolingClient({type(self.llm).__name__})"


class VLLMRewardModelScorer(StepScorer):
    """A process reward model served by vLLM as a pooling model (e.g. Qwen2.5-Math-PRM-7B).

    The solution is sent as one chat: ``system``, the problem as the user turn, and the steps as the
    assistant turn, each step followed by ``step_tag``. The model's step pooler returns one row of label
    probabilities per step tag; the score of step i is row i's ``positive_label`` column. Rows that are not
    probabilities (a server started with activation off returns logits) are passed through a softmax (two or
    more labels) or a sigmoid (one label).

    One pooling request scores every prefix at once (the model is causal, so step i's score only depends on
    steps up to i); `score_last` therefore costs the same request.

    What runs where: request building (`messages`) and response parsing (`parse`) are plain Python and
    tested with fake clients; the model itself needs vLLM serving it as a pooling model, which for a 7B PRM
    means a GPU (`EmbeddedPoolingClient.start`, or ``vllm serve Qwen/Qwen2.5-Math-PRM-7B --runner pooling``
    with `HTTPPoolingClient`). Pooling calls are not charged to a `Budget` (they generate no tokens).

    Args:
        client: how requests reach vLLM (see `VLLMRewardModelScorer.http` and `VLLMRewardModelScorer.embedded`).
        step_tag: the text the PRM reads after each step.
        system: the system turn (None for none).
        positive_label: the column holding P(step is correct).

    Raises:
        ConfigError: ``client`` is not a `PoolingClient`, or bad parameters.
    """

    name = "vllm_prm"

    def __init__(
        self,
        client: PoolingClient,
        *,
        step_tag: str = "<extra_0>",
        system: str | None = QWEN_PRM_SYSTEM,
        positive_label: int = 1,
    ) -> None:
        if not isinstance(client, PoolingClient):
            raise ConfigError(
                f"VLLMRewardModelScorer needs a PoolingClient (HTTPPoolingClient, EmbeddedPoolingClient), got "
                f"{type(client).__name__}; to judge with a generative model use GenerativeJudgeScorer"
            )
        if not step_tag:
            raise ConfigError("VLLMRewardModelScorer: step_tag must be a non-empty string")
        if isinstance(positive_label, bool) or not isinstance(positive_label, int) or positive_label < 0:
            raise ConfigError(f"VLLMRewardModelScorer: positive_label must be an integer >= 0, got {positive_label!r}")
        self.client = client
        self.step_tag = step_tag
        self.system = system
        self.positive_label = positive_label

    @classmethod
    def http(
        cls,
        base_url: str,
        model: str,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float = 60.0,
        **options: Any,
    ) -> VLLMRewardModelScorer:
        """A scorer talking to ``vllm serve <model> --runner pooling`` at ``base_url``."""
        return cls(HTTPPoolingClient(base_url, model, client=client, timeout=timeout), **options)

    @classmethod
    def embedded(cls, llm: Any, *, step_tag_id: int | None = None, **options: Any) -> VLLMRewardModelScorer:
        """A scorer over an in-process pooling ``AsyncLLM``."""
        return cls(EmbeddedPoolingClient(llm, step_tag_id=step_tag_id), **options)

    def messages(self, problem: str, steps: Sequence[str]) -> tuple[ChatMessage, ...]:
        """The chat sent for ``steps``: every step followed by the step tag."""
        steps = check_steps(steps)
        if any(self.step_tag in step for step in steps):
            # A tag inside a step would add a score row and shift every later step's score.
            logger.debug("removing the step tag %r found inside a step", self.step_tag)
        cleaned = [step.replace(self.step_tag, "").strip() for step in steps]
        solution = "".join(step + self.step_tag for step in cleaned)
        turns = [ChatMessage("user", problem), ChatMessage("assistant", solution)]
        if self.system:
            turns.insert(0, ChatMessage("system", self.system))
        return tuple(turns)

    def parse(self, rows: Sequence[Sequence[float]], num_steps: int) -> list[float]:
        """Per-step scores from the pooled rows.

        Raises:
            EngineRequestError: the rows do not match the steps (the model did not pool at the step tags).
        """
        if len(rows) != num_steps:
            raise EngineRequestError(
                f"the PRM returned {len(rows)} step scores for {num_steps} steps: is it a step-pooling model "
                f"whose step tag is {self.step_tag!r} (pooler step_tag_id)?"
            )
        scores = []
        for row in rows:
            values = list(row)
            if len(values) == 1:
                value = values[0]
                score = value if 0.0 <= value <= 1.0 else 1.0 / (1.0 + math.exp(-value))
            else:
                if self.positive_label >= len(values):
                    raise EngineRequestError(
                        f"positive_label {self.positive_label} is out of range for {len(values)} labels"
                    )
                if not _is_distribution(values):
                    values = _softmax(values)
                score = values[self.positive_label]
            scores.append(min(max(score, 0.0), 1.0))
        return scores

    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        steps = check_steps(steps)
        rows = await self.client.pool(self.messages(problem, steps))
        return self.parse(rows, len(steps))

    async def aclose(self) -> None:
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"VLLMRewardModelScorer({self.client!r}, step_tag={self.step_tag!r})"


def _is_distribution(values: Sequence[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in values) and abs(sum(values) - 1.0) < 1e-3


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]
