"""Engine layer: the `Engine` interface, request/response types, backends resolved by name, and models.

Backends register by name and are imported lazily, so ``import branchwise`` never imports vllm or torch:

- ``vllm``: `VLLMEngine`, vLLM's AsyncLLM embedded in this process.
- ``openai``: `OpenAIEngine`, any OpenAI-compatible HTTP server (several base URLs balanced).
- ``replay``: `ReplayEngine`, a trace bank served through this interface (in `engine.replay`).
- ``test``: `ScriptedEngine`; ``function``: `FunctionEngine` (fakes for tests, in `engine.testing`).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, MissingDependencyError, UnknownNameError
from .base import CallMeter, Engine, UsageHook
from .types import (
    CallUsage,
    Capabilities,
    ChatMessage,
    Completion,
    Delta,
    Generation,
    GenerationRequest,
    StructuredOutput,
    TokenLogprob,
)

__all__ = [
    "CallMeter",
    "CallUsage",
    "Capabilities",
    "ChatMessage",
    "Completion",
    "Delta",
    "Engine",
    "Generation",
    "GenerationRequest",
    "StructuredOutput",
    "TokenLogprob",
    "UsageHook",
    "available_backends",
    "create_engine",
    "register_backend",
]

# name -> ("module:attribute", required distribution or None)
_BACKENDS: dict[str, tuple[str | Callable[..., Engine], str | None]] = {
    "vllm": ("branchwise.engine.vllm_engine:VLLMEngine", "vllm"),
    "openai": ("branchwise.engine.openai_engine:OpenAIEngine", None),
    "replay": ("branchwise.engine.replay:ReplayEngine", None),
    "test": ("branchwise.engine.testing:ScriptedEngine", None),
    "function": ("branchwise.engine.testing:FunctionEngine", None),
}


def vllm_install_hint() -> str:
    """The install command for the vLLM flavour this machine needs."""
    extra = "engine-gpu" if shutil.which("nvidia-smi") else "engine"
    return f"pip install 'branchwise[{extra}]'  (or run `make setup` in a checkout)"


def register_backend(name: str, factory: str | Callable[..., Engine], *, requires: str | None = None) -> None:
    """Register an engine backend.

    Args:
        name: the name used in `create_engine` and YAML specs.
        factory: an `Engine` subclass or callable returning one, or a lazy ``"module:attribute"`` string.
        requires: an importable module the backend needs; when missing, `create_engine` raises
            `MissingDependencyError` with an install hint.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"backend name must be a non-empty string, got {name!r}")
    _BACKENDS[name] = (factory, requires)


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return sorted(_BACKENDS)


def create_engine(backend: str, /, **kwargs: Any) -> Engine:
    """Create an engine by backend name, e.g. ``create_engine("vllm", model="smollm2-135m-instruct")``.

    Raises:
        UnknownNameError: no backend of that name (with "did you mean" suggestions).
        MissingDependencyError: the backend's optional dependency is not installed.
    """
    try:
        factory, requires = _BACKENDS[backend]
    except KeyError:
        raise UnknownNameError("engine backend", backend, list(_BACKENDS)) from None
    if requires is not None and importlib.util.find_spec(requires) is None:
        hint = vllm_install_hint() if requires == "vllm" else f"pip install {requires}"
        raise MissingDependencyError(f"the {backend!r} engine backend", requires, hint)
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    engine = factory(**kwargs)
    if not isinstance(engine, Engine):
        raise ConfigError(f"backend {backend!r} produced {type(engine).__name__}, not an Engine")
    return engine
