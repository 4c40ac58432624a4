"""Orchestration: the `Pipeline` facade, building components from a YAML spec, trace recording and live progress."""

from __future__ import annotations

from .pipeline import Pipeline, RunResult, run, run_sync
from .spec import PipelineSpec, SpecError, load_spec, pipeline_json_schema
from .tracing import TRACE_FORMAT, TRACE_VERSION, Event, TraceFile, TraceFormatError, read_trace

__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "Event",
    "Pipeline",
    "PipelineSpec",
    "RunResult",
    "SpecError",
    "TraceFile",
    "TraceFormatError",
    "load_spec",
    "pipeline_json_schema",
    "read_trace",
    "run",
    "run_sync",
]
