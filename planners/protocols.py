"""What plans and planners need of tools and tool registries (the executors' `Tool` and `ToolRegistry` fit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["ToolLike", "ToolsLike"]


@runtime_checkable
class ToolLike(Protocol):
    """What a plan needs from a tool (the tool registry's `Tool` satisfies it)."""

    name: str
    description: str

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]: ...

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]: ...

    def signature(self) -> str: ...

    async def call(self, arguments: Mapping[str, Any]) -> Any: ...


class ToolsLike(Protocol):
    """What a plan needs from a tool registry (`ToolRegistry` satisfies it)."""

    def __contains__(self, name: object) -> bool: ...

    def get(self, name: str) -> Any: ...

    def names(self) -> list[str]: ...
