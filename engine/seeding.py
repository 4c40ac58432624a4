"""Run seeds: one seed that makes every sampling call of a run reproducible.

A run seeded with `run_seed` gives each engine call that has no seed of its own a seed derived from the run seed,
the request (its prompt and sampling settings) and how many identical requests the run made before it. The same
run seed on the same pipeline and query therefore sends the same seeds, whatever order concurrent calls are
issued in, while two identical requests of one run (e.g. two stages of a strategy asking for more samples of the
same prompt) still get different seeds and so different samples.

`Engine.stream` and `Engine.generate` apply it (`seeded`), so engine wrappers (budgets, speculation) and backends
need nothing of their own; the backend must honour per-request seeds (`Capabilities.per_request_seed`).

Same seeds give the same samples only if the engine computes the same logits, and the embedded vLLM engine does
not always on some CPUs (seen with avx512_bf16): a prompt served from its prefix cache, or a sequence decoded in a
batch of another size or makeup (concurrent samples arrive at varying times), gets logits that differ in their
last bits, and sampled texts drift apart after a few tokens. Where runs must repeat exactly, turn
``enable_prefix_caching`` off and decode one sequence at a time (``max_num_seqs: 1``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
from collections import Counter
from collections.abc import Iterator

from .types import GenerationRequest

__all__ = ["MAX_SEED", "current_run_seed", "run_seed", "seeded"]

MAX_SEED = 2**32 - 1
"""The largest seed, of a run and of the calls derived from it (what every backend accepts)."""


class _RunSeed:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.issued: Counter[str] = Counter()

    def derive(self, request: GenerationRequest) -> int:
        key = repr(dataclasses.replace(request, seed=None))
        occurrence = self.issued[key]
        self.issued[key] += 1
        digest = hashlib.sha256(f"{self.seed}\x00{occurrence}\x00{key}".encode()).digest()
        return int.from_bytes(digest[:4], "big")


_CURRENT: contextvars.ContextVar[_RunSeed | None] = contextvars.ContextVar("branchwise_run_seed", default=None)


@contextlib.contextmanager
def run_seed(seed: int | None) -> Iterator[None]:
    """Seed the engine calls made inside this block (and in tasks it starts); ``None`` leaves them unseeded.

    Raises:
        ValueError: ``seed`` is not an integer in [0, `MAX_SEED`].
    """
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"a run seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    token = _CURRENT.set(_RunSeed(seed))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_run_seed() -> int | None:
    """The seed of the run this code belongs to, if it was seeded."""
    state = _CURRENT.get()
    return None if state is None else state.seed


def seeded(request: GenerationRequest) -> GenerationRequest:
    """``request`` with its seed derived from the current run seed; unchanged if it has a seed or the run none."""
    state = _CURRENT.get()
    if state is None or request.seed is not None:
        return request
    return dataclasses.replace(request, seed=state.derive(request))
