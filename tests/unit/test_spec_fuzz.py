"""Fuzzing the parsers of outside text in the orchestrator: the YAML spec loader, ``--set`` overrides, and the
trace reader (with ``trace show``'s renderer). Each property: only the documented error type, within a bounded
time per input.

Example counts come from the shared hypothesis profile (tests/_hypothesis_profiles.py): ``short`` by default,
``HYPOTHESIS_PROFILE=long`` for a fuzzing session.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from branchwise.cli.run import _overrides
from branchwise.cli.trace_view import render_trace
from branchwise.errors import ConfigError, SpecError, TraceFormatError
from branchwise.orchestrator.spec import PipelineSpec, load_spec, load_spec_file
from branchwise.orchestrator.tracing import TRACE_FORMAT, read_trace
from branchwise.search import available_strategies

SECONDS_PER_INPUT = 2.0
BASE = "engine: {backend: test, default: 'The answer is 4.'}\n"

KEYS = [
    "engine", "engines", "policy", "judge", "draft", "embedder", "backend", "model", "options", "replies", "rules",
    "default", "planner", "kind", "max_replans", "tools", "thought", "strategy", "n", "warmup", "beam_width",
    "max_depth", "rounds", "m", "stages", "escalate_to", "scorer", "judge", "max_tokens", "temperature", "prompt",
    "user", "verifiers", "grader", "step_scorer", "verifier", "redundancy", "budget", "runtime", "concurrency",
    "outputs", "trace", "progress", "calculator", "retrieve", "corpus", "version", "api_key", "base_url",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["test", "vllm", "single", "beam", "${HOME}", "${NOPE_UNSET}", "{question}", *available_strategies()]
    ),
    st.text(max_size=20),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=40,
)
DOCUMENTS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6)


def within_bounds(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, asserting it took less than `SECONDS_PER_INPUT` of this process's CPU time (wall time on the
    shared test machines also counts other processes)."""
    started = time.process_time()
    try:
        return fn(*args)
    finally:
        assert time.process_time() - started < SECONDS_PER_INPUT


def loads_or_spec_error(text: str) -> None:
    try:
        spec = within_bounds(load_spec, text)
    except SpecError:
        return
    assert isinstance(spec, PipelineSpec)
    try:
        within_bounds(spec.resolved)
    except SpecError:
        pass


@given(st.text(max_size=400))
def test_any_text_loads_or_raises_a_spec_error(text: str) -> None:
    loads_or_spec_error(text)


@given(DOCUMENTS)
def test_spec_shaped_documents_load_or_raise_a_spec_error(document: dict[str, Any]) -> None:
    loads_or_spec_error(yaml.safe_dump(document, allow_unicode=True))
    loads_or_spec_error(BASE + yaml.safe_dump(document, allow_unicode=True))


@given(
    DOCUMENTS, st.integers(min_value=0, max_value=400), st.sampled_from(["&a ", "*a ", "<<: *a\n", "!!", "? ", "\t"])
)
def test_documents_with_yaml_features_spliced_in_load_or_raise_a_spec_error(
    document: dict[str, Any], at: int, piece: str
) -> None:
    text = BASE + yaml.safe_dump(document)
    at = min(at, len(text))
    loads_or_spec_error(text[:at] + piece + text[at:])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_any_file_loads_or_raises_a_spec_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    try:
        within_bounds(load_spec_file, path)
    except SpecError:
        pass


SPEC = load_spec(BASE + "thought: {strategy: self_consistency, n: 4}\nbudget: {max_tokens: 10000}\n")
PATHS = st.lists(st.sampled_from(KEYS) | st.text(max_size=6), min_size=1, max_size=4).map(".".join)


@given(st.lists(st.tuples(PATHS, st.text(max_size=40) | SCALARS.map(str)), max_size=4))
def test_set_overrides_apply_or_raise_a_config_error(pairs: list[tuple[str, str]]) -> None:
    try:
        overrides = _overrides([f"{key}={value}" for key, value in pairs])
        spec = within_bounds(SPEC.with_overrides, overrides)
    except ConfigError:  # SpecError for the spec, ConfigError for a malformed KEY=VALUE
        return
    assert isinstance(spec, PipelineSpec)


# -- the trace reader ----------------------------------------------------------------------------------------------
HEADER = {"format": TRACE_FORMAT, "version": 1, "run_id": "r", "query": "q", "spec": None}
KINDS = ["run_start", "run_end", "strategy_start", "strategy_end", "trace_start", "trace_end", "engine_call",
         "budget_charge", "budget_exhausted", "error", "decision", "plan_node", "node_end", "other"]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["usage", "scores", "votes", "budget", "traces", "tokens", "status", "answer", "prompt_tokens", "model", "role",
     "seconds", "decisions", "tree", "trace", "parent", "kind", "detail", "rule", "cap", "params", "engines"]
)  # fmt: skip
EVENTS = st.fixed_dictionaries(  # mostly well-formed records, with any value in any field
    {
        "seq": st.integers(min_value=0, max_value=10**6) | JSON_VALUES,
        "t": st.floats(min_value=0, max_value=1e6) | JSON_VALUES,
        "kind": st.sampled_from(KINDS) | JSON_VALUES,
        "data": st.dictionaries(FIELDS, JSON_VALUES, max_size=5) | JSON_VALUES,
    }
)


def reads_or_trace_format_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        trace = within_bounds(read_trace, path)
    except TraceFormatError:
        return
    console = Console(file=io.StringIO(), width=100)
    within_bounds(console.print, render_trace(trace))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600))
def test_any_bytes_read_as_a_trace_or_raise_a_trace_format_error(tmp_path: Path, data: bytes) -> None:
    reads_or_trace_format_error(tmp_path, data)
    reads_or_trace_format_error(tmp_path, json.dumps(HEADER).encode() + b"\n" + data)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(EVENTS, max_size=6), st.booleans())
def test_records_of_any_shape_read_and_render_or_raise_a_trace_format_error(
    tmp_path: Path, events: list[dict[str, Any]], cut: bool
) -> None:
    text = json.dumps(HEADER) + "\n" + "".join(json.dumps(e) + "\n" for e in events)
    data = text.encode()
    reads_or_trace_format_error(tmp_path, data[: len(data) * 2 // 3] if cut else data)
