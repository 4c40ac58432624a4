"""Backends resolve by name; unknown names suggest close ones; missing optional deps give the install command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import branchwise
from branchwise.engine import Engine, available_backends, create_engine, register_backend
from branchwise.engine.testing import FunctionEngine, ScriptedEngine
from branchwise.errors import ConfigError, MissingDependencyError, UnknownNameError


def test_builtin_backends_registered() -> None:
    assert {"vllm", "openai", "test", "function"} <= set(available_backends())


def test_create_test_engine() -> None:
    engine = create_engine("test", replies=["hi"])
    assert isinstance(engine, ScriptedEngine)
    assert isinstance(create_engine("function", fn=lambda r: "x"), FunctionEngine)


def test_unknown_backend_suggests() -> None:
    with pytest.raises(UnknownNameError) as info:
        create_engine("vlm")
    assert info.value.suggestions == ["vllm"]
    assert "Did you mean 'vllm'?" in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_missing_vllm_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(MissingDependencyError) as info:
        create_engine("vllm")
    assert info.value.package == "vllm"
    assert "pip install 'branchwise[engine" in info.value.install
    assert info.value.install in str(info.value)


def test_register_custom_backend() -> None:
    register_backend("my-fake", lambda **kw: ScriptedEngine(["ok"], **kw))
    try:
        assert isinstance(create_engine("my-fake", model="m"), Engine)
    finally:
        from branchwise.engine import _BACKENDS

        _BACKENDS.pop("my-fake")


def test_factory_must_return_engine() -> None:
    register_backend("not-engine", lambda: object())
    try:
        with pytest.raises(ConfigError, match="not an Engine"):
            create_engine("not-engine")
    finally:
        from branchwise.engine import _BACKENDS

        _BACKENDS.pop("not-engine")


def test_import_is_light() -> None:
    code = (
        "import sys, branchwise, branchwise.engine, branchwise.engine.testing;"
        "branchwise.GenerationRequest(prompt='x');"
        "print(','.join(m for m in ('vllm', 'torch', 'transformers', 'math_verify') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_lazy_exports() -> None:
    assert branchwise.GenerationRequest is importlib.import_module("branchwise.engine").GenerationRequest
    assert "create_engine" in dir(branchwise)
    with pytest.raises(AttributeError):
        branchwise.does_not_exist  # noqa: B018


def test_every_public_name_resolves() -> None:
    missing = [name for name in branchwise.__all__ if not hasattr(branchwise, name)]
    assert missing == []


def test_subpackages_are_attributes() -> None:
    # The DESIGN sketch's `bw.search.DeepConf(...)` works after a bare `import branchwise`.
    assert branchwise.search.DeepConf is importlib.import_module("branchwise.search.deepconf").DeepConf
    assert branchwise.planners.Plan is branchwise.Plan
