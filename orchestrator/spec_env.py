"""Environment references in a spec (``${NAME}``, ``${NAME:-default}``) and what must never be recorded.

References are resolved only when a pipeline is built; the spec recorded in a trace keeps the references, and
literal values under secret-looking keys (``api_key``, ``token``...) are masked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ..errors import SpecError
from .spec_yaml import Lines, line_at

__all__ = ["ENV_REF", "SECRET_KEYS", "redact", "resolve_env", "secret_values"]

SECRET_KEYS = ("api_key", "token", "secret", "password", "authorization")
"""Keys whose literal string values are masked in records (a key containing one of these, case-insensitive)."""
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_env(
    data: Any,
    *,
    environ: Mapping[str, str] | None = None,
    source: str = "<string>",
    lines: Lines | None = None,
) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string of ``data`` (a copy is returned).

    Raises:
        SpecError: a variable is unset and has no default (names the YAML path and the variable).
    """
    env = os.environ if environ is None else environ

    def sub(value: str, path: tuple[str, ...]) -> str:
        def one(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise SpecError(
                f"environment variable {name!r} is not set",
                path=".".join(path),
                line=line_at(lines or {}, path),
                source=source,
            )

        return ENV_REF.sub(one, value)

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, str):
            return sub(value, path)
        if isinstance(value, dict):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, str(i))) for i, v in enumerate(value)]
        return value

    return walk(data, ())


def redact(data: Any) -> Any:
    """``data`` with literal strings under secret-looking keys replaced by ``***`` (references are kept)."""
    if isinstance(data, dict):
        out: dict[Any, Any] = {}
        for key, value in data.items():
            secret = _secret_key(str(key))
            if secret and isinstance(value, str) and not ENV_REF.fullmatch(value.strip()):
                out[key] = "***"
            else:
                out[key] = redact(value)
        return out
    if isinstance(data, list):
        return [redact(v) for v in data]
    return data


def secret_values(raw: Any, *, source: str = "<string>") -> list[str]:
    """Strings that must never be written anywhere: the values of environment references, and the literal values
    under secret-looking keys; longest first, those shorter than 4 characters left out (they would mask common
    words).

    Raises:
        SpecError: a referenced variable is unset and has no default.
    """
    done = resolve_env(raw, source=source)
    found: list[str] = []

    def walk(written: Any, resolved: Any, key: str) -> None:
        if isinstance(written, dict) and isinstance(resolved, dict):
            for k in written:
                walk(written[k], resolved.get(k), str(k))
        elif isinstance(written, list) and isinstance(resolved, list):
            for x, y in zip(written, resolved, strict=False):
                walk(x, y, key)
        elif (
            isinstance(written, str)
            and isinstance(resolved, str)
            and ((ENV_REF.search(written) and resolved != written) or _secret_key(key))
        ):
            found.append(resolved)

    walk(raw, done, "")
    return sorted({f for f in found if len(f) >= 4}, key=len, reverse=True)


def _secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(s in lowered for s in SECRET_KEYS)
