"""``branchwise run``, ``validate``, ``schema`` and ``trace show``: pipelines and their traces on the command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import ConfigError
from ..orchestrator.pipeline import Pipeline, RunResult
from ..orchestrator.spec import PipelineSpec, load_spec_file
from ..orchestrator.spec_schema import pipeline_json_schema
from ..orchestrator.spec_yaml import MAX_SPEC_BYTES
from ..orchestrator.tracing import read_trace
from .args import bounded_int, existing_file
from .trace_view import render_trace

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    """Register ``run``, ``validate``, ``schema`` and ``trace show``."""
    run = subparsers.add_parser("run", help="run a pipeline on one question")
    run.add_argument("pipeline", metavar="PIPELINE.yaml", type=Path)
    run.add_argument("question", help="the question ('-' reads it from stdin)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    run.add_argument("--trace", metavar="PATH", help="write the JSONL trace here (overrides outputs.trace)")
    progress = run.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_const", const="on", help="live progress")
    progress.add_argument("--no-progress", dest="progress", action="store_const", const="off", help="no progress")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    run.set_defaults(func=_run)
    validate = subparsers.add_parser("validate", help="check pipeline specs")
    validate.add_argument("pipelines", nargs="+", metavar="PIPELINE.yaml", type=Path)
    validate.set_defaults(func=_validate)
    schema = subparsers.add_parser("schema", help="print the JSON schema of pipeline specs")
    schema.add_argument("--indent", action="store_true", help="pretty-print")
    schema.set_defaults(func=_schema)
    trace = subparsers.add_parser("trace", help="inspect recorded traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_sub.add_parser("show", help="render a JSONL trace as a tree")
    show.add_argument("trace", metavar="TRACE.jsonl", type=Path)
    show.add_argument("--max-traces", type=bounded_int(0), default=64, help="traces shown per strategy run")
    show.set_defaults(func=_trace_show)


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (a dotted spec path), got {pair!r}")
        out[key.strip()] = value
    return out


def _question(text: str) -> str:
    """The question argument; ``-`` reads it from stdin, undecodable bytes kept as Python keeps them in argv."""
    if text != "-":
        return text
    question = os.fsdecode(sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)).strip()
    if not question:
        raise ConfigError("the question read from stdin is empty")
    return question


def _run_spec(args: argparse.Namespace) -> PipelineSpec:
    spec = load_spec_file(args.pipeline)
    overrides: dict[str, Any] = _overrides(args.set)
    if args.trace is not None:
        overrides["outputs.trace"] = args.trace
    if args.progress is not None:
        overrides["outputs.progress"] = args.progress
    elif "progress" not in (spec.raw().get("outputs") or {}):
        overrides["outputs.progress"] = "auto"  # the command line shows progress unless the spec says otherwise
    return spec.with_overrides(overrides) if overrides else spec


def _run(args: argparse.Namespace) -> int:
    spec = _run_spec(args)
    question = _question(args.question)

    async def main() -> RunResult:
        async with Pipeline.from_spec(spec) as pipeline:
            return await pipeline.run(question)

    result = asyncio.run(main())
    summary = result.summary()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(result.answer if result.answer is not None else "(no answer)")
    line = (
        f"tokens {summary['prompt_tokens']} prompt + {summary['completion_tokens']} completion, "
        f"{summary['llm_calls']} calls, {summary['seconds']:.2f}s, {summary['pruned']} traces pruned"
    )
    if result.budget_exhausted:
        line += ", budget exhausted"
    if result.trace_path is not None:
        line += f", trace {result.trace_path}"
    print(line, file=sys.stderr)
    return 0


def _validate(args: argparse.Namespace) -> int:
    for path in args.pipelines:
        spec = load_spec_file(path)
        spec.resolved()  # environment references must resolve too
        roles = ", ".join(f"{r}={e.backend}:{e.model or 'default'}" for r, e in spec.engines.items())
        planner = spec.planner.kind if spec.planner else "none"
        print(f"{path}: ok ({roles}; planner {planner}; strategy {spec.thought.strategy})")
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(pipeline_json_schema(), indent=2 if args.indent else None))
    return 0


def _trace_show(args: argparse.Namespace) -> int:
    trace = read_trace(existing_file(args.trace, "trace"))
    Console().print(render_trace(trace, max_traces=args.max_traces))
    return 0
