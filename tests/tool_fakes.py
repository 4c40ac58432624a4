"""A minimal stand-in for the tool registry, shared by the plan, planner-parser and executor tests.

`FakeRegistry(*functions)` offers what plans and executors need of a `ToolRegistry` (``in``, ``get``, ``names``),
and `FakeTool` what they need of a `Tool` (bind, validate, signature, call), without the real registry's limits.
Test modules import it by name (``from tool_fakes import FakeRegistry``): tests/conftest.py puts this folder on
``sys.path``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError, create_model

from branchwise.errors import ToolArgumentError, UnknownNameError

__all__ = ["FakeRegistry", "FakeTool"]


class FakeTool:
    """A minimal stand-in for the tool registry's Tool (same interface)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.name = fn.__name__
        self.description = fn.__doc__ or ""
        sig = inspect.signature(fn)
        self.param_names = list(sig.parameters)
        fields: dict[str, Any] = {
            n: (p.annotation, ... if p.default is inspect.Parameter.empty else p.default)
            for n, p in sig.parameters.items()
        }
        self.args_model = create_model(f"{self.name}_args", **fields)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.param_names):
            raise ToolArgumentError(self.name, "too many positional arguments")
        named = dict(zip(self.param_names, args, strict=False))
        for k, v in kwargs.items():
            if k not in self.param_names:
                raise ToolArgumentError(self.name, "unknown argument", field=k)
            if k in named:
                raise ToolArgumentError(self.name, "given twice", field=k)
            named[k] = v
        return named

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return self.args_model(**arguments).model_dump()
        except ValidationError as err:
            first = err.errors()[0]
            raise ToolArgumentError(self.name, first["msg"], field=str(first["loc"][0])) from err

    def signature(self) -> str:
        return f"{self.name}{inspect.signature(self.fn)}"

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        out = self.fn(**self.validate(arguments))
        if inspect.isawaitable(out):
            out = await out
        return out


class FakeRegistry:
    """Tools by name, made from plain functions."""

    def __init__(self, *fns: Callable[..., Any]) -> None:
        self.tools = {f.__name__: FakeTool(f) for f in fns}

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def get(self, name: str) -> FakeTool:
        try:
            return self.tools[name]
        except KeyError:
            raise UnknownNameError("tool", name, list(self.tools)) from None

    def names(self) -> list[str]:
        return list(self.tools)
