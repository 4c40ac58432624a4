"""The sections of a pipeline spec as pydantic models (``extra="forbid"``, every field documented).

`PipelineSpec` (in `branchwise.orchestrator.spec`) holds one of each. Counts a user sets carry documented upper
bounds (`branchwise.search.registry` for the strategy's own parameters); values are checked here, relations between
sections in `branchwise.orchestrator.spec_checks`.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.openai_engine import OpenAIEngine
from ..engine.replay import ReplayEngine
from ..engine.vllm_engine import VLLMEngine
from ..search.registry import MAX_CONCURRENCY, MAX_SAMPLES, MAX_TOKENS, MAX_WIDTH
from ..verifiers.redundancy import EmbeddingRedundancy

__all__ = [
    "DRAFT_FIELDS",
    "MAX_REPLANS",
    "ROLES",
    "BudgetSpec",
    "EngineRole",
    "EngineSpec",
    "GraderSpec",
    "OutputsSpec",
    "PlannerSpec",
    "PromptSpec",
    "RedundancySpec",
    "ReplySpec",
    "Role",
    "RuleSpec",
    "RuntimeSpec",
    "SectionModel",
    "StepScorerSpec",
    "ThoughtSpec",
    "ToolSpec",
    "VerifierSpec",
    "VerifiersSpec",
    "backend_params",
    "did_you_mean",
]

MAX_REPLANS = 16
"""Upper bound of ``planner.max_replans``."""

ROLES: tuple[str, ...] = ("policy", "judge", "draft", "speculator", "embedder")
"""Engine roles: ``policy`` plans, samples every reasoning trace and joins; ``judge`` scores steps and verifies
solutions (generative judge / GenRM) when declared (otherwise the policy judges itself); ``draft`` is the
speculative-decoding proposer of the (vllm) policy engine, token by token inside vLLM: a small draft model with the
policy's tokenizer, or ``method: ngram`` (prompt lookup, no model); ``speculator`` is an engine of its own that
drafts whole reasoning steps for the policy to judge (``strategy: spec_reason``); ``embedder`` is the
sentence-embedding model of the ``embedding`` redundancy judge (backend ``transformers``; no model means the
packaged all-MiniLM-L6-v2)."""

Role = Literal["policy", "judge", "draft", "speculator", "embedder"]
EngineRole = Literal["policy", "judge", "speculator"]
"""Roles served by an engine (that a step scorer or verifier can name)."""
DRAFT_MAX_BATCH = 1
"""The draft role's default ``max_batch``: on these CPUs n-gram speculation sped single sequences up (1.0-2.2x) and
slowed batches of 4 and 8 down (0.6-0.7x) in benchmarks/speculation.py."""
DRAFT_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "max_batch")


class SectionModel(BaseModel):
    """A spec section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# -- engines ----------------------------------------------------------------------------------------------------
class ReplySpec(SectionModel):
    """One scripted reply of the ``test`` backend (see `branchwise.engine.testing.ScriptedResponse`)."""

    texts: list[str] = Field(min_length=1, description="One text per sample; they repeat when n is larger.")
    logprobs: float | list[list[float]] = Field(
        -0.1, description="Per-token logprob (one number, or one list per text)."
    )
    finish_reason: Literal["stop", "length"] = "stop"
    token_delay: float | None = Field(None, ge=0, description="Seconds between streamed tokens.")


Reply = str | list[str] | ReplySpec


class RuleSpec(SectionModel):
    """A ``test``-backend rule: requests whose rendered prompt matches ``when`` (a regex) get ``reply``."""

    when: str = Field(description="Regular expression searched in the rendered prompt.")
    reply: Reply

    @model_validator(mode="after")
    def _regex(self) -> RuleSpec:
        try:
            re.compile(self.when)
        except re.error as err:
            raise ValueError(f"'when' is not a valid regular expression: {err}") from None
        return self


class EngineSpec(SectionModel):
    """An engine: a backend, a model and the backend's options.

    Keys that are constructor arguments of the backend (``max_model_len``, ``enable_prefix_caching``,
    ``request_timeout_s``...) may be written next to ``backend`` and ``model``; they are moved into
    ``options``. ``replies``, ``rules``, ``default`` and ``token_delay`` script the ``test`` backend: a request
    gets the reply of the first rule matching its prompt, else the next queued reply, else ``default``.
    """

    backend: Literal["vllm", "openai", "test", "transformers", "replay"] = Field(
        "vllm",
        description="Engine backend ('transformers': in-process sentence embeddings, embedder role only; "
        "'replay': a trace bank drawn by `branchwise sample`, served as an engine).",
    )
    model: str | None = Field(None, description="Model name (vllm: a registered offline model or a path).")
    options: dict[str, Any] = Field(default_factory=dict, description="Extra backend constructor arguments.")
    api_key: str | None = Field(None, description="openai: bearer token; write it as ${ENV_VAR}.")
    base_url: str | list[str] | None = Field(None, description="openai: API root(s) ending in /v1.")
    replies: list[Reply] = Field(default_factory=list, description="test: replies served in order.")
    rules: list[RuleSpec] = Field(default_factory=list, description="test: prompt-matching replies.")
    default: Reply | None = Field(None, description="test: the reply once rules and queue give none.")
    token_delay: float = Field(0.0, ge=0, description="test: seconds between streamed tokens.")
    method: Literal["draft_model", "ngram"] | None = Field(
        None, description="draft role: 'draft_model' (default; needs model) or 'ngram' (prompt lookup)."
    )
    num_speculative_tokens: int | None = Field(None, ge=1, le=16, description="draft role: tokens proposed per step.")
    prompt_lookup_max: int | None = Field(None, ge=1, le=64, description="draft role, ngram: longest n-gram.")
    prompt_lookup_min: int | None = Field(
        None, ge=1, le=64, description="draft role, ngram: shortest n-gram looked up."
    )
    max_batch: int | None = Field(
        DRAFT_MAX_BATCH,
        ge=1,
        le=1024,
        description="draft role: speculate only when the thought decodes at most this many sequences together (its "
        "fan-out); a wider strategy runs the policy without speculation. null: always speculate. The default, 1, is "
        "what benchmarks/speculation.py measured on CPU (see BENCHMARKS.md); a GPU may gain at larger batches.",
    )

    def speculative_config(self) -> dict[str, Any]:
        """vLLM's ``speculative_config`` for this spec as the policy's draft."""
        method = self.method or "draft_model"
        config: dict[str, Any] = {"method": method, "num_speculative_tokens": self.num_speculative_tokens or 3}
        if method == "draft_model":
            config["model"] = self.model  # resolved by the engine when it starts (a registered name is pulled)
        else:
            config["prompt_lookup_max"] = self.prompt_lookup_max or 4
            if self.prompt_lookup_min is not None:
                config["prompt_lookup_min"] = self.prompt_lookup_min
        return config

    @model_validator(mode="before")
    @classmethod
    def _lift_options(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        known = set(cls.model_fields)
        extra = {k: v for k, v in data.items() if k not in known}
        if not extra:
            return data
        params = backend_params(str(data.get("backend", "vllm")))
        lifted = {k: v for k, v in extra.items() if k in params}
        if not lifted:
            return data
        out = {k: v for k, v in data.items() if k not in lifted}
        out["options"] = {**lifted, **dict(data.get("options") or {})}
        return out

    @model_validator(mode="after")
    def _check_backend(self) -> EngineSpec:
        if self.backend != "test":
            scripted = [k for k in ("replies", "rules", "default") if getattr(self, k)]
            if scripted or self.token_delay:
                raise ValueError(f"{', '.join(scripted) or 'token_delay'} only apply to the 'test' backend")
        if self.backend != "openai" and (self.api_key is not None or self.base_url is not None):
            raise ValueError("api_key and base_url only apply to the 'openai' backend")
        if self.backend == "openai" and not self.model:
            raise ValueError("the 'openai' backend needs 'model' (the served model name)")
        if self.backend == "replay" and "bank" not in self.options:
            raise ValueError("the 'replay' backend needs 'bank' (a bank folder or chunk file from `branchwise sample`)")
        params = backend_params(self.backend)
        if params:
            for key in self.options:
                if key not in params:
                    raise ValueError(did_you_mean(f"{self.backend} engine option", key, sorted(params)))
        return self


def backend_params(backend: str) -> set[str]:
    """Keyword arguments of a backend's constructor that a spec may set next to ``backend`` (empty for ``test``)."""
    cls = _BACKEND_CLASSES.get(backend)
    if cls is None:
        return set()
    return set(inspect.signature(cls.__init__).parameters) - _NOT_OPTIONS


_BACKEND_CLASSES: dict[str, type[Any]] = {
    "vllm": VLLMEngine,
    "openai": OpenAIEngine,
    "transformers": EmbeddingRedundancy,
    "replay": ReplayEngine,
}
_NOT_OPTIONS = {"self", "model", "base_url", "api_key", "transport", "threshold"}


# -- planner, tools -------------------------------------------------------------------------------------------
class PlannerSpec(SectionModel):
    """The planner turning a query into a DAG of tool calls and reasoning threads."""

    kind: Literal["llmcompiler", "structured", "decompose"] = Field(description="Planner kind.")
    max_replans: int = Field(
        1, ge=0, le=MAX_REPLANS, description="Re-planning rounds allowed after a joiner asks for one."
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Planner constructor arguments.")

    @model_validator(mode="before")
    @classmethod
    def _lift_options(cls, data: Any) -> Any:
        # planner arguments may sit next to `kind`: {kind: structured, max_steps: 6}
        if not isinstance(data, Mapping):
            return data
        extra = {k: v for k, v in data.items() if k not in cls.model_fields}
        if not extra:
            return data
        out = {k: v for k, v in data.items() if k not in extra}
        out["options"] = {**extra, **dict(data.get("options") or {})}
        return out


class ToolSpec(SectionModel):
    """A tool the planner may call. In YAML: ``calculator`` or ``{retrieve: {corpus: examples/corpus/}}``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


# -- strategy ---------------------------------------------------------------------------------------------------
class PromptSpec(SectionModel):
    """How a problem becomes chat messages (`branchwise.search.PromptTemplate`)."""

    user: str = Field(
        "{question}\n\nSolve it step by step, then finish with: The answer is <answer>.",
        description="The user turn; must contain {question}.",
    )
    system: str | None = None

    @model_validator(mode="after")
    def _placeholder(self) -> PromptSpec:
        if "{question}" not in self.user:
            raise ValueError("prompt.user must contain '{question}'")
        return self


class ThoughtSpec(BaseModel):
    """The test-time-scaling strategy of every reasoning thread, with its parameters.

    ``strategy`` names a registered strategy (`branchwise.search.register_strategy`); every other key except the
    sampling defaults below is one of its declared parameters, checked against its type and upper bound (typos are
    reported with the closest name).
    """

    model_config = ConfigDict(extra="allow", validate_default=True)

    strategy: str = Field("single", description="Strategy name (see `branchwise.search.available_strategies`).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the strategy's traces.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, le=MAX_TOKENS, description="Token cap per trace.")
    prompt: PromptSpec = Field(default_factory=lambda: PromptSpec.model_validate({}))

    @property
    def params(self) -> dict[str, Any]:
        """The strategy's own parameters (the extra keys)."""
        return dict(self.model_extra or {})


# -- verifiers --------------------------------------------------------------------------------------------------
class GraderSpec(SectionModel):
    """Decides which answers are the same (for votes and grading)."""

    kind: Literal["numeric", "math", "qa", "yesno"] = "numeric"
    options: dict[str, Any] = Field(default_factory=dict)


class StepScorerSpec(SectionModel):
    """Scores partial solutions step by step (beam search, DVTS).

    Kinds: ``generative_judge`` (a chat model says whether the latest step is correct; ``engine`` names its role,
    default ``judge`` if declared else the policy), ``scripted`` (a table ``scores`` from step text to score, for
    tests) and ``prm`` (a process reward model served by ``vllm serve --runner pooling`` at ``base_url``).
    """

    kind: Literal["generative_judge", "scripted", "prm"] = "generative_judge"
    engine: EngineRole | None = None
    top_logprobs: int = Field(20, ge=2, le=20)
    fallback: float = Field(0.5, ge=0, le=1)
    scores: dict[str, float] = Field(default_factory=dict, description="scripted: step text -> score in [0, 1].")
    default: float | None = Field(0.5, description="scripted: score of a step missing from the table.")
    base_url: str | None = Field(None, description="prm: the pooling server's URL.")
    model: str | None = Field(None, description="prm: the served reward model.")

    @model_validator(mode="after")
    def _check(self) -> StepScorerSpec:
        if self.kind == "prm" and not (self.base_url and self.model):
            raise ValueError("a 'prm' step scorer needs base_url and model")
        return self


class VerifierSpec(SectionModel):
    """A generative verifier (GenRM): the share of k rationales ending in "Verdict: Yes" scores a solution."""

    engine: EngineRole | None = None
    k: int = Field(4, ge=1, le=MAX_WIDTH, description="Rationales sampled per verified solution.")
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(256, ge=1, le=MAX_TOKENS, description="Token cap per rationale.")


class RedundancySpec(SectionModel):
    """Which in-flight traces count as redundant (strategy ``prune``)."""

    kind: Literal["answer", "lexical", "embedding"] = "answer"
    threshold: float | None = Field(None, gt=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)


class VerifiersSpec(SectionModel):
    """Answer extraction, grading, step scoring, verification and redundancy judging."""

    extractor: list[str] | None = Field(None, description="Extraction rules in order (boxed, gsm8k, answer_is, ...).")
    grader: GraderSpec = Field(default_factory=GraderSpec)
    step_scorer: StepScorerSpec | None = None
    verifier: VerifierSpec | None = None
    redundancy: RedundancySpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_grader(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("grader"), str):
            return {**data, "grader": {"kind": data["grader"]}}
        return data


# -- budget, runtime, outputs -----------------------------------------------------------------------------------
class BudgetSpec(SectionModel):
    """Caps on what one run may spend (`branchwise.Budget`); each run gets a fresh budget."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_calls: int | None = Field(None, ge=1)
    wall_clock_s: float | None = Field(None, gt=0)
    max_cost: float | None = Field(None, gt=0)
    cost_model: str | None = Field(None, description="A CostModel preset name (needed for max_cost).")


class RuntimeSpec(SectionModel):
    """Reproducibility and concurrency."""

    seed: int | None = Field(None, description="Engine-level seed of vllm engines (unless an engine sets its own).")
    dtype: str | None = Field(None, description="dtype of vllm engines (auto, float32, bfloat16...).")
    concurrency: int = Field(8, ge=1, le=MAX_CONCURRENCY, description="DAG nodes running at once (planner pipelines).")
    max_num_seqs: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="vllm batch limit (sequences at once).")


class OutputsSpec(SectionModel):
    """Where a run's record goes."""

    trace: str | None = Field(None, description="JSONL trace path; {run_id} and {time} are filled in.")
    progress: Literal["auto", "on", "off"] = Field(
        "off",
        description="Live progress: auto (a live view on a terminal, log lines otherwise), on (always the live view)"
        " or off. `branchwise run` uses auto when the spec does not say.",
    )
    otel: bool = Field(True, description="OpenTelemetry spans when opentelemetry is installed.")

    @model_validator(mode="before")
    @classmethod
    def _bool_progress(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("progress"), bool):
            return {**data, "progress": "on" if data["progress"] else "off"}
        return data


def did_you_mean(kind: str, name: str, allowed: list[str]) -> str:
    """ "unknown <kind> '<name>'. Did you mean '<closest>'? Allowed: ..." """
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Allowed: {', '.join(allowed)}."
