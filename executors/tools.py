"""Tools: the registry (`Tool`, `ToolRegistry`, `tool`, from `executors.registry`) and the built-in tools.

`default_tools` gathers the built-ins: ``calculator`` (`executors.calculator`), ``python`` (`executors.sandbox`),
``retrieve`` (`executors.retrieval`) and ``http_get`` (`executors.http_tool`). Each built-in module imports the
registry, never this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .calculator import calculator_tool
from .http_tool import http_get_tool
from .registry import Tool, ToolRegistry, tool
from .retrieval import Document, retrieve_tool
from .sandbox import SandboxLimits, python_tool

__all__ = ["Tool", "ToolRegistry", "default_tools", "tool"]


def default_tools(
    *,
    corpus: str | Path | Sequence[Document] | None = None,
    enable_http: bool = False,
    python_limits: SandboxLimits | None = None,
) -> ToolRegistry:
    """The built-in tools: ``calculator`` and ``python`` always, ``retrieve`` with a corpus, ``http_get`` on request.

    Args:
        corpus: a directory of ``.txt``/``.md`` files, a JSONL file of ``{"id", "title", "text"}`` records, or a
            list of `Document`; enables ``retrieve``. The index is built on the first call.
        enable_http: register ``http_get`` (network access); off by default.
        python_limits: limits for the ``python`` sandbox (defaults: `SandboxLimits()`).

    Raises:
        ConfigError: the corpus path does not exist.
    """
    registry = ToolRegistry()
    registry.register(calculator_tool())
    registry.register(python_tool(python_limits))
    if corpus is not None:
        registry.register(retrieve_tool(corpus))
    if enable_http:
        registry.register(http_get_tool())
    return registry
