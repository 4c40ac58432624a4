"""The ``replay`` engine: serves a trace bank through the normal `Engine` interface.

Sample once, evaluate every strategy on the same samples. A bank (see `branchwise.engine.tracebank`; drawn by
``branchwise sample`` / `branchwise.evals.bank.draw_bank`) holds N traces per problem. `ReplayEngine` answers a
request with banked traces of the problem whose canonical prompt and sampling settings it carries:

- **Matching**: the prompt (raw, or the chat messages) must equal a banked problem's, and so must every
  sampling setting that shapes the distribution (temperature, top_p, top_k, min_p, min_tokens, stop, penalties,
  ignore_eos, structured output). ``max_tokens`` may be smaller than banked (a budget clips it): the banked
  trace is cut there and finishes for "length", exactly as the live engine would have cut the same trace.
  ``logprobs`` may be None (none reported), 0 (the sampled token's only) or the banked top-k. ``seed`` is
  ignored: which traces a request gets is decided by the engine's own seeded order.
- **Without replacement**: each problem's traces are handed out in a fixed permutation of their indices, seeded
  by the engine ``seed`` and the problem's hash (so it does not depend on the order in which problems are asked),
  or in banked order with ``order="banked"``. A request with ``n > 1`` takes the next ``n``. `reset` starts
  every problem over, for the next strategy to see the same traces.
- **Streaming**: each trace is replayed delta by delta with the live stream's boundaries, tokens and logprobs in
  lockstep, at a modelled decode ``rate`` (tokens per second per sequence; default the bank's measured rate,
  after the bank's mean time to first token), optionally ``speedup`` times faster so that an evaluation models
  hours of decoding in minutes (`time_scale`). ``rate=0`` or None delivers as fast as possible, still yielding
  to the event loop between steps as a live engine does, so a consumer that aborts after a delta has been
  delivered exactly the tokens it saw.
- **Aborts**: cancelling or closing the stream stops it; the base class meters exactly the tokens delivered so
  far and reports them through the usage hooks (and so the budget charges them), like any engine.
- **Confidence**: logprobs carry the banked sampled-token logprob and a summary of the top-k alternatives from
  which `branchwise.verifiers.confidence.token_confidence` computes exactly the live value.
- **Misses**: a request the bank cannot serve raises `ReplayMiss` naming the reason ("unknown_prompt",
  "settings", "exhausted", or "cut" when a trace cut short while banking is read past its end). Replay never
  resamples or substitutes.

```python
engine = create_engine("replay", bank="banks/gsm8k-qwen0.5b", seed=0, rate=0)
```
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

from ..errors import ConfigError, EngineUnavailable, ReplayMiss
from .base import CallMeter, Engine
from .tracebank import BankedProblem, BankedSample, TraceBank, canonical_json, prompt_key, sampling_settings
from .types import Capabilities, Delta, GenerationRequest

__all__ = ["ReplayEngine"]

Order = Literal["seeded", "banked"]


class _Pool:
    """One problem's traces, handed out without replacement in a fixed order."""

    def __init__(self, problem: BankedProblem, samples: Sequence[BankedSample], order: list[int]) -> None:
        self.problem = problem
        self.samples = samples
        self.order = order
        self.next = 0

    @property
    def remaining(self) -> int:
        return len(self.order) - self.next

    def take(self, n: int) -> list[BankedSample]:
        chosen = [self.samples[i] for i in self.order[self.next : self.next + n]]
        self.next += n
        return chosen


class ReplayEngine(Engine):
    """Serves a trace bank as an engine (see the module docstring).

    Args:
        bank: a bank file or folder of chunk files, or an open `TraceBank` (shared, not closed by `aclose`).
        model: the model name; must be the bank's when the bank records one (default: the bank's).
        seed: seeds the order in which each problem's traces are handed out.
        order: "seeded" (a seeded permutation per problem) or "banked" (in the order they were banked: what a
            live run that was recorded into the bank drew, for fidelity checks).
        rate: decode speed in tokens per second per sequence; "bank" for the bank's measured rate (as fast as
            possible when it recorded none); 0 or None for as fast as possible.
        ttft: seconds before a request's first token when pacing; "bank" for the bank's mean.
        speedup: when pacing, deliver this many times faster than the modelled rate and ttft (real seconds x
            ``speedup`` = modelled seconds; an evaluation scales the times it records by it, see `time_scale`).

    Raises:
        DatasetError: the bank cannot be read.
        ConfigError: bad arguments, or ``model`` differs from the bank's.
    """

    backend = "replay"

    def __init__(
        self,
        bank: str | os.PathLike[str] | TraceBank,
        *,
        model: str | None = None,
        seed: int = 0,
        order: Order = "seeded",
        rate: float | Literal["bank"] | None = "bank",
        ttft: float | Literal["bank"] = "bank",
        speedup: float = 1.0,
    ) -> None:
        if order not in ("seeded", "banked"):
            raise ConfigError(f"replay: order must be 'seeded' or 'banked', got {order!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"replay: seed must be an integer, got {seed!r}")
        self._owns_bank = not isinstance(bank, TraceBank)
        self.bank = TraceBank(bank) if not isinstance(bank, TraceBank) else bank
        banked_model = self.bank.model
        if model and banked_model and model != banked_model:
            raise ConfigError(f"replay: the bank holds traces of {banked_model!r}, not {model!r}")
        super().__init__(model=model or banked_model or "replay")
        self.seed = seed
        self.order: Order = order
        stats = self.bank.stats() if rate == "bank" or ttft == "bank" else None
        if rate == "bank":
            rate = stats.decode_rate if stats is not None else None
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0):
            raise ConfigError(f"replay: rate must be >= 0 tokens/s, 'bank' or None, got {rate!r}")
        self.rate: float | None = float(rate) if rate else None
        if ttft == "bank":
            ttft = (stats.mean_ttft_s if stats is not None else None) or 0.0
        if isinstance(ttft, bool) or not isinstance(ttft, (int, float)) or ttft < 0:
            raise ConfigError(f"replay: ttft must be >= 0 seconds or 'bank', got {ttft!r}")
        self.ttft = float(ttft)
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 1 <= speedup <= 1e6:
            raise ConfigError(f"replay: speedup must be a number from 1 to 1e6, got {speedup!r}")
        self.speedup = float(speedup)
        self._pools: dict[str, _Pool] = {}
        self._closed = False
        top = self.bank.meta.get("logprobs")
        self._max_top = int(top) if isinstance(top, int) else 0

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            streaming=True,
            logprobs=True,
            max_top_logprobs=self._max_top,
            structured_output=True,  # served when banked with the same constraint, else a ReplayMiss
            chat=True,
            per_request_seed=False,
            prefix_caching=False,
            abort=True,
        )

    @property
    def time_scale(self) -> float:
        """Modelled seconds per real second of this engine's streams: ``speedup`` when pacing, else 1 (as fast as
        possible models no time)."""
        return self.speedup if self.rate is not None else 1.0

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """The banked prompt's length, as the live engine counted it, so budgets reserve what they would live.

        A prompt the bank does not hold gets the base estimate (the call then fails with a `ReplayMiss`).
        """
        banked = self.bank.find(prompt_key(request))
        return banked[0].prompt_tokens if banked else super().count_prompt_tokens(request)

    def reset(self) -> None:
        """Hand every problem's traces out again from the start (same order): for the next strategy."""
        self._pools.clear()

    def remaining(self, request: GenerationRequest) -> int:
        """How many traces of ``request``'s problem are still unserved (raises `ReplayMiss` if none match)."""
        return self._pool(request).remaining

    async def aclose(self) -> None:
        self._closed = True
        if self._owns_bank:
            self.bank.close()

    # -- matching ---------------------------------------------------------------------------------------------
    def _pool(self, request: GenerationRequest) -> _Pool:
        key = prompt_key(request)
        candidates = self.bank.find(key)
        if not candidates:
            preview = key if len(key) <= 160 else key[:157] + "..."
            raise ReplayMiss(
                "unknown_prompt",
                f"no banked problem has this prompt ({self.bank.problem_count} problems banked in "
                f"{self.bank.path}): {preview!r}",
            )
        settings = sampling_settings(request)
        same = [p for p in candidates if canonical_json(p.settings) == canonical_json(settings)]
        if not same:
            diffs = _differences(candidates[0].settings, settings)
            raise ReplayMiss("settings", f"problem {candidates[0].problem_id!r} was banked with {diffs}")
        fits = [p for p in same if p.max_tokens >= request.max_tokens]
        if not fits:
            largest = max(p.max_tokens for p in same)
            raise ReplayMiss(
                "settings",
                f"problem {same[0].problem_id!r} was banked with max_tokens={largest}, asked "
                f"max_tokens={request.max_tokens} (the bank has no tokens past its cap)",
            )
        asked = request.logprobs
        servable = [p for p in fits if asked is None or (p.logprobs is not None and asked in (0, p.logprobs))]
        if not servable:
            banked = sorted({str(p.logprobs) for p in fits})
            raise ReplayMiss(
                "settings",
                f"problem {fits[0].problem_id!r} was banked with logprobs={' or '.join(banked)}, asked "
                f"logprobs={asked} (top-k alternatives are served only as banked; 0 or None always work)",
            )
        problem = servable[0]
        digest = problem.hash
        pool = self._pools.get(digest)
        if pool is None:
            # Records with the same hash are the same request (a benchmark listing a question twice): one pool.
            samples = [s for p in servable if p.hash == digest for s in self.bank.samples(p)]
            order = list(range(len(samples)))
            if self.order == "seeded":
                random.Random(f"{self.seed}:{digest}").shuffle(order)
            pool = self._pools[digest] = _Pool(problem, samples, order)
        return pool

    # -- streaming --------------------------------------------------------------------------------------------
    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        if self._closed:
            raise EngineUnavailable("this ReplayEngine was closed")
        pool = self._pool(request)
        if pool.remaining < request.n:
            problem = pool.problem
            raise ReplayMiss(
                "exhausted",
                f"asked for {request.n} traces of problem {problem.problem_id!r} but {pool.remaining} of "
                f"{len(pool.order)} remain unserved (reset() serves the bank again)",
            )
        samples = pool.take(request.n)
        meter.prompt_tokens = pool.problem.prompt_tokens
        top_k = request.logprobs
        # (time, step, sample index, delta, whether the sample ends here without knowing how it goes on)
        events: list[tuple[float, int, int, Delta, bool]] = []
        for i, sample in enumerate(samples):
            deltas = sample.deltas(request.max_tokens, top_k)
            delivered = 0
            for step, delta in enumerate(deltas):
                delivered += len(delta.token_ids)
                when = float(step) if self.rate is None else self.ttft + max(delivered - 1, 0) / self.rate
                cut = step == len(deltas) - 1 and delta.finish_reason is None
                events.append((when, step, i, dataclasses.replace(delta, index=i), cut))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        loop = asyncio.get_running_loop()
        start = loop.time()
        current: float | None = None
        cut_short: list[int] = []
        for when, _, i, delta, cut in events:
            if when != current:
                current = when
                # Yield to the loop between steps, as a live engine does: a consumer that stops after the last
                # step is never handed (nor charged for) the next one.
                await asyncio.sleep(0 if self.rate is None else max(start + when / self.speedup - loop.time(), 0.0))
                if cut_short:
                    raise self._cut(samples, cut_short)
            yield delta
            if cut:
                cut_short.append(i)
        if cut_short:
            await asyncio.sleep(0)
            raise self._cut(samples, cut_short)

    @staticmethod
    def _cut(samples: list[BankedSample], which: list[int]) -> ReplayMiss:
        described = ", ".join(
            f"trace {samples[i].index} ({samples[i].finish_reason} after {samples[i].num_tokens} tokens)" for i in which
        )
        return ReplayMiss("cut", f"read past the end of a trace that was cut short when banked: {described}")

    def __repr__(self) -> str:
        return f"ReplayEngine({str(self.bank.path)!r}, model={self.model!r}, seed={self.seed}, order={self.order!r})"


def _differences(banked: Any, asked: Any) -> str:
    keys = sorted(set(banked) | set(asked))
    diffs = [
        f"{k}={banked.get(k)!r} (asked {asked.get(k)!r})"
        for k in keys
        if canonical_json(banked.get(k)) != canonical_json(asked.get(k))
    ]
    return ", ".join(diffs) or "other settings"
