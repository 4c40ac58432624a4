"""The YAML pipeline spec: the whole document, loading it with line numbers, and dotted-path overrides.

A spec describes one pipeline: the engines and the roles they play, an optional planner, tools, the
test-time-scaling strategy every reasoning thread runs (``thought``), verifiers, the budget, runtime knobs
(seed, dtype, concurrency) and outputs (trace file, live progress, OpenTelemetry).

```yaml
engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 2048}
thought: {strategy: self_consistency, n: 8, max_tokens: 256}
budget: {max_tokens: 20000}
outputs: {trace: runs/sc.jsonl}
```

Errors are `SpecError`s that name the file, the YAML path and line, list the allowed values and suggest the
closest name for a typo. Strings may reference environment variables as ``${NAME}`` (or ``${NAME:-default}``);
they are resolved only when the pipeline is built (`PipelineSpec.resolved`) and the spec recorded in a trace keeps
the references, never their values. The sections are in `branchwise.orchestrator.spec_models`, the bounded YAML
reader in `spec_yaml`, the checks across sections in `spec_checks`, the JSON schema in `spec_schema`.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from ..errors import SpecError
from .spec_checks import check_planner, check_roles, check_thought, check_tools
from .spec_env import redact, resolve_env
from .spec_models import (
    ROLES,
    BudgetSpec,
    EngineRole,
    EngineSpec,
    GraderSpec,
    OutputsSpec,
    PlannerSpec,
    PromptSpec,
    RedundancySpec,
    ReplySpec,
    Role,
    RuleSpec,
    RuntimeSpec,
    SectionModel,
    StepScorerSpec,
    ThoughtSpec,
    ToolSpec,
    VerifierSpec,
    VerifiersSpec,
    backend_params,
    did_you_mean,
)
from .spec_strategy import Where
from .spec_yaml import Lines, line_at, parse_value, parse_yaml, read_spec_file

__all__ = [
    "ROLES",
    "BudgetSpec",
    "EngineRole",
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
    "load_spec_file",
    "resolve_env",
]


class PipelineSpec(SectionModel):
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

    @property
    def lines(self) -> Lines:
        """The YAML line of every path written in the text."""
        return dict(self._lines)

    def line_of(self, path: str) -> int | None:
        """The YAML line of a dotted path (or of its closest ancestor present in the text)."""
        return line_at(self._lines, tuple(path.split(".")) if path else ())

    def raw(self) -> dict[str, Any]:
        """The spec as written (environment references unresolved)."""
        raw: dict[str, Any] = copy.deepcopy(self._raw)
        return raw

    def redacted(self) -> dict[str, Any]:
        """The spec as written, with literal secrets masked: safe to record in traces."""
        masked: dict[str, Any] = redact(self.raw())
        return masked

    def with_overrides(self, overrides: Mapping[str, Any], *, parse_strings: bool = True) -> PipelineSpec:
        """A new spec with dotted-path overrides applied, e.g. ``{"thought.n": "8", "budget.max_tokens": 4000}``.

        String values are parsed as YAML ("8" -> 8, "true" -> True, "null" -> None, "[1, 2]" -> list), within
        the reader's bounds, unless ``parse_strings`` is False (values that are already typed, such as JSON from
        an API request, where a string is a string).

        Raises:
            SpecError: a path runs through something that is not a mapping, a value is not YAML, or the result
                is invalid.
        """
        data = self.raw()
        for dotted, given in overrides.items():
            _override(data, str(dotted), given, parse=parse_strings)
        # lines of overridden paths no longer describe their values: errors there point at the parent
        overridden = [tuple(str(k).split(".")) for k in overrides]
        lines = {path: line for path, line in self._lines.items() if not any(path[: len(o)] == o for o in overridden)}
        return validate_spec(data, lines, source=self._source)

    def resolved(self) -> PipelineSpec:
        """The spec with every ``${ENV_VAR}`` reference replaced by its value (done when building).

        Raises:
            SpecError: a referenced variable is unset and has no ``:-default``.
        """
        data = resolve_env(self.raw(), source=self._source, lines=self._lines)
        spec = validate_spec(data, self._lines, source=self._source)
        spec._raw = self.raw()  # keep the references, not the values, for records
        return spec


# -- loading, validation, errors --------------------------------------------------------------------------------
def load_spec(source: str | Path, *, overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Load a spec from a file (a `Path`, or a one-line string ending in ``.yaml``/``.yml``) or from YAML text.

    Args:
        source: the file, or the YAML text itself.
        overrides: dotted-path overrides (see `PipelineSpec.with_overrides`).

    Raises:
        SpecError: the file does not exist or cannot be read, is not UTF-8 or too large, the YAML is malformed or
            breaks the reader's bounds, or the spec is invalid (the message names the file, path and line).
    """
    if isinstance(source, Path) or ("\n" not in source and source.strip().endswith((".yaml", ".yml"))):
        return load_spec_file(Path(source), overrides=overrides)
    data, lines = parse_yaml(source, "<string>")
    if isinstance(data, str) and "\n" not in source.strip():
        raise SpecError(f"{source!r} is not a spec: no such file, and as YAML text it is a string, not a mapping")
    spec = validate_spec(data, lines, source="<string>")
    return spec.with_overrides(overrides) if overrides else spec


def load_spec_file(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> PipelineSpec:
    """Load a spec file; whatever the name, it is a path (never read as YAML text).

    Raises:
        SpecError: as `load_spec`.
    """
    name = str(path)
    data, lines = parse_yaml(read_spec_file(Path(path)), name)
    spec = validate_spec(data, lines, source=name)
    return spec.with_overrides(overrides) if overrides else spec


def validate_spec(data: Any, lines: Lines, *, source: str) -> PipelineSpec:
    """A `PipelineSpec` from parsed YAML, checked section by section and across sections.

    Raises:
        SpecError: the first problem, with its path and line (and how many more there are).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"the document must be a mapping, got {type(data).__name__}", line=1, source=source)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first_loc, first_msg = _format_error(errors[0])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        rest = "".join(
            f"\n  - {'.'.join(loc) or '(document)'} (line {line_at(lines, loc)}): {msg}"
            for loc, msg in (_format_error(e) for e in errors[1:6])
        )
        raise SpecError(
            first_msg + more + rest, path=".".join(first_loc), line=line_at(lines, first_loc), source=source
        ) from None
    spec._raw = copy.deepcopy(data)
    spec._lines = dict(lines)
    spec._source = source
    where = Where(spec._lines, source)
    check_thought(spec.thought, spec.verifiers, spec.budget, where, roles=spec.engines)
    check_roles(spec.engines, spec.verifiers, where)
    check_planner(spec.planner, spec._lines, where)
    check_tools(spec.tools, spec.planner, where)
    return spec


def _override(data: dict[str, Any], dotted: str, given: Any, *, parse: bool) -> None:
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise SpecError(f"bad override path {dotted!r}", path=dotted, source="<override>")
    parsed = parse and isinstance(given, str) and given.strip()
    value = parse_value(given, f"<override {dotted}>") if parsed else given
    node: dict[str, Any] = data
    policy = _policy_mapping(data)
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if part == "engine" and i == 0 and "engine" not in node and policy is not None:
            node = policy
            continue
        child = node.get(part)
        if child is None:
            if not _mapping_field(parts[: i + 1]):
                raise SpecError(_unknown_path(here, node), path=dotted, source="<override>")
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"cannot set {dotted!r}: {here!r} is not a mapping", path=dotted, source="<override>")
        node = child
    if parts == ["engine"] and "engine" not in node and policy is not None:
        data["engines"]["policy"] = value  # the spec names its policy engine under `engines`
        return
    node[parts[-1]] = value


def _policy_mapping(data: Mapping[str, Any]) -> dict[str, Any] | None:
    engines = data.get("engines")
    policy = engines.get("policy") if isinstance(engines, dict) else None
    return policy if isinstance(policy, dict) else None


def _mapping_field(parts: list[str]) -> bool:
    """True when the dotted path names a mapping-valued spec section that may be absent from the YAML."""
    top = parts[0]
    if len(parts) == 1:
        return top in PipelineSpec.model_fields and top not in ("tools", "version", "name", "description")
    if top == "engines" and len(parts) == 2:
        return parts[1] in ROLES
    if top == "verifiers" and len(parts) == 2:
        return parts[1] in ("grader", "step_scorer", "verifier", "redundancy")
    return parts[-1] in ("options", "prompt")


def _unknown_path(here: str, node: Mapping[str, Any]) -> str:
    parts = here.split(".")
    return did_you_mean("spec section", parts[-1], sorted({str(k) for k in node} | set(_fields_at(parts[:-1]))))


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
        options = backend_params("vllm") | backend_params("openai") | backend_params("transformers")
        return [*EngineSpec.model_fields, *sorted(options)]
    return list(model.model_fields) if model is not None else []


def _format_error(err: Mapping[str, Any]) -> tuple[tuple[str, ...], str]:
    loc = _loc_path(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden" and loc:
        return loc, did_you_mean("key", loc[-1], _allowed_for(loc[:-1]))
    ctx = err.get("ctx") or {}
    if kind in ("literal_error", "enum") and "expected" in ctx:
        allowed = re.findall(r"'([^']*)'", str(ctx["expected"])) or [str(ctx["expected"])]
        given = err.get("input")
        close = difflib.get_close_matches(str(given), allowed, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return loc, f"{given!r} is not allowed.{hint} Allowed: {', '.join(allowed)}."
    message = str(err.get("msg", "invalid value"))
    return loc, message.removeprefix("Value error, ")
