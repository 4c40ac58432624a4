"""The ``branchwise`` command line.

Subcommands:
    run PIPELINE.yaml QUESTION   run a pipeline, print the answer and a summary (tokens, calls, time, pruned)
    validate PIPELINE.yaml       check pipeline specs (errors name the file, the YAML path and line)
    schema                       print the JSON schema of pipeline specs (for editors)
    trace show TRACE.jsonl       render a recorded run as a tree
    models list                  registered offline models, their size and whether they are provisioned
    models pull NAME             provision a model into the cache (idempotent)
    eval PIPELINE.yaml --benchmark NAME   evaluate a pipeline on a benchmark (see `branchwise.cli.evaluate`)
    report RESULTS.db [OTHER.db]          Markdown + HTML report of evaluation results
    sample PIPELINE.yaml --benchmark NAME --n N --out BANK   draw a trace bank (see `branchwise.cli.sample`)
    serve PIPELINE.yaml...       serve pipelines behind an OpenAI-compatible endpoint (see `branchwise.cli.serve`)

Exit codes, the same for every command:

====  ===========================================================================================================
code  meaning
====  ===========================================================================================================
0     success
1     failed at run time: an engine, tool, model download or evaluation budget gave out (`BranchwiseError`
      that is not a `ConfigError`); the message names the error type
2     bad input, refused before any work: a spec, plan, trace or benchmark file, a command-line argument or
      option (argparse's own errors too), an unknown name, a missing optional dependency (`ConfigError`)
130   interrupted (Ctrl-C, or SIGTERM): in-flight work is cancelled, engine requests aborted, engine processes
      shut down, traces and finished results kept
====  ===========================================================================================================

SIGTERM (``kill``, a job scheduler, a container stop) is handled as Ctrl-C, also in a process started in the
background by a shell, which ignores SIGINT: without it an embedded vLLM engine's processes would outlive the
command and go on generating.

vLLM's own log lines are hidden (``VLLM_LOGGING_LEVEL=ERROR``) unless ``branchwise -v ...`` asks for them or
``VLLM_LOGGING_LEVEL`` is set.

Arguments that name files are paths (a missing one is reported as missing, never read as YAML text). Command-line
text that is not valid in the locale's encoding is kept as Python decodes it (``surrogateescape``) and written to
traces as ``\\udcXX`` escapes that read back to the same string; output that cannot be encoded is escaped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType

from ..errors import BranchwiseError, ConfigError
from . import evaluate, models, run, sample, serve

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "VLLM_LOG_ENV", "build_parser", "main"]

VLLM_LOG_ENV = "VLLM_LOGGING_LEVEL"
"""vLLM's own log level; ``branchwise`` sets it to ERROR unless ``-v`` is given or it is already set."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The ``branchwise`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"show the engine's own log lines (vLLM's; hidden by default unless {VLLM_LOG_ENV} is set)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_commands(sub)
    models.add_commands(sub)
    evaluate.add_commands(sub)
    sample.add_commands(sub)
    serve.add_commands(sub)
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as Ctrl-C: through SIGINT's Python handler (asyncio.run's cancels the main task), else raised."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job) or left to the OS
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM as Ctrl-C while a command runs (main thread only; a no-op elsewhere)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (see the table above)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2, already printed)
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    if not args.verbose:
        # vLLM reads this when it is first imported (lazily, by the engine), in this process and its workers.
        os.environ.setdefault(VLLM_LOG_ENV, "ERROR")
    try:
        with _sigterm_as_interrupt():
            return int(args.func(args))
    except ConfigError as err:
        print(f"branchwise: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BranchwiseError as err:
        print(f"branchwise: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("branchwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
