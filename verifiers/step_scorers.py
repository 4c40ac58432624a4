"""Step scorers: how good is each step of a partial solution (process reward).

One interface, `StepScorer`: ``await scorer.score(problem, steps)`` returns a score in [0, 1] for every step
prefix (the score of step i given ``steps[:i + 1]``), and `aggregate` folds a path's step scores into one
number ("last", "min", "prod" or "mean"). Step-level searches (`branchwise.search.beam`, `branchwise.search.dvts`)
use `StepScorer.score_last`, which scores only the newest step of a prefix.

Backends:

- `GenerativeJudgeScorer`: any chat model judges the latest step; the score is P("yes") from the top
  logprobs of its one-token answer. Runs on every engine with logprobs, the small CPU models included.
- `VLLMRewardModelScorer`: a real process reward model served by vLLM as a pooling model, such as
  Qwen2.5-Math-PRM-7B, which reads the solution with a step tag (``<extra_0>``) after every step and returns
  a probability that each step is correct. It talks to vLLM through a `PoolingClient`: `EmbeddedPoolingClient`
  (an in-process ``AsyncLLM`` started with ``runner="pooling"``) or `HTTPPoolingClient` (the ``/pooling`` route
  of ``vllm serve <prm> --runner pooling``). Serving a 7B PRM needs a GPU; here only the request building and
  response parsing are exercised, against fake clients.
- `ScriptedStepScorer`: scores from a table or a function, for tests.

A scorer that calls an engine is bound to the run's budget by the strategy that uses it (`StepScorer.bind`),
so judge calls are clipped, metered and stopped by the same `Budget` as the policy's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from ..engine.base import Engine
from ..engine.types import ChatMessage, GenerationRequest, TokenLogprob
from ..errors import ConfigError, EngineError, EngineRequestError, EngineUnavailable, MissingDependencyError

if TYPE_CHECKING:
    from ..budget import Budget

__all__ = [
    "AGGREGATES",
    "DEFAULT_JUDGE_USER",
    "QWEN_PRM_SYSTEM",
    "Aggregate",
    "EmbeddedPoolingClient",
    "GenerativeJudgeScorer",
    "HTTPPoolingClient",
    "JudgeTemplate",
    "PoolingClient",
    "ScriptedStepScorer",
    "StepScorer",
    "VLLMRewardModelScorer",
    "aggregate",
    "yes_probability",
]

logger = logging.getLogger(__name__)

Aggregate = Literal["last", "min", "prod", "mean"]
AGGREGATES: tuple[Aggregate, ...] = ("last", "min", "prod", "mean")


def aggregate(scores: Sequence[float], how: Aggregate = "last") -> float:
    """Fold a path's step scores into one score.

    Args:
        scores: per-step scores in [0, 1], first step first.
        how: "last" (the newest step's score; for PRMs trained to predict the outcome), "min" (a chain is as
            good as its weakest step), "prod" (all steps right, if independent) or "mean".

    Raises:
        ConfigError: ``scores`` is empty or ``how`` is unknown.
    """
    if how not in AGGREGATES:
        raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    if not scores:
        raise ConfigError("cannot aggregate an empty list of step scores")
    if how == "last":
        return float(scores[-1])
    if how == "min":
        return float(min(scores))
    if how == "prod":
        return float(math.prod(scores))
    return float(sum(scores) / len(scores))


def _check_steps(steps: Sequence[str]) -> tuple[str, ...]:
    if isinstance(steps, str) or not isinstance(steps, Sequence):
        raise ConfigError("steps must be a sequence of strings (one per step), not a single string")
    if not steps:
        raise ConfigError("steps must not be empty")
    if not all(isinstance(s, str) for s in steps):
        raise ConfigError("every step must be a string")
    return tuple(steps)


def _check_score(value: object, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source} returned {value!r}; a step score must be a finite number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{source} returned {value!r}; a step score must be in [0, 1]")
    return float(value)


class StepScorer(ABC):
    """Scores the steps of a partial solution; higher is better, every score in [0, 1]."""

    name: ClassVar[str] = "step_scorer"

    @abstractmethod
    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        """A score for every step prefix: element i scores step i given ``steps[:i + 1]``.

        Raises:
            ConfigError: ``steps`` is empty or not a sequence of strings.
        """

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        """The score of the newest step only (what a step-level search needs after each expansion).

        The default scores every prefix and keeps the last; backends that pay per prefix override it.
        """
        return (await self.score(problem, _check_steps(steps)))[-1]

    def bind(self, engine: Engine, budget: Budget | None) -> StepScorer:
        """The scorer as a strategy uses it: model calls charged to ``budget``.

        Args:
            engine: the strategy's policy engine, for scorers told to judge with it.
            budget: the run's budget.

        The default returns the scorer itself (it makes no engine calls).
        """
        return self

    async def aclose(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release the scorer's resources (clients, engines it started). Idempotent."""


# ---------------------------------------------------------------------------------------------------------------
# Generative judge
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_JUDGE_USER = (
    "You are checking a step-by-step solution to a math problem.\n\n"
    "Problem:\n{problem}\n\n"
    "Previous steps:\n{previous}\n\n"
    "Latest step:\n{step}\n\n"
    "Is the latest step correct? Answer Yes or No."
)
_PLACEHOLDER = re.compile(r"\{(problem|previous|step)\}")


@dataclass(frozen=True)
class JudgeTemplate:
    """How the judge is asked about one step prefix.

    Attributes:
        user: the user turn; ``{problem}``, ``{previous}`` (earlier steps) and ``{step}`` (the latest step) are
            filled in. Placeholders are substituted in one pass, so braces in the problem text are safe.
        system: an optional system turn.
        step_separator: joins the earlier steps in ``{previous}``.
        no_previous: ``{previous}`` when the latest step is the first.
    """

    user: str = DEFAULT_JUDGE_USER
    system: str | None = None
    step_separator: str = "\n\n"
    no_previous: str = "(none)"

    def __post_init__(self) -> None:
        if "{step}" not in self.user:
            raise ConfigError("JudgeTemplate.user must contain '{step}'")

    def messages(self, problem: str, steps: Sequence[str]) -> tuple[ChatMessage, ...]:
        """The chat asking whether ``steps[-1]`` is correct."""
        steps = _check_steps(steps)
        values = {
            "problem": problem,
            "previous": self.step_separator.join(steps[:-1]) or self.no_previous,
            "step": steps[-1],
        }
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        turns = [ChatMessage("user", user)]
        if self.system:
            turns.insert(0, ChatMessage("system", self.system))
        return tuple(turns)


def _label(token: str) -> str:
    # Tokenizers render a leading space as "Ġ" or "▁" in some decodings; answers may carry punctuation.
    return token.strip().lstrip("Ġ▁").strip(" .,:;!\"'*").lower()


def yes_probability(
    token: TokenLogprob | None,
    *,
    yes: Sequence[str] = ("yes",),
    no: Sequence[str] = ("no",),
    fallback: float = 0.5,
) -> float:
    """P(yes) among the yes/no answers at one position, from its top logprobs.

    Every variant of an answer among the alternatives counts (" Yes", "yes", "YES", "Yes." all read as
    "yes"): ``sum(exp(lp) for yes variants) / sum(exp(lp) for yes and no variants)``. The sampled token counts
    too when it is not among the alternatives.

    Args:
        token: the first generated token's logprobs (with top alternatives), or None.
        yes: normalised spellings of "yes" (lower case, no spaces or punctuation).
        no: normalised spellings of "no".
        fallback: the score when neither answer appears.
    """
    if token is None:
        return fallback
    seen: dict[str, float] = {}
    for text, lp in token.top:
        seen.setdefault(text, lp)
    seen.setdefault(token.token, token.logprob)
    yes_set, no_set = {y.lower() for y in yes}, {n.lower() for n in no}
    p_yes = p_no = 0.0
    for text, lp in seen.items():
        if not math.isfinite(lp):
            continue
        label = _label(text)
        if label in yes_set:
            p_yes += math.exp(lp)
        elif label in no_set:
            p_no += math.exp(lp)
    if p_yes + p_no <= 0.0:
        return fallback
    return p_yes / (p_yes + p_no)


class GenerativeJudgeScorer(StepScorer):
    """A chat model judges each step: score = P("yes") to "is the latest step correct?".

    One request per step prefix (all prefixes concurrently), greedy, one generated token, top-20 logprobs;
    the probability mass of the yes and no variants among the alternatives is normalised (`yes_probability`).

    Args:
        engine: the judge's engine; None judges with the policy engine of the strategy that binds it.
        template: how the question is put.
        top_logprobs: alternatives read at the answer position (2..20).
        yes: normalised spellings counted as "yes".
        no: normalised spellings counted as "no".
        fallback: the score when neither answer is among the alternatives.

    Raises:
        ConfigError: bad parameters, or an engine without top logprobs.
    """

    name = "generative_judge"

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        template: JudgeTemplate | None = None,
        top_logprobs: int = 20,
        yes: Sequence[str] = ("yes",),
        no: Sequence[str] = ("no",),
        fallback: float = 0.5,
    ) -> None:
        if not 2 <= top_logprobs <= 20:
            raise ConfigError(f"GenerativeJudgeScorer: top_logprobs must be in 2..20, got {top_logprobs}")
        if not 0.0 <= fallback <= 1.0:
            raise ConfigError(f"GenerativeJudgeScorer: fallback must be in [0, 1], got {fallback}")
        if isinstance(yes, str) or isinstance(no, str) or not yes or not no:
            raise ConfigError("GenerativeJudgeScorer: yes and no must be non-empty lists of spellings")
        if engine is not None:
            _check_judge_engine(engine)
        self.engine = engine
        self.template = template or JudgeTemplate()
        self.top_logprobs = top_logprobs
        self.yes = tuple(yes)
        self.no = tuple(no)
        self.fallback = fallback

    def bind(self, engine: Engine, budget: Budget | None) -> GenerativeJudgeScorer:
        judge = self.engine if self.engine is not None else engine
        bound = budget.bind(judge) if budget is not None else judge
        return GenerativeJudgeScorer(
            bound,
            template=self.template,
            top_logprobs=self.top_logprobs,
            yes=self.yes,
            no=self.no,
            fallback=self.fallback,
        )

    def request(self, problem: str, steps: Sequence[str]) -> GenerationRequest:
        """The judge request for the newest step of ``steps``."""
        return GenerationRequest(
            messages=self.template.messages(problem, steps),
            n=1,
            temperature=0.0,
            max_tokens=1,
            logprobs=self.top_logprobs,
        )

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        engine = self.engine
        if engine is None:
            raise ConfigError(
                "GenerativeJudgeScorer has no engine: pass engine=, or use it in a strategy, which binds the "
                "policy engine"
            )
        generation = await engine.generate(self.request(problem, _check_steps(steps)))
        logprobs = generation.completions[0].logprobs if generation.completions else None
        first = logprobs[0] if logprobs else None
        if first is None:
            logger.debug("judge returned no token for a step; scoring it %s", self.fallback)
        return yes_probability(first, yes=self.yes, no=self.no, fallback=self.fallback)

    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        steps = _check_steps(steps)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.score_last(problem, steps[: i + 1])) for i in range(len(steps))]
        return [t.result() for t in tasks]

    def __repr__(self) -> str:
        return f"GenerativeJudgeScorer(engine={self.engine!r}, top_logprobs={self.top_logprobs})"


def _check_judge_engine(engine: Engine) -> None:
    if not isinstance(engine, Engine):
        raise ConfigError(f"GenerativeJudgeScorer: engine must be an Engine, got {type(engine).__name__}")
    caps = engine.capabilities
    if not caps.logprobs or caps.max_top_logprobs < 2:
        raise ConfigError(
            f"GenerativeJudgeScorer needs top logprobs, which the {engine.backend!r} engine does not return"
        )
    if not caps.chat:
        raise ConfigError(f"GenerativeJudgeScorer needs a chat model; the {engine.backend!r} engine has none")


# ---------------------------------------------------------------------------------------------------------------
# Process reward models served by vLLM (pooling)
# ---------------------------------------------------------------------------------------------------------------
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
        client: Any = None,
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
        self._client = client
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
        import httpx

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
        cls, base_url: str, model: str, *, client: Any = None, timeout: float = 60.0, **options: Any
    ) -> VLLMRewardModelScorer:
        """A scorer talking to ``vllm serve <model> --runner pooling`` at ``base_url``."""
        return cls(HTTPPoolingClient(base_url, model, client=client, timeout=timeout), **options)

    @classmethod
    def embedded(cls, llm: Any, *, step_tag_id: int | None = None, **options: Any) -> VLLMRewardModelScorer:
        """A scorer over an in-process pooling ``AsyncLLM``."""
        return cls(EmbeddedPoolingClient(llm, step_tag_id=step_tag_id), **options)

    def messages(self, problem: str, steps: Sequence[str]) -> tuple[ChatMessage, ...]:
        """The chat sent for ``steps``: every step followed by the step tag."""
        steps = _check_steps(steps)
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
        steps = _check_steps(steps)
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


# ---------------------------------------------------------------------------------------------------------------
# Scripted
# ---------------------------------------------------------------------------------------------------------------
ScoreFn = Callable[[str, tuple[str, ...]], float | Awaitable[float]]


class ScriptedStepScorer(StepScorer):
    """Scores from a table or a function, for tests.

    Args:
        source: a mapping from a step's text (stripped) to its score, or a function
            ``fn(problem, steps) -> score`` (sync or async) scoring the newest step of the prefix ``steps``.
        default: the score of a step missing from the table; None makes a missing step an error.

    Attributes:
        calls: every prefix scored, in order.
    """

    name = "scripted"

    def __init__(self, source: Mapping[str, float] | ScoreFn, *, default: float | None = 0.5) -> None:
        if not isinstance(source, Mapping) and not callable(source):
            raise ConfigError("ScriptedStepScorer needs a mapping of step text to score, or a function")
        if default is not None:
            _check_score(default, "ScriptedStepScorer default")
        if isinstance(source, Mapping):
            for key, value in source.items():
                _check_score(value, f"ScriptedStepScorer table entry {key!r}")
        self._source = source
        self.default = default
        self.calls: list[tuple[str, ...]] = []

    async def score_last(self, problem: str, steps: Sequence[str]) -> float:
        prefix = _check_steps(steps)
        self.calls.append(prefix)
        source = self._source
        if isinstance(source, Mapping):
            key = prefix[-1].strip()
            if key in source:
                return float(source[key])
            if self.default is None:
                raise ConfigError(f"ScriptedStepScorer has no score for step {key!r}")
            return self.default
        value = source(problem, prefix)
        if inspect.isawaitable(value):
            value = await value
        return _check_score(value, "ScriptedStepScorer function")

    async def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        steps = _check_steps(steps)
        return [await self.score_last(problem, steps[: i + 1]) for i in range(len(steps))]
