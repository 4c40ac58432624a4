"""The JSON schema of pipeline specs (what ``branchwise schema`` prints), for editors.

The thought section is checked per strategy, from each strategy's registered declarations: an
``if strategy == name`` branch lists that strategy's plain parameters with their types, upper bounds, defaults
and docs, and ``unevaluatedProperties: false`` (JSON Schema 2020-12) rejects any other key.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from pydantic import TypeAdapter

from ..engine.openai_engine import OpenAIEngine
from ..engine.vllm_engine import VLLMEngine
from ..planners import get_planner
from ..search.registry import Component, NestedStrategy, StrategyInfo, available_strategies, strategy_info
from .spec import PipelineSpec
from .spec_strategy import COMPONENT_SECTIONS

__all__ = ["pipeline_json_schema"]

_PLANNER_KINDS = ("llmcompiler", "structured", "decompose")


def pipeline_json_schema() -> dict[str, Any]:
    """The JSON schema of a pipeline spec (Draft 2020-12)."""
    schema = PipelineSpec.model_json_schema()
    thought = schema["$defs"]["ThoughtSpec"]
    names = available_strategies()
    thought["properties"]["strategy"]["enum"] = names
    thought.pop("additionalProperties", None)
    thought["unevaluatedProperties"] = False
    branches: list[dict[str, Any]] = []
    for name in names:
        props = _strategy_properties(strategy_info(name))
        branches.append(
            {
                "if": {"properties": {"strategy": {"const": name}}, "required": ["strategy"]},
                "then": {"properties": props},
            }
        )
        if name == thought["properties"]["strategy"].get("default"):  # the strategy used when none is named
            branches.append({"if": {"not": {"required": ["strategy"]}}, "then": {"properties": props}})
    thought["allOf"] = branches
    _shorthands(schema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "branchwise pipeline"
    return schema


def _strategy_properties(info: StrategyInfo) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, param in info.params.items():
        source = param.source
        if source is None:
            props[name] = param.json_schema()
        elif isinstance(source, NestedStrategy):
            props[name] = {"type": "object", "description": "a nested thought: {strategy: ..., ...}"}
        elif isinstance(source, Component) and source.selector is not None:
            section = COMPONENT_SECTIONS[source.kind]
            props[name] = {
                "enum": [source.selector, *source.values],
                "description": f"{source.selector!r} uses the {section} section",
            }
        # a component never written under `thought` has no property: the schema rejects the key
    return props


def _constructor_properties(cls: type[Any], skip: set[str]) -> dict[str, Any]:
    """JSON schemas of a class's keyword arguments (an engine's or a planner's), for the keys a spec may write
    next to ``backend`` or ``kind``."""
    hints = typing.get_type_hints(cls.__init__)
    out: dict[str, Any] = {}
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        entry: dict[str, Any] = TypeAdapter(hints[param.name]).json_schema() if param.name in hints else {}
        out[param.name] = {} if "$ref" in str(entry) else entry
    return out


def _shorthands(schema: dict[str, Any]) -> None:
    """Let the schema accept what the loader's shorthands accept (backend/planner arguments next to their kind,
    tool names, a grader name, a boolean progress)."""
    defs = schema["$defs"]
    engine = defs["EngineSpec"]
    for cls in (VLLMEngine, OpenAIEngine):
        for param, entry in _constructor_properties(cls, {"self", "model", "base_url", "api_key", "transport"}).items():
            engine["properties"].setdefault(param, entry)
    planner = defs["PlannerSpec"]
    for kind in _PLANNER_KINDS:
        for param, entry in _constructor_properties(type(get_planner(kind)), {"self"}).items():
            planner["properties"].setdefault(param, entry)
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
    verifiers = defs["VerifiersSpec"]
    verifiers["properties"]["grader"] = {
        "anyOf": [{"enum": ["numeric", "math", "qa", "yesno"]}, {"$ref": "#/$defs/GraderSpec"}]
    }
    outputs = defs["OutputsSpec"]
    progress = outputs["properties"]["progress"]
    outputs["properties"]["progress"] = {
        "anyOf": [{"enum": progress.pop("enum"), "type": "string"}, {"type": "boolean"}],
        **progress,
    }
    outputs["properties"]["progress"].pop("type", None)
