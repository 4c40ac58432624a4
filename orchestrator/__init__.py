"""Orchestration: the compute budget, the `Pipeline` facade and its YAML spec, trace recording, live progress,
and the ``branchwise`` command line.

`Pipeline`, the spec and tracing names are loaded on first use (they import the strategies, which import this
package's budget module)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .budget import (
    DEFAULT_MEMORY_WEIGHT,
    Budget,
    BudgetedEngine,
    CostEstimate,
    CostModel,
    Remaining,
    Usage,
    UsageSnapshot,
)

_LAZY: dict[str, str] = {
    "Pipeline": "pipeline",
    "RunResult": "pipeline",
    "run": "pipeline",
    "run_sync": "pipeline",
    "PipelineSpec": "spec",
    "SpecError": "spec",
    "load_spec": "spec",
    "pipeline_json_schema": "spec",
    "Event": "tracing",
    "TraceFile": "tracing",
    "TraceFormatError": "tracing",
    "read_trace": "tracing",
    "TRACE_FORMAT": "tracing",
    "TRACE_VERSION": "tracing",
}

__all__ = [
    "DEFAULT_MEMORY_WEIGHT",
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "Budget",
    "BudgetedEngine",
    "CostEstimate",
    "CostModel",
    "Event",
    "Pipeline",
    "PipelineSpec",
    "Remaining",
    "RunResult",
    "SpecError",
    "TraceFile",
    "TraceFormatError",
    "Usage",
    "UsageSnapshot",
    "load_spec",
    "pipeline_json_schema",
    "read_trace",
    "run",
    "run_sync",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .pipeline import Pipeline, RunResult, run, run_sync
    from .spec import PipelineSpec, SpecError, load_spec, pipeline_json_schema
    from .tracing import TRACE_FORMAT, TRACE_VERSION, Event, TraceFile, TraceFormatError, read_trace
