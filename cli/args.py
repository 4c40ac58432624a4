"""Argument helpers shared by the commands: bounded numbers, and paths that must name existing files."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError

__all__ = ["bounded_int", "existing_file"]


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            expected = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a number {expected}, got {value}")
        return value

    return parse


def existing_file(path: Path, what: str) -> Path:
    """``path``, checked to name an existing file.

    Raises:
        ConfigError: it does not exist, or is not a file.
    """
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a file")
    return path
