"""The ``branchwise`` command line.

Subcommands:
    run PIPELINE.yaml QUESTION   run a pipeline, print the answer and a summary (tokens, calls, time, pruned)
    validate PIPELINE.yaml       check a pipeline spec (errors name the YAML path and line)
    schema                       print the JSON schema of pipeline specs (for editors)
    trace show TRACE.jsonl       render a recorded run as a tree
    models list                  registered offline models, their size and whether they are provisioned
    models pull NAME             provision a model into the cache (idempotent)
    eval PIPELINE.yaml --benchmark NAME   evaluate a pipeline on a benchmark (see `branchwise.evals.cli`)
    report RESULTS.db [OTHER.db]          Markdown + HTML report of evaluation results

Exit codes: 0 success, 1 runtime failure, 2 usage error (bad arguments, unknown names), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import BranchwiseError, ConfigError

__all__ = ["main"]


def _models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..engine.models import DEFAULT_MODEL, MODELS, is_pulled, model_dir

    table = Table(title="branchwise offline models")
    for column in ("name", "parameters", "size", "status", "description"):
        table.add_column(column)
    for name, spec in MODELS.items():
        status = f"ready ({model_dir(name)})" if is_pulled(name) else "not pulled"
        label = f"{name} (default)" if name == DEFAULT_MODEL else name
        table.add_row(label, f"{spec.parameters / 1e6:.0f}M", f"~{spec.size_mb} MB", status, spec.description)
    Console().print(table)
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from ..engine.models import pull

    def say(line: str) -> None:
        if not args.quiet:
            print(f"[branchwise] {line}", file=sys.stderr, flush=True)

    for name in args.names:
        path = pull(name, progress=say)
        print(path)
    return 0


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (a dotted spec path), got {pair!r}")
        out[key.strip()] = value
    return out


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from .pipeline import Pipeline
    from .spec import load_spec

    overrides = _overrides(args.set)
    if args.trace is not None:
        overrides["outputs.trace"] = args.trace
    if args.progress is not None:
        overrides["outputs.progress"] = args.progress
    elif "progress" not in (load_spec(args.pipeline).raw().get("outputs") or {}):
        overrides["outputs.progress"] = "auto"  # the command line shows progress unless the spec says otherwise
    spec = load_spec(args.pipeline, overrides=overrides or None)
    question = args.question
    if question == "-":
        question = sys.stdin.read().strip()

    async def main() -> Any:
        pipeline = Pipeline.from_spec(spec)
        async with pipeline:
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
    from .spec import load_spec

    for path in args.pipelines:
        spec = load_spec(path)
        spec.resolved()  # environment references must resolve too
        roles = ", ".join(f"{r}={e.backend}:{e.model or 'default'}" for r, e in spec.engines.items())
        planner = spec.planner.kind if spec.planner else "none"
        print(f"{path}: ok ({roles}; planner {planner}; strategy {spec.thought.strategy})")
    return 0


def _schema(args: argparse.Namespace) -> int:
    import json

    from .spec import pipeline_json_schema

    print(json.dumps(pipeline_json_schema(), indent=2 if args.indent else None))
    return 0


def _trace_show(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .trace_view import render_trace
    from .tracing import read_trace

    Console().print(render_trace(read_trace(args.trace), max_traces=args.max_traces))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline on one question")
    run.add_argument("pipeline", metavar="PIPELINE.yaml")
    run.add_argument("question", help="the question ('-' reads it from stdin)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec value")
    run.add_argument("--trace", metavar="PATH", help="write the JSONL trace here (overrides outputs.trace)")
    progress = run.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_const", const="on", help="live progress")
    progress.add_argument("--no-progress", dest="progress", action="store_const", const="off", help="no progress")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    run.set_defaults(func=_run)
    validate = sub.add_parser("validate", help="check pipeline specs")
    validate.add_argument("pipelines", nargs="+", metavar="PIPELINE.yaml")
    validate.set_defaults(func=_validate)
    schema = sub.add_parser("schema", help="print the JSON schema of pipeline specs")
    schema.add_argument("--indent", action="store_true", help="pretty-print")
    schema.set_defaults(func=_schema)
    trace = sub.add_parser("trace", help="inspect recorded traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_sub.add_parser("show", help="render a JSONL trace as a tree")
    show.add_argument("trace", metavar="TRACE.jsonl")
    show.add_argument("--max-traces", type=int, default=64, help="traces shown per strategy run")
    show.set_defaults(func=_trace_show)
    models = sub.add_parser("models", help="list or provision offline models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list registered models").set_defaults(func=_models_list)
    pull = models_sub.add_parser("pull", help="download, verify and convert a model into the cache")
    pull.add_argument("names", nargs="+", metavar="NAME")
    pull.add_argument("--quiet", action="store_true", help="no progress lines")
    pull.set_defaults(func=_models_pull)
    from ..evals.cli import add_commands as add_eval_commands  # eval, report

    add_eval_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"branchwise: error: {err}", file=sys.stderr)
        return 2
    except BranchwiseError as err:
        print(f"branchwise: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("branchwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
