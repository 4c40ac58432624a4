"""Orchestration: the `Pipeline` facade, the YAML spec and building a pipeline from it, trace recording and live
progress.

Modules: `pipeline` (the facade), `build` (engines and components from a spec), `recording` (one run's events),
`spec` (the document, loading, overrides), `spec_models` (its sections), `spec_yaml` (the bounded YAML reader),
`spec_checks` and `spec_strategy` (checks across sections; the thought section from the strategy registry),
`spec_env` (environment references, redaction), `spec_schema` (the JSON schema), `tracing` (the trace format,
recorder, OpenTelemetry), `progress` (the live view).
"""

from __future__ import annotations

from .pipeline import Pipeline, RunResult, run, run_sync
from .spec import PipelineSpec, SpecError, load_spec, load_spec_file
from .spec_schema import pipeline_json_schema
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
    "load_spec_file",
    "pipeline_json_schema",
    "read_trace",
    "run",
    "run_sync",
]
