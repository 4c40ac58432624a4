"""The ``branchwise`` command line.

Subcommands:
    models list          registered offline models, their size and whether they are provisioned
    models pull NAME     provision a model into the cache (idempotent)

Exit codes: 0 success, 1 runtime failure, 2 usage error (bad arguments, unknown names), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branchwise", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list or provision offline models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list registered models").set_defaults(func=_models_list)
    pull = models_sub.add_parser("pull", help="download, verify and convert a model into the cache")
    pull.add_argument("names", nargs="+", metavar="NAME")
    pull.add_argument("--quiet", action="store_true", help="no progress lines")
    pull.set_defaults(func=_models_pull)
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
