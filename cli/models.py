"""``branchwise models list|pull``: the offline model registry on the command line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from ..engine.models import DEFAULT_MODEL, MODELS, is_pulled, model_dir, pull

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    """Register ``models list`` and ``models pull``."""
    models = subparsers.add_parser("models", help="list or provision offline models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list registered models").set_defaults(func=_models_list)
    pull_cmd = models_sub.add_parser("pull", help="download, verify and convert a model into the cache")
    pull_cmd.add_argument("names", nargs="+", metavar="NAME")
    pull_cmd.add_argument("--quiet", action="store_true", help="no progress lines")
    pull_cmd.set_defaults(func=_models_pull)


def _models_list(args: argparse.Namespace) -> int:
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
    def say(line: str) -> None:
        if not args.quiet:
            print(f"[branchwise] {line}", file=sys.stderr, flush=True)

    for name in args.names:
        print(pull(name, progress=say))
    return 0
