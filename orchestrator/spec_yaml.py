"""Reading a spec's YAML text within fixed bounds, with the line of every key.

A spec is outside text: a file of any size or encoding, or a document built to blow up (a "billion laughs" of
nested aliases expands 9 levels x 9 aliases into 387 million nodes from a few hundred bytes). Everything here is
bounded before it is built: the text is at most `MAX_SPEC_BYTES` of UTF-8, and a first pass over the parser's
events, which stops at the first limit crossed, refuses more than `MAX_ALIASES` aliases, nesting deeper than
`MAX_NESTING`, or more than `MAX_NODES` values counted with every alias expanded. Only then is the document
composed and constructed, and its line map walks each node once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError

__all__ = [
    "MAX_ALIASES",
    "MAX_NESTING",
    "MAX_NODES",
    "MAX_SPEC_BYTES",
    "Lines",
    "line_at",
    "parse_value",
    "parse_yaml",
    "read_spec_file",
]

MAX_SPEC_BYTES = 1_000_000
"""Largest spec accepted, in bytes (files and text alike)."""
MAX_ALIASES = 32
"""Most aliases (``*name``) in one document."""
MAX_NESTING = 32
"""Deepest nesting of mappings and sequences."""
MAX_NODES = 20_000
"""Most values in one document, counting every alias as the copy it stands for."""

Lines = Mapping[tuple[str, ...], int]
"""The 1-based YAML line of each path (a tuple of keys and list indexes, as strings)."""

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it


def read_spec_file(path: Path) -> str:
    """The text of a spec file.

    Raises:
        SpecError: the path does not exist, is not a file, cannot be read, is larger than `MAX_SPEC_BYTES`, or is
            not UTF-8 (the message gives the byte offset of the first undecodable byte).
    """
    source = str(path)
    if not path.exists():
        raise SpecError(f"{source!r} does not exist", source=source)
    if not path.is_file():
        raise SpecError(f"{source!r} is not a file", source=source)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SPEC_BYTES + 1)  # a device or a growing file never reads past the cap
    except OSError as err:
        raise SpecError(f"cannot read {source}: {err.strerror or err}", source=source) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"the file is larger than {MAX_SPEC_BYTES:,} bytes", source=source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(
            f"not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset {err.start} cannot be decoded",
            source=source,
        ) from None
    return text.removeprefix("\ufeff")


def parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse a document within the bounds above; returns its data and the line of every path.

    Raises:
        SpecError: the text is too large, breaks a bound, is malformed YAML, or repeats a key in a mapping.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"the text is longer than {MAX_SPEC_BYTES:,} characters", source=source)
    try:
        _check_bounds(text, source)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            lines: dict[tuple[str, ...], int] = {}
            if node is not None:
                _walk(node, lines, source)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = ", ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
        raise SpecError(f"malformed YAML: {problem}", line=line, source=source) from None
    except RecursionError:  # defence in depth: nesting is bounded before composing
        raise SpecError(f"nesting deeper than {MAX_NESTING} levels", source=source) from None
    return data, lines


def parse_value(text: str, source: str = "<override>") -> Any:
    """One value given as YAML text (a ``--set`` override): ``"8"`` -> 8, ``"[1, 2]"`` -> a list.

    Raises:
        SpecError: as `parse_yaml`.
    """
    data, _ = parse_yaml(text, source)
    return data


def line_at(lines: Lines, path: tuple[str, ...]) -> int | None:
    """The line of ``path``, or of its closest ancestor present in the text."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _check_bounds(text: str, source: str) -> None:
    """One pass over the parser's events; stops at the first bound crossed."""
    sizes: dict[str, int] = {}  # anchor -> values under it, aliases expanded
    stack: list[list[Any]] = [[None, 0]]  # per open collection: its anchor, its values so far
    aliases = 0
    total = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _bound(f"more than {MAX_ALIASES} aliases", event, source)
            if any(level[0] == event.anchor for level in stack):
                raise _bound(f"an alias *{event.anchor} inside its own anchor (a recursive value)", event, source)
            stack[-1][1] += sizes.get(str(event.anchor), 1)
            total += sizes.get(str(event.anchor), 1)
        elif isinstance(event, yaml.ScalarEvent):
            stack[-1][1] += 1
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([event.anchor, 1])
            total += 1
            if len(stack) - 1 > MAX_NESTING:
                raise _bound(f"nesting deeper than {MAX_NESTING} levels", event, source)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size = stack.pop()
            if anchor is not None:
                sizes[anchor] = size
            stack[-1][1] += size
        else:
            continue
        if total > MAX_NODES:
            raise _bound(
                f"more than {MAX_NODES:,} values (aliases counted as the copies they stand for)", event, source
            )


def _bound(what: str, event: yaml.Event, source: str) -> SpecError:
    mark = event.start_mark
    return SpecError(f"the document has {what}", line=mark.line + 1 if mark is not None else None, source=source)


def _walk(root: yaml.Node, lines: dict[tuple[str, ...], int], source: str) -> None:
    """Record the line of every path, visiting each node once (an aliased node keeps its first path)."""
    seen: set[int] = set()
    todo: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    while todo:
        node, path = todo.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            children: list[tuple[yaml.Node, tuple[str, ...]]] = []
            for key, value in node.value:
                name = str(key.value)
                if isinstance(key, yaml.ScalarNode) and name in keys and name != "<<":
                    raise SpecError(
                        f"duplicate key {name!r} (a mapping names each key once)",
                        path=".".join((*path, name)),
                        line=key.start_mark.line + 1,
                        source=source,
                    )
                keys.add(name)
                sub = (*path, name)
                lines.setdefault(sub, key.start_mark.line + 1)
                children.append((value, sub))
            todo.extend(reversed(children))  # popped in document order: a shared node keeps its first path
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(reversed([(item, (*path, str(i))) for i, item in enumerate(node.value)]))
