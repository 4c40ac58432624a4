"""``branchwise serve``: pipelines behind an OpenAI-compatible HTTP endpoint (see `branchwise.serve`).

The server binds 127.0.0.1 unless told otherwise and refuses a non-loopback address without an API key. It prints
its URL on stderr once every engine has started and the port listens. SIGTERM or Ctrl-C drains it (runs in flight
get ``--drain-timeout`` seconds, then are cancelled) and it exits with 130, like every command that is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError
from ..serve.limits import ServerLimits
from ..serve.pipelines import PipelineSet
from .args import bounded_int

__all__ = ["API_KEYS_ENV", "add_commands"]

API_KEYS_ENV = "BRANCHWISE_API_KEYS"
"""Comma-separated API keys, added to those given with ``--api-key`` (keeps keys out of the process list)."""

_LIMIT_HELP = {
    "max_tokens": "token cap per trace; a request's max_tokens is clipped to it",
    "max_run_tokens": "tokens one run may spend (budget.max_tokens)",
    "max_run_seconds": "wall clock of one run (budget.wall_clock_s)",
    "max_samples": "traces one run may start (thought.n, a beam's width x expansions...)",
    "max_body_bytes": "request body size (413 beyond it)",
    "max_query_chars": "characters in a request's messages",
    "max_concurrent_runs": "runs at once over all clients",
    "max_queued": "requests waiting for a slot; beyond it 429 with Retry-After",
    "max_runs_per_key": "runs running or waiting per API key; beyond it 429",
    "drain_timeout_s": "on SIGTERM / Ctrl-C, seconds runs in flight get before they are cancelled",
    "max_traces": "run traces kept (the oldest deleted beyond it)",
}
_FLAGS = {"drain_timeout_s": "--drain-timeout", "max_traces": "--keep-traces"}


def add_commands(subparsers: Any) -> None:
    """Register ``serve``."""
    serve = subparsers.add_parser("serve", help="serve pipelines behind an OpenAI-compatible endpoint")
    serve.add_argument(
        "pipelines", nargs="+", metavar="PIPELINE.yaml", type=Path, help="pipeline specs, or folders of them"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="port (default 8000; 0: any free)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"a key clients must send as 'Authorization: Bearer KEY' (repeatable; also ${API_KEYS_ENV}, "
        "comma-separated); required to bind an address other than loopback",
    )
    serve.add_argument(
        "--trace-dir",
        type=Path,
        help="write each run's JSONL trace here (default: a temporary folder, removed at exit); see --keep-traces",
    )
    defaults = ServerLimits()
    for f in fields(ServerLimits):
        if f.name not in _LIMIT_HELP:
            continue
        value = getattr(defaults, f.name)
        kind = bounded_int(0 if f.name == "max_queued" else 1) if isinstance(value, int) else _positive_float
        flag = _FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
        serve.add_argument(flag, dest=f.name, type=kind, default=value, help=f"{_LIMIT_HELP[f.name]} ({value:g})")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=_serve)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _api_keys(given: list[str]) -> list[str]:
    keys = [k.strip() for k in given] + [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",")]
    return [k for k in dict.fromkeys(keys) if k]


def _serve(args: argparse.Namespace) -> int:
    try:
        from ..serve.runner import BranchwiseServer  # noqa: PLC0415 - fastapi and uvicorn are the optional extra
    except ImportError as err:
        raise MissingDependencyError(
            "branchwise serve", err.name or "fastapi", 'pip install "branchwise[serve]"'
        ) from err
    limits = ServerLimits(**{name: getattr(args, name) for name in _LIMIT_HELP})
    pipelines = PipelineSet.load(args.pipelines, limits)
    keys = _api_keys(args.api_key)
    trace_dir = args.trace_dir or Path(tempfile.mkdtemp(prefix="branchwise-serve-"))
    trace_dir.mkdir(parents=True, exist_ok=True)
    try:
        server = BranchwiseServer(
            pipelines, host=args.host, port=args.port, api_keys=keys, trace_dir=trace_dir, access_log=args.access_log
        )
        names = ", ".join(pipelines.served)

        def ready() -> None:
            access = f"{len(keys)} API key{'s' if len(keys) != 1 else ''}" if keys else "no API key"
            print(f"branchwise: serving {names} at {server.url}/v1 ({access})", file=sys.stderr, flush=True)

        # asyncio's own loop: uvloop (installed with vLLM) measured slower here, 1.5-2.1 ms added per request and
        # 352-464 requests/s against 1.3-1.6 ms and 482-490 (benchmarks/serve_load.py, BENCHMARKS.md)
        asyncio.run(server.serve(on_ready=ready))
    finally:
        if args.trace_dir is None:
            shutil.rmtree(trace_dir, ignore_errors=True)
    if server.signalled:  # exit as every interrupted command does (130, "interrupted")
        cancelled = server.state.cancelled_at_deadline
        if cancelled:
            print(f"branchwise: {cancelled} run{'s' if cancelled != 1 else ''} cancelled at shutdown", file=sys.stderr)
        raise KeyboardInterrupt
    return 0
