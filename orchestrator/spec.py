"""The YAML pipeline spec: pydantic models (``extra="forbid"``), a loader that keeps line numbers, overrides.

A spec describes one pipeline: the engines and the roles they play, an optional planner, tools, the
test-time-scaling strategy every reasoning thread runs (``thought``), verifiers, the budget, runtime knobs
(seed, dtype, concurrency) and outputs (trace file, live progress, OpenTelemetry).

```yaml
engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 2048}
thought: {strategy: self_consistency, n: 8, max_tokens: 256}
budget: {max_tokens: 20000}
outputs: {trace: runs/sc.jsonl}
```

Errors are `ConfigError`s that name the YAML path and line, list the allowed values and suggest the closest
name for a typo. Strings may reference environment variables as ``${NAME}`` (or ``${NAME:-default}``); they
are resolved only when the pipeline is built (`PipelineSpec.resolved`) and the spec recorded in a trace keeps
the references, never their values.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from ..errors import ConfigError

__all__ = [
    "ROLES",
    "BudgetSpec",
    "EngineSpec",
    "GraderSpec",
    "OutputsSpec",
    "PipelineSpec",
    "PlannerSpec",
    "PromptSpec",
    "RedundancySpec",
    "ReplySpec",
    "RuleSpec",
    "RuntimeSpec",
    "SpecError",
    "StepScorerSpec",
    "ThoughtSpec",
    "ToolSpec",
    "VerifierSpec",
    "VerifiersSpec",
    "load_spec",
    "pipeline_json_schema",
    "resolve_env",
]

ROLES: tuple[str, ...] = ("policy", "judge", "draft", "embedder")
"""Engine roles: ``policy`` plans, samples every reasoning trace and joins; ``judge`` scores steps and verifies
solutions (generative judge / GenRM) when declared (otherwise the policy judges itself); ``draft`` is the
speculative-decoding proposer of the (vllm) policy engine: a small draft model with the policy's tokenizer, or
``method: ngram`` (prompt lookup, no model); ``embedder`` is the sentence-embedding model of the ``embedding``
redundancy judge (backend ``transformers``; no model means the packaged all-MiniLM-L6-v2)."""

Role = Literal["policy", "judge", "draft", "embedder"]
EngineRole = Literal["policy", "judge"]
"""Roles served by an engine (that a step scorer or verifier can name)."""
_DRAFT_FIELDS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
SECRET_KEYS = ("api_key", "token", "secret", "password", "authorization")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class SpecError(ConfigError):
    """An invalid pipeline spec.

    Attributes:
        path: the dotted YAML path at fault ("" for the whole document).
        line: its 1-based line in the YAML text, when known.
        source: the file name or "<string>".
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None, source: str = "<string>") -> None:
        where = source + (f":{line}" if line is not None else "")
        at = f" at {path!r}" if path else ""
        super().__init__(f"{where}: invalid pipeline spec{at}: {message}")
        self.path = path
        self.line = line
        self.source = source
        self.detail = message


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# -- engines ----------------------------------------------------------------------------------------------------
class ReplySpec(_Model):
    """One scripted reply of the ``test`` backend (see `branchwise.engine.testing.ScriptedResponse`)."""

    texts: list[str] = Field(min_length=1, description="One text per sample; they repeat when n is larger.")
    logprobs: float | list[list[float]] = Field(
        -0.1, description="Per-token logprob (one number, or one list per text)."
    )
    finish_reason: Literal["stop", "length"] = "stop"
    token_delay: float | None = Field(None, ge=0, description="Seconds between streamed tokens.")


Reply = str | list[str] | ReplySpec


class RuleSpec(_Model):
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


class EngineSpec(_Model):
    """An engine: a backend, a model and the backend's options.

    Keys that are constructor arguments of the backend (``max_model_len``, ``enable_prefix_caching``,
    ``request_timeout_s``...) may be written next to ``backend`` and ``model``; they are moved into
    ``options``. ``replies``, ``rules``, ``default`` and ``token_delay`` script the ``test`` backend: a request
    gets the reply of the first rule matching its prompt, else the next queued reply, else ``default``.
    """

    backend: Literal["vllm", "openai", "test", "transformers"] = Field(
        "vllm", description="Engine backend ('transformers': in-process sentence embeddings, embedder role only)."
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
    prompt_lookup_max: int | None = Field(None, ge=1, description="draft role, ngram: longest n-gram looked up.")
    prompt_lookup_min: int | None = Field(None, ge=1, description="draft role, ngram: shortest n-gram looked up.")

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
        params = _backend_params(str(data.get("backend", "vllm")))
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
        params = _backend_params(self.backend)
        if params:
            for key in self.options:
                if key not in params:
                    raise ValueError(_unknown(f"{self.backend} engine option", key, sorted(params)))
        return self


def _backend_params(backend: str) -> set[str]:
    """Constructor keyword arguments of a backend's engine class (empty when it cannot be inspected)."""
    target = {
        "vllm": ("branchwise.engine.vllm_engine", "VLLMEngine"),
        "openai": ("branchwise.engine.openai_engine", "OpenAIEngine"),
        "transformers": ("branchwise.verifiers.redundancy", "EmbeddingRedundancy"),
    }.get(backend)
    if target is None:
        return set()
    import importlib

    try:
        cls = getattr(importlib.import_module(target[0]), target[1])
    except ImportError:
        return set()
    excluded = {"self", "model", "base_url", "api_key", "transport", "threshold"}
    return set(inspect.signature(cls.__init__).parameters) - excluded


# -- planner, tools -------------------------------------------------------------------------------------------
class PlannerSpec(_Model):
    """The planner turning a query into a DAG of tool calls and reasoning threads."""

    kind: Literal["llmcompiler", "structured", "decompose"] = Field(description="Planner kind.")
    max_replans: int = Field(1, ge=0, description="Re-planning rounds allowed after a joiner asks for one.")
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


class ToolSpec(_Model):
    """A tool the planner may call. In YAML: ``calculator`` or ``{retrieve: {corpus: examples/corpus/}}``."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


# -- strategy ---------------------------------------------------------------------------------------------------
class PromptSpec(_Model):
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


# Strategy parameters that take objects: built from other spec sections instead of YAML values.
_OBJECT_PARAMS: dict[str, dict[str, str]] = {
    "beam": {"scorer": "verifiers.step_scorer"},
    "dvts": {"scorer": "verifiers.step_scorer"},
    "prune": {"judge": "verifiers.redundancy"},
    "best_of_n": {"scorer": "'confidence' or 'verifier' (verifiers.verifier)"},
    "adaptive": {"escalate_to": "a nested thought mapping"},
}


class ThoughtSpec(BaseModel):
    """The test-time-scaling strategy of every reasoning thread, with its parameters.

    ``strategy`` names a strategy of `branchwise.search`; every other key except the sampling defaults below is
    a constructor argument of that strategy (checked against its signature: typos are reported with the closest
    name).
    """

    model_config = ConfigDict(extra="allow", validate_default=True)

    strategy: str = Field("single", description="Strategy name (see `branchwise.search.available_strategies`).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the strategy's traces.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, description="Token cap per trace.")
    prompt: PromptSpec = Field(default_factory=lambda: PromptSpec.model_validate({}))

    @property
    def params(self) -> dict[str, Any]:
        """The strategy's own parameters (the extra keys)."""
        return dict(self.model_extra or {})


# -- verifiers --------------------------------------------------------------------------------------------------
class GraderSpec(_Model):
    """Decides which answers are the same (for votes and grading)."""

    kind: Literal["numeric", "math", "qa", "yesno"] = "numeric"
    options: dict[str, Any] = Field(default_factory=dict)


class StepScorerSpec(_Model):
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


class VerifierSpec(_Model):
    """A generative verifier (GenRM): the share of k rationales ending in "Verdict: Yes" scores a solution."""

    engine: EngineRole | None = None
    k: int = Field(4, ge=1)
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(256, ge=1)


class RedundancySpec(_Model):
    """Which in-flight traces count as redundant (strategy ``prune``)."""

    kind: Literal["answer", "lexical", "embedding"] = "answer"
    threshold: float | None = Field(None, gt=0, le=1)
    options: dict[str, Any] = Field(default_factory=dict)


class VerifiersSpec(_Model):
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
class BudgetSpec(_Model):
    """Caps on what one run may spend (`branchwise.Budget`); each run gets a fresh budget."""

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_calls: int | None = Field(None, ge=1)
    wall_clock_s: float | None = Field(None, gt=0)
    max_cost: float | None = Field(None, gt=0)
    cost_model: str | None = Field(None, description="A CostModel preset name (needed for max_cost).")


class RuntimeSpec(_Model):
    """Reproducibility and concurrency."""

    seed: int | None = Field(None, description="Engine-level seed of vllm engines (unless an engine sets its own).")
    dtype: str | None = Field(None, description="dtype of vllm engines (auto, float32, bfloat16...).")
    concurrency: int = Field(8, ge=1, description="DAG nodes running at once (planner pipelines).")
    max_num_seqs: int | None = Field(None, ge=1, description="vllm batch limit (sequences at once).")


class OutputsSpec(_Model):
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


class PipelineSpec(_Model):
    """A whole pipeline. ``engine`` is shorthand for ``engines: {policy: ...}``."""

    version: Literal[1] = Field(1, description="Spec format version.")
    name: str | None = None
    description: str | None = None
    engine: EngineSpec | None = None
    engines: dict[Role, EngineSpec] = Field(default_factory=dict)
    planner: PlannerSpec | None = Field(None, description="None: the query is one reasoning thread.")
    tools: list[ToolSpec] = Field(default_factory=list)
    thought: ThoughtSpec = Field(default_factory=lambda: ThoughtSpec.model_validate({}))
    verifiers: VerifiersSpec = Field(default_factory=lambda: VerifiersSpec.model_validate({}))
    budget: BudgetSpec = Field(default_factory=lambda: BudgetSpec.model_validate({}))
    runtime: RuntimeSpec = Field(default_factory=lambda: RuntimeSpec.model_validate({}))
    outputs: OutputsSpec = Field(default_factory=lambda: OutputsSpec.model_validate({}))

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _lines: dict[tuple[str, ...], int] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr("<string>")

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        tools = data.get("tools")
        if isinstance(tools, list):
            data["tools"] = [_tool_entry(t) for t in tools]
        return data

    @model_validator(mode="after")
    def _roles(self) -> PipelineSpec:
        if self.engine is not None:
            if "policy" in self.engines:
                raise ValueError("give the policy engine once: 'engine' or 'engines.policy', not both")
            self.engines = {"policy": self.engine, **self.engines}
            self.engine = None
        if "policy" not in self.engines:
            raise ValueError("no policy engine: add 'engine: {backend: ..., model: ...}'")
        return self

    # -- public helpers ------------------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the spec came from (a file name or "<string>")."""
        return self._source

    def line_of(self, path: str) -> int | None:
        """The YAML line of a dotted path (or of its closest ancestor present in the text)."""
        return _line(self._lines, tuple(path.split(".")) if path else ())

    def raw(self) -> dict[str, Any]:
        """The spec as written (environment references unresolved)."""
        raw: dict[str, Any] = copy.deepcopy(self._raw)
        return raw

    def redacted(self) -> dict[str, Any]:
        """The spec as written, with literal secrets masked: safe to record in traces."""
        masked: dict[str, Any] = _redact(self.raw())
        return masked

    def with_overrides(self, overrides: Mapping[str, Any]) -> PipelineSpec:
        """A new spec with dotted-path overrides applied, e.g. ``{"thought.n": "8", "budget.max_tokens": 4000}``.

        String values are parsed as YAML scalars ("8" -> 8, "true" -> True, "null" -> None, "[1, 2]" -> list).

        Raises:
            SpecError: a path runs through something that is not a mapping, or the result is invalid.
        """
        data = self.raw()
        for dotted, given in overrides.items():
            parts = str(dotted).split(".")
            value = given
            if not dotted or any(not p for p in parts):
                raise SpecError(f"bad override path {dotted!r}", path=str(dotted), source="<override>")
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value) if value.strip() else value
                except yaml.YAMLError as err:
                    raise SpecError(f"override value {value!r} is not YAML: {err}", path=dotted) from None
            node: Any = data
            for i, part in enumerate(parts[:-1]):
                here = ".".join(parts[: i + 1])
                if part == "engine" and i == 0 and "engine" not in node and "policy" in node.get("engines", {}):
                    node = node["engines"]["policy"]
                    continue
                child = node.get(part) if isinstance(node, dict) else None
                if child is None and isinstance(node, dict):
                    if not _mapping_field(parts[: i + 1]):
                        raise SpecError(_unknown_path(here, node), path=dotted, source="<override>")
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise SpecError(
                        f"cannot set {dotted!r}: {here!r} is not a mapping", path=dotted, source="<override>"
                    )
                node = child
            if parts == ["engine"] and "engine" not in node and "policy" in (node.get("engines") or {}):
                node["engines"]["policy"] = value  # the spec names its policy engine under `engines`
                continue
            node[parts[-1]] = value
        # lines of overridden paths no longer describe their values: errors there point at the parent
        overridden = [tuple(str(k).split(".")) for k in overrides]
        lines = {path: line for path, line in self._lines.items() if not any(path[: len(o)] == o for o in overridden)}
        return _validate(data, lines, source=self._source)

    def resolved(self) -> PipelineSpec:
        """The spec with every ``${ENV_VAR}`` reference replaced by its value (done when building).

        Raises:
            SpecError: a referenced variable is unset and has no ``:-default``.
        """
        data = resolve_env(self.raw(), source=self._source, lines=self._lines)
        spec = _validate(data, self._lines, source=self._source)
        spec._raw = self.raw()  # keep the references, not the values, for records
        return spec


def _mapping_field(parts: list[str]) -> bool:
    """True when the dotted path names a mapping-valued spec section that may be absent from the YAML."""
    top = parts[0]
    if len(parts) == 1:
        return top in PipelineSpec.model_fields and top not in ("tools", "version", "name", "description")
    if top == "engines" and len(parts) == 2:
        return parts[1] in ROLES
    if top == "planner" and len(parts) == 1:
        return True
    if top == "verifiers" and len(parts) == 2:
        return parts[1] in ("grader", "step_scorer", "verifier", "redundancy")
    return parts[-1] in ("options", "prompt")


def _unknown_path(here: str, node: Mapping[str, Any]) -> str:
    parts = here.split(".")
    return _unknown("spec section", parts[-1], sorted(set(node) | set(_fields_at(parts[:-1]))))


def _fields_at(parts: list[str]) -> list[str]:
    model: type[BaseModel] | None = PipelineSpec
    for part in parts:
        if model is None:
            return []
        if part in ROLES and model is PipelineSpec:
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _tool_entry(entry: Any) -> Any:
    if isinstance(entry, str):
        return {"name": entry}
    if isinstance(entry, Mapping) and "name" not in entry and len(entry) == 1:
        ((name, options),) = entry.items()
        return {"name": name, "options": dict(options or {})} if isinstance(options, Mapping | None) else entry
    if isinstance(entry, Mapping) and "name" in entry and "options" not in entry:
        return {"name": entry["name"], "options": {k: v for k, v in entry.items() if k != "name"}}
    return entry


# -- loading, validation, errors --------------------------------------------------------------------------------
def load_spec(source: str | Path, *, overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Load a spec from a YAML file path or YAML text.

    Args:
        source: a path to a ``.yaml``/``.yml`` file, or the YAML text itself.
        overrides: dotted-path overrides (see `PipelineSpec.with_overrides`).

    Raises:
        SpecError: the file cannot be read, the YAML is malformed, or the spec is invalid (the message names
            the path and line).
    """
    name = "<string>"
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.strip().endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SpecError(f"cannot read {path}: {err.strerror or err}", source=str(path)) from None
        name = str(path)
    else:
        text = str(source)
    data, lines = _parse_yaml(text, name)
    spec = _validate(data, lines, source=name)
    return spec.with_overrides(overrides) if overrides else spec


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"malformed YAML: {problem}", line=line, source=source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"the document must be a mapping, got {type(data).__name__}", line=1, source=source)
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def _walk(node: yaml.Node, path: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            lines.setdefault(sub, key.start_mark.line + 1)
            _walk(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, str(i)), lines)


def _line(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _unknown(kind: str, name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Allowed: {', '.join(allowed)}."


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _loc_path(loc: tuple[int | str, ...]) -> tuple[str, ...]:
    """A pydantic error location as a YAML path: union member tags dropped, "engine" shorthand kept."""
    out: list[str] = []
    for part in loc:
        text = str(part)
        if text in ("str", "list[str]", "ReplySpec", "float", "list[list[float]]", "int", "bool") or "[" in text:
            continue
        out.append(text)
    return tuple(out)


def _allowed_for(loc: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] | None = PipelineSpec
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            if part.isdigit() or part in ROLES:
                continue
            return []
        model = _model_of(field.annotation)
    if model is EngineSpec:
        options = _backend_params("vllm") | _backend_params("openai") | _backend_params("transformers")
        return [*EngineSpec.model_fields, *sorted(options)]
    return list(model.model_fields) if model is not None else []


def _format_error(err: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    loc = _loc_path(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        return loc, _unknown("key", loc[-1], _allowed_for(loc[:-1]))
    ctx = err.get("ctx") or {}
    if kind in ("literal_error", "enum") and "expected" in ctx:
        allowed = re.findall(r"'([^']*)'", str(ctx["expected"])) or [str(ctx["expected"])]
        given = err.get("input")
        close = difflib.get_close_matches(str(given), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return loc, f"{given!r} is not allowed.{hint} Allowed: {', '.join(allowed)}."
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return loc, message


def _validate(data: dict[str, Any], lines: dict[tuple[str, ...], int], *, source: str) -> PipelineSpec:
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first_loc, first_msg = _format_error(errors[0])
        path = ".".join(first_loc)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        rest = "".join(
            f"\n  - {'.'.join(loc) or '(document)'} (line {_line(lines, loc)}): {msg}"
            for loc, msg in (_format_error(e) for e in errors[1:6])
        )
        raise SpecError(first_msg + more + rest, path=path, line=_line(lines, first_loc), source=source) from None
    spec._raw = copy.deepcopy(data)
    spec._lines = dict(lines)
    spec._source = source
    _check_thought(spec.thought, ("thought",), spec, lines, source)
    _check_roles(spec, lines, source)
    _check_planner(spec, lines, source)
    _check_tools(spec, lines, source)
    return spec


def _check_tools(spec: PipelineSpec, lines: Mapping[tuple[str, ...], int], source: str) -> None:
    """Tool names must be built-in tools; ``retrieve`` needs a corpus; tools need a planner."""
    if not spec.tools:
        return
    if spec.planner is None:
        raise SpecError(
            "tools are listed but there is no planner to call them: add a 'planner' section",
            path="tools",
            line=_line(lines, ("tools",)),
            source=source,
        )
    try:
        from ..executors.tools import default_tools
    except ImportError:  # an installation without executors: checked when the pipeline is built
        return
    known = sorted({*default_tools(enable_http=True).names(), "retrieve"})
    for i, tool in enumerate(spec.tools):
        loc = ("tools", str(i))
        if tool.name not in known:
            raise SpecError(
                _unknown("tool", tool.name, known), path=f"tools.{i}", line=_line(lines, loc), source=source
            )
        allowed = ["corpus"] if tool.name == "retrieve" else []
        for key in tool.options:
            if key not in allowed:
                raise SpecError(
                    _unknown(f"{tool.name} tool option", key, allowed)
                    if allowed
                    else f"tool {tool.name!r} takes no options",
                    path=f"tools.{i}.{key}",
                    line=_line(lines, (*loc, tool.name, key)),
                    source=source,
                )
        if tool.name == "retrieve" and "corpus" not in tool.options:
            raise SpecError(
                "tool 'retrieve' needs a corpus: tools: [retrieve: {corpus: path/to/docs/}]",
                path=f"tools.{i}",
                line=_line(lines, loc),
                source=source,
            )


def _check_planner(spec: PipelineSpec, lines: Mapping[tuple[str, ...], int], source: str) -> None:
    """Planner options must be arguments of the planner class (checked by building it: planners are cheap)."""
    if spec.planner is None:
        return
    try:
        from ..planners import get_planner
    except ImportError:  # an installation without planners: checked when the pipeline is built
        return
    cls = type(get_planner(spec.planner.kind))
    accepted = sorted(p for p in inspect.signature(cls.__init__).parameters if p != "self")
    for key in spec.planner.options:
        if key not in accepted:
            loc = ("planner", key) if ("planner", key) in lines else ("planner", "options", key)
            raise SpecError(
                _unknown(f"{spec.planner.kind} planner option", key, [*accepted, "kind", "max_replans"]),
                path=".".join(loc),
                line=_line(lines, loc),
                source=source,
            )
    try:
        cls(**spec.planner.options)
    except (ConfigError, TypeError, ValueError) as err:
        raise SpecError(str(err), path="planner", line=_line(lines, ("planner",)), source=source) from None


def _check_roles(spec: PipelineSpec, lines: Mapping[tuple[str, ...], int], source: str) -> None:
    declared = sorted(spec.engines)

    def fail(message: str, *loc: str) -> None:
        raise SpecError(message, path=".".join(loc), line=_line(lines, loc), source=source)

    for role, engine in spec.engines.items():
        used = [f for f in _DRAFT_FIELDS if getattr(engine, f) is not None]
        if role == "draft":
            if engine.backend != "vllm":
                fail("the draft role runs inside the vllm policy engine: its backend must be 'vllm'", "engines", role)
            if (engine.method or "draft_model") == "draft_model" and not engine.model:
                fail("a draft model needs 'model' (a small model with the policy's tokenizer), or write "
                     "'method: ngram'", "engines", role)  # fmt: skip
            if engine.method == "ngram" and engine.model:
                fail("'method: ngram' proposes tokens by prompt lookup and takes no model", "engines", role, "model")
            if engine.options:
                fail(f"the draft role takes no engine options ({', '.join(sorted(engine.options))}); allowed: "
                     f"model, {', '.join(_DRAFT_FIELDS)}", "engines", role)  # fmt: skip
            policy = spec.engines["policy"]
            if policy.backend != "vllm":
                fail(f"speculative decoding with a draft needs a vllm policy engine, not {policy.backend!r}", "engines",
                     role)  # fmt: skip
            if "speculative_config" in policy.options:
                fail("give speculative decoding once: the policy's speculative_config or a draft role, not both",
                     "engines", role)  # fmt: skip
        elif used:
            fail(f"{used[0]} only applies to the draft role", "engines", role, used[0])
        if role == "embedder" and engine.backend != "transformers":
            fail("the embedder role needs 'backend: transformers' (in-process sentence embeddings)", "engines", role,
                 "backend")  # fmt: skip
        if role != "embedder" and engine.backend == "transformers":
            fail(f"the 'transformers' backend only serves the embedder role, not {role!r}", "engines", role,
                 "backend")  # fmt: skip
    redundancy = spec.verifiers.redundancy
    if "embedder" in spec.engines and (redundancy is None or redundancy.kind != "embedding"):
        fail("an embedder is declared but nothing uses it: set 'verifiers.redundancy.kind: embedding'",
             "engines", "embedder")  # fmt: skip
    refs: list[tuple[tuple[str, ...], str | None]] = []
    if spec.verifiers.step_scorer is not None:
        refs.append((("verifiers", "step_scorer", "engine"), spec.verifiers.step_scorer.engine))
    if spec.verifiers.verifier is not None:
        refs.append((("verifiers", "verifier", "engine"), spec.verifiers.verifier.engine))
    for loc, ref in refs:
        if ref is not None and ref not in spec.engines:
            raise SpecError(
                f"engine role {ref!r} is not declared under 'engines' (declared: {', '.join(declared)})",
                path=".".join(loc),
                line=_line(lines, loc),
                source=source,
            )


def strategy_classes() -> dict[str, type[Any]]:
    """Strategy classes by name, from the `branchwise.search` registry."""
    from .. import search

    return {name: search.strategy_info(name).cls for name in search.available_strategies()}


def _check_thought(
    thought: ThoughtSpec,
    loc: tuple[str, ...],
    spec: PipelineSpec,
    lines: Mapping[tuple[str, ...], int],
    source: str,
) -> None:
    classes = strategy_classes()

    def fail(sub: tuple[str, ...], message: str) -> SpecError:
        return SpecError(message, path=".".join(sub), line=_line(lines, sub), source=source)

    cls = classes.get(thought.strategy)
    if cls is None:
        raise fail((*loc, "strategy"), _unknown("strategy", thought.strategy, sorted(classes)))
    signature = inspect.signature(cls.__init__)
    accepted = [p for p in signature.parameters if p != "self"]
    special = _OBJECT_PARAMS.get(thought.strategy, {})
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward references: fall back to the strategy's own checks
        hints = {}
    for key, value in thought.params.items():
        sub = (*loc, key)
        if key not in accepted:
            raise fail(
                sub, _unknown(f"{thought.strategy} parameter", key, sorted(accepted + list(ThoughtSpec.model_fields)))
            )
        if key in special:
            _check_special(thought.strategy, key, value, sub, spec, lines, source, fail)
            continue
        hint = hints.get(key)
        if hint is not None:
            try:
                TypeAdapter(hint).validate_python(value, strict=False)
            except ValidationError as exc:
                raise fail(sub, _format_error(exc.errors()[0])[1]) from None
            except Exception:  # a hint pydantic cannot build a validator for: the constructor checks it
                pass
    try:
        build_strategy(thought, spec, scorer=_Placeholder.scorer(), judge=None, validate_only=True)
    except ConfigError as err:
        raise fail(loc, str(err)) from None
    except (TypeError, ValueError) as err:
        raise fail(loc, f"{thought.strategy}: {err}") from None


def _check_special(  # noqa: PLR0917 - internal helper of _check_thought
    strategy: str,
    key: str,
    value: Any,
    sub: tuple[str, ...],
    spec: PipelineSpec,
    lines: Mapping[tuple[str, ...], int],
    source: str,
    fail: Callable[[tuple[str, ...], str], SpecError],
) -> None:
    if strategy in ("beam", "dvts") and key == "scorer":
        raise fail(sub, f"{strategy} takes its step scorer from 'verifiers.step_scorer', not from 'thought.scorer'")
    if strategy == "prune" and key == "judge":
        raise fail(sub, "prune takes its redundancy judge from 'verifiers.redundancy', not from 'thought.judge'")
    if strategy == "best_of_n" and key == "scorer":
        if value not in ("confidence", "verifier"):
            raise fail(sub, _unknown("best_of_n scorer", str(value), ["confidence", "verifier"]))
        if value == "verifier" and spec.verifiers.verifier is None:
            raise fail(sub, "scorer 'verifier' needs a 'verifiers.verifier' section")
        return
    if strategy == "adaptive" and key == "escalate_to":
        if not isinstance(value, Mapping):
            raise fail(sub, "escalate_to must be a thought mapping, e.g. {strategy: deepconf, n: 16}")
        try:
            nested = ThoughtSpec.model_validate(dict(value))
        except ValidationError as exc:
            loc, message = _format_error(exc.errors()[0])
            raise fail((*sub, *loc), message) from None
        _check_thought(nested, sub, spec, lines, source)


class _Placeholder:
    """Stand-ins for objects built from other sections, so a strategy's constructor can check its values."""

    @staticmethod
    def scorer() -> Any:
        from ..verifiers.step_scorers import ScriptedStepScorer

        return ScriptedStepScorer({}, default=0.5)


def build_strategy(
    thought: ThoughtSpec,
    spec: PipelineSpec,
    *,
    scorer: Any = None,
    judge: Any = None,
    verifier: Any = None,
    validate_only: bool = False,
) -> Any:
    """Instantiate the strategy a thought spec describes.

    Args:
        thought: the thought section.
        spec: the whole spec (for nested thoughts).
        scorer: the step scorer for beam/dvts.
        judge: the redundancy judge for prune.
        verifier: the generative verifier for ``best_of_n`` with ``scorer: verifier``.
        validate_only: building to check parameters only.

    Raises:
        ConfigError: the strategy rejects its parameters.
    """
    cls = strategy_classes()[thought.strategy]
    params = thought.params
    if thought.strategy in ("beam", "dvts"):
        params["scorer"] = scorer
    elif thought.strategy == "prune" and judge is not None:
        params["judge"] = judge
    elif thought.strategy == "best_of_n" and params.get("scorer") == "verifier":
        params["scorer"] = verifier if verifier is not None else _dummy_scorer
    elif thought.strategy == "adaptive" and isinstance(params.get("escalate_to"), Mapping):
        nested = ThoughtSpec.model_validate(dict(params["escalate_to"]))
        params["escalate_to"] = build_strategy(
            nested, spec, scorer=scorer, judge=judge, verifier=verifier, validate_only=validate_only
        )
    if thought.strategy == "adaptive" and isinstance(params.get("stages"), list):
        params["stages"] = tuple(params["stages"])
    return cls(**params)


async def _dummy_scorer(problem: str, candidate: Any) -> float:  # pragma: no cover - never called
    return 0.0


# -- environment references and redaction ---------------------------------------------------------------------
def resolve_env(
    data: Any,
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<string>",
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of ``data`` (a copy is returned).

    Raises:
        SpecError: a variable is unset and has no default (names the YAML path and the variable).
    """
    env = os.environ if environ is None else environ

    def sub(value: str, path: tuple[str, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise SpecError(
                f"environment variable {name!r} is not set",
                path=".".join(path),
                line=_line(lines or {}, path),
                source=source,
            )

        return _ENV_REF.sub(one, value)

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, str):
            return sub(value, path)
        if isinstance(value, dict):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, str(i))) for i, v in enumerate(value)]
        return value

    return walk(data, ())


def _redact(data: Any) -> Any:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            secret = any(s in str(key).lower() for s in SECRET_KEYS)
            if secret and isinstance(value, str) and not _ENV_REF.fullmatch(value.strip()):
                out[key] = "***"
            else:
                out[key] = _redact(value)
        return out
    if isinstance(data, list):
        return [_redact(v) for v in data]
    return data


def redact_text(text: str, secrets: Iterator[str] | list[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def pipeline_json_schema() -> dict[str, Any]:
    """The JSON schema of a pipeline spec (what ``branchwise schema`` prints), for editor validation.

    The thought section is checked per strategy: an ``if strategy == name`` branch lists that strategy's
    parameters, and ``unevaluatedProperties: false`` (JSON Schema 2020-12) rejects any other key.
    """
    schema = PipelineSpec.model_json_schema()
    thought = schema.get("$defs", {}).get("ThoughtSpec")
    if thought is not None:
        classes = strategy_classes()
        thought["properties"]["strategy"]["enum"] = sorted(classes)
        thought.pop("additionalProperties", None)
        thought["unevaluatedProperties"] = False
        branches: list[dict[str, Any]] = []
        for name, cls in sorted(classes.items()):
            props = _param_schemas(name, cls)
            branches.append(
                {
                    "if": {"properties": {"strategy": {"const": name}}, "required": ["strategy"]},
                    "then": {"properties": props},
                }
            )
            if name == "single":  # the default strategy when none is named
                branches.append({"if": {"not": {"required": ["strategy"]}}, "then": {"properties": props}})
        thought["allOf"] = branches
    _shorthands(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "branchwise pipeline"
    return schema


def _shorthands(schema: dict[str, Any]) -> None:
    """Let the schema accept what the loader's shorthands accept (backend/planner arguments next to their kind,
    tool names, a grader name, a boolean progress)."""
    import importlib

    defs = schema.get("$defs", {})
    engine = defs.get("EngineSpec")
    if engine is not None:
        for module, name in (
            ("branchwise.engine.vllm_engine", "VLLMEngine"),
            ("branchwise.engine.openai_engine", "OpenAIEngine"),
        ):
            try:
                cls = getattr(importlib.import_module(module), name)
            except ImportError:
                continue
            for param, entry in _param_schemas("", cls).items():
                if param not in ("model", "base_url", "api_key", "transport"):
                    engine["properties"].setdefault(param, entry)
    planner = defs.get("PlannerSpec")
    if planner is not None:
        try:
            from ..planners import get_planner

            for kind in ("llmcompiler", "structured", "decompose"):
                for param, entry in _param_schemas("", type(get_planner(kind))).items():
                    planner["properties"].setdefault(param, entry)
        except ImportError:
            planner["additionalProperties"] = True
    schema["properties"]["tools"]["items"] = {
        "anyOf": [
            {"type": "string", "description": "a tool name"},
            {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                "description": "{tool_name: {options}}",
            },
            {"$ref": "#/$defs/ToolSpec"},
        ]
    }
    verifiers = defs.get("VerifiersSpec")
    if verifiers is not None:
        verifiers["properties"]["grader"] = {
            "anyOf": [{"enum": ["numeric", "math", "qa", "yesno"]}, {"$ref": "#/$defs/GraderSpec"}]
        }
    outputs = defs.get("OutputsSpec")
    if outputs is not None:
        progress = outputs["properties"]["progress"]
        outputs["properties"]["progress"] = {
            "anyOf": [{"enum": progress.pop("enum"), "type": "string"}, {"type": "boolean"}],
            **progress,
        }
        outputs["properties"]["progress"].pop("type", None)


def _param_schemas(strategy: str, cls: type[Any]) -> dict[str, Any]:
    """JSON schemas of a strategy's constructor parameters (``{}`` where a type has no plain JSON form)."""
    import json

    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable forward references: parameters are listed without types
        hints = {}
    special = _OBJECT_PARAMS.get(strategy, {})
    out: dict[str, Any] = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name in special:
            if strategy == "best_of_n":
                out[param.name] = {"enum": ["confidence", "verifier"]}
            elif strategy == "adaptive":
                out[param.name] = {"type": "object", "description": "a nested thought: {strategy: ..., ...}"}
            continue  # beam/dvts scorer and prune judge come from the verifiers section
        entry: dict[str, Any] = {}
        hint = hints.get(param.name)
        if hint is not None:
            try:
                candidate = TypeAdapter(hint).json_schema()
                if "$ref" not in json.dumps(candidate):
                    entry = candidate
            except Exception:  # a type pydantic cannot describe: leave it open
                entry = {}
        if param.default is not inspect.Parameter.empty and _plain(param.default):
            entry["default"] = list(param.default) if isinstance(param.default, tuple) else param.default
        out[param.name] = entry
    return out


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, tuple) and all(isinstance(v, (int, float, str)) for v in value)
