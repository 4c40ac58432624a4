"""The ``branchwise`` command line.

Subcommands:
    run PIPELINE.yaml QUESTION   run a pipeline, print the answer and a summary (tokens, calls, time, pruned)
    validate PIPELINE.yaml       check a pipeline spec (errors name the YAML path and line)
    schema                       print the JSON schema of pipeline specs (for editors)
    trace show TRACE.jsonl       render a recorded run as a tree
    models list                  registered offline models, their size and whether they are provisioned
    models pull NAME             provision a model into the cache (idempotent)
    eval PIPELINE.yaml --benchmark NAME   evaluate a pipeline on a benchmark (see `branchwise.cli.evaluate`)
    report RESULTS.db [OTHER.db]          Markdown + HTML report of evaluation results
    sample PIPELINE.yaml --benchmark NAME --n N --out BANK   draw a trace bank (see `branchwise.cli.sample`)

Exit codes: 0 success, 1 runtime failure, 2 usage error (bad arguments, unknown names), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import BranchwiseError, ConfigError
from . import evaluate, models, run, sample

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``branchwise`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    models.add_commands(sub)
    evaluate.add_commands(sub)
    sample.add_commands(sub)
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
