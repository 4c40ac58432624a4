"""The `replay` engine: matching, seeded order without replacement, lockstep streaming, aborts, misses, and
strategies that run unchanged on a bank and decide exactly as on the live engine that drew it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallUsage, GenerationRequest, create_engine
from branchwise.engine.base import Engine, estimate_prompt_tokens
from branchwise.engine.replay import ReplayEngine
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.errors import ConfigError, DatasetError, ReplayMiss
from branchwise.evals.bank import BankRecorder, BankWriter, draw_bank
from branchwise.evals.datasets import Problem
from branchwise.search.base import Result, SearchContext, Strategy
from branchwise.search.deepconf import DeepConf
from branchwise.search.self_consistency import SelfConsistency
from branchwise.verifiers.confidence import ConfidenceTracker, token_confidence

pytestmark = pytest.mark.asyncio

TEXTS = [
    "Two and two make four. The answer is 4.",
    "I think it is five. The answer is 5.",
    "Adding: 2 + 2 = 4 so The answer is 4.",
    "Hmm. The answer is 3.",
    "Counting up from two gives four. The answer is 4.",
    "Maybe six? The answer is 6.",
    "Four, clearly. The answer is 4.",
    "The answer is 5.",
]
# Per text, per-token logprobs (the last value repeats): confident and unsure traces.
LOGPROBS = [[-0.05, -0.1, -0.02], [-2.0, -1.5, -3.0], [-0.1, -0.3], [-2.5, -4.0], [-0.2], [-3.0, -1.0], [-0.01], [-1.2]]


class Sequenced:
    """A live fake model: per prompt, the k-th sample it ever draws is TEXTS[k % 8], whatever the request's n.

    So a bank drawn from it (one request with n=8) holds the traces a strategy's run on it draws, in order.
    """

    def __init__(self) -> None:
        self.drawn: dict[str, int] = {}

    def __call__(self, request: GenerationRequest) -> ScriptedResponse:
        key = str(request.messages or request.prompt)
        first = self.drawn.get(key, 0)
        self.drawn[key] = first + request.n
        picks = [(first + i) % len(TEXTS) for i in range(request.n)]
        return ScriptedResponse(tuple(TEXTS[p] for p in picks), logprobs=tuple(LOGPROBS[p] for p in picks))


def live_engine(token_delay: float = 0.0) -> FunctionEngine:
    return FunctionEngine(Sequenced(), model="toy-model", token_delay=token_delay)


PROBLEMS = [Problem(f"p{i}", f"What is {i} + {i}?", (str(2 * i),), "toy") for i in range(3)]


def context(engine: Engine, **kw: Any) -> SearchContext:
    return SearchContext(engine=engine, max_tokens=kw.pop("max_tokens", 64), **kw)


async def make_bank(path: Path, *, n: int = 8, logprobs: int | None = 5, max_tokens: int = 64) -> Path:
    engine = live_engine()
    ctx = context(engine, max_tokens=max_tokens)
    with BankWriter(path, meta={"model": "toy-model", "logprobs": logprobs}) as writer:
        await draw_bank(
            engine, PROBLEMS, lambda p: ctx.request(p.question, logprobs=logprobs), writer, n=n, benchmark="toy"
        )
    return path


@pytest.fixture
async def bank(tmp_path: Path) -> Path:
    return await make_bank(tmp_path / "bank")


def request(problem: Problem = PROBLEMS[0], **kw: Any) -> GenerationRequest:
    return context(live_engine()).request(problem.question, **kw)


async def collect(engine: Engine, req: GenerationRequest) -> list[Any]:
    out = []
    async with contextlib.aclosing(engine.stream(req)) as deltas:
        async for delta in deltas:
            out.append(delta)
    return out


# -- matching and serving -------------------------------------------------------------------------------------------
async def test_serves_banked_traces_with_live_tokens_logprobs_and_prompt_length(bank: Path) -> None:
    live = live_engine()
    live_gen = await live.generate(request(n=8, logprobs=5))
    replay = ReplayEngine(bank, order="banked", rate=0)
    assert replay.model == "toy-model" and replay.backend == "replay"
    gen = await replay.generate(request(n=8, logprobs=5))
    assert [c.text for c in gen.completions] == TEXTS
    for banked, drawn in zip(gen.completions, live_gen.completions, strict=True):
        assert banked.token_ids == drawn.token_ids
        assert banked.finish_reason == drawn.finish_reason
        assert banked.logprobs is not None and drawn.logprobs is not None
        assert [t.logprob for t in banked.logprobs] == [t.logprob for t in drawn.logprobs]
        assert [t.token for t in banked.logprobs] == [t.token for t in drawn.logprobs]
        # DeepConf's token confidence is the live one, bit for bit
        assert [token_confidence(t) for t in banked.logprobs] == [token_confidence(t) for t in drawn.logprobs]
    assert gen.prompt_tokens == live_gen.prompt_tokens > 0
    assert gen.usage.completion_tokens == live_gen.usage.completion_tokens


async def test_prompt_count_before_the_call_is_the_banked_one(bank: Path) -> None:
    """A budget reserves what the live engine would have counted, not the byte estimate (about 4x as much)."""
    replay = ReplayEngine(bank, rate=0)
    req = request(n=2)
    live = live_engine().count_prompt_tokens(req)
    assert replay.count_prompt_tokens(req) == live < estimate_prompt_tokens(req)
    unknown = request(Problem("px", "An unbanked question?", ("1",), "toy"))
    assert replay.count_prompt_tokens(unknown) == estimate_prompt_tokens(unknown)


async def test_create_engine_by_name_and_model_check(bank: Path) -> None:
    engine = create_engine("replay", bank=str(bank), rate=0)
    assert isinstance(engine, ReplayEngine)
    assert engine.capabilities.max_top_logprobs == 5 and not engine.capabilities.per_request_seed
    with pytest.raises(ConfigError, match="holds traces of 'toy-model'"):
        ReplayEngine(bank, model="other-model")
    with pytest.raises(DatasetError, match="no trace bank"):
        ReplayEngine(bank / "missing")
    with pytest.raises(ConfigError, match="order"):
        ReplayEngine(bank, order="random")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rate"):
        ReplayEngine(bank, rate=-1)


async def test_seeded_order_without_replacement(bank: Path) -> None:
    async def draw_all(engine: ReplayEngine, problem: Problem) -> list[str]:
        return [(await engine.generate(request(problem))).text for _ in range(8)]

    first = await draw_all(ReplayEngine(bank, seed=7, rate=0), PROBLEMS[0])
    assert sorted(first) == sorted(TEXTS)  # every trace once: without replacement
    assert first != TEXTS  # a shuffled order...
    assert await draw_all(ReplayEngine(bank, seed=7, rate=0), PROBLEMS[0]) == first  # ...fixed by the seed
    assert await draw_all(ReplayEngine(bank, seed=8, rate=0), PROBLEMS[0]) != first

    # The order of one problem does not depend on requests for other problems in between.
    engine = ReplayEngine(bank, seed=7, rate=0)
    interleaved = []
    for _ in range(8):
        interleaved.append((await engine.generate(request(PROBLEMS[0]))).text)
        await engine.generate(request(PROBLEMS[1]))
    assert interleaved == first

    # reset() hands the same traces out again, in the same order.
    engine.reset()
    assert await draw_all(engine, PROBLEMS[0]) == first


async def test_n_samples_per_request_then_exhausted(bank: Path) -> None:
    engine = ReplayEngine(bank, seed=3, rate=0)
    a = await engine.generate(request(n=5))
    assert len(a.completions) == 5 and [c.index for c in a.completions] == list(range(5))
    assert engine.remaining(request()) == 3
    b = await engine.generate(request(n=3))
    assert sorted(c.text for c in a.completions + b.completions) == sorted(TEXTS)
    with pytest.raises(ReplayMiss, match="asked for 1 traces of problem 'p0' but 0 of 8 remain") as err:
        await engine.generate(request())
    assert err.value.reason == "exhausted"
    with pytest.raises(ReplayMiss) as err:
        await ReplayEngine(bank, rate=0).generate(request(n=9))
    assert err.value.reason == "exhausted"


async def test_unservable_requests_are_typed_errors(bank: Path) -> None:
    engine = ReplayEngine(bank, rate=0)
    cases: list[tuple[GenerationRequest, str, str]] = [
        (request(Problem("x", "An unbanked question?", ("1",), "toy")), "unknown_prompt", "no banked problem"),
        (request(temperature=1.0), "settings", "temperature=0.7 \\(asked 1.0\\)"),
        (request(top_p=0.9), "settings", "top_p"),
        (request(top_k=20), "settings", "top_k"),
        (request(stop=("\n",)), "settings", "stop"),
        (request(max_tokens=65), "settings", "max_tokens=64, asked max_tokens=65"),
        (request(logprobs=20), "settings", "logprobs=5, asked logprobs=20"),
    ]
    for req, reason, message in cases:
        with pytest.raises(ReplayMiss, match=message) as err:
            await engine.generate(req)
        assert err.value.reason == reason
    # Nothing was handed out by the failed requests.
    assert engine.remaining(request()) == 8


async def test_logprobs_none_or_zero_are_served_from_a_top_k_bank(bank: Path) -> None:
    engine = ReplayEngine(bank, order="banked", rate=0)
    plain = await engine.generate(request())
    assert plain.completions[0].logprobs is None
    sampled_only = await engine.generate(request(logprobs=0))
    lps = sampled_only.completions[0].logprobs
    assert lps is not None and all(t.top == () for t in lps)
    assert [t.logprob for t in lps] == [-2.0, -1.5, -3.0] + [-3.0] * (len(lps) - 3)


async def test_bank_without_logprobs_refuses_logprob_requests(tmp_path: Path) -> None:
    engine = ReplayEngine(await make_bank(tmp_path / "plain", logprobs=None), rate=0)
    assert (await engine.generate(request())).text
    with pytest.raises(ReplayMiss, match="logprobs=None") as err:
        await engine.generate(request(logprobs=5))
    assert err.value.reason == "settings"


async def test_smaller_max_tokens_cuts_the_banked_trace_as_the_live_engine_would(bank: Path) -> None:
    live = await live_engine().generate(request(n=8, max_tokens=5, logprobs=5))
    replayed = await ReplayEngine(bank, order="banked", rate=0).generate(request(n=8, max_tokens=5, logprobs=5))
    for a, b in zip(replayed.completions, live.completions, strict=True):
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
        assert a.num_tokens <= 5
    # Cut for "length" unless they stop by the 5th token (a 4- and a 5-token trace), exactly as live.
    assert sum(c.finish_reason == "length" for c in replayed.completions) == 6


# -- streaming -----------------------------------------------------------------------------------------------------
async def test_stream_delivers_tokens_and_logprobs_in_lockstep(bank: Path) -> None:
    engine = ReplayEngine(bank, order="banked", rate=0)
    deltas = await collect(engine, request(n=2, logprobs=5))
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) == 1 for d in deltas)
    # The samples advance together, one token each per step, like a batched live engine.
    steps = [d.index for d in deltas]
    shorter = min(steps.count(0), steps.count(1))
    assert steps[: 2 * shorter] == [0, 1] * shorter
    finals = [d for d in deltas if d.finish_reason is not None]
    assert sorted(d.index for d in finals) == [0, 1] and all(d.finish_reason == "stop" for d in finals)
    assert "".join(d.text for d in deltas if d.index == 0) == TEXTS[0]


async def test_stream_is_paced_at_the_modelled_rate(bank: Path) -> None:
    tokens = len((await ReplayEngine(bank, order="banked", rate=0).generate(request())).completions[0].token_ids)
    engine = ReplayEngine(bank, order="banked", rate=200.0, ttft=0.05)
    assert engine.rate == 200.0
    arrivals = []
    started = time.perf_counter()
    async with contextlib.aclosing(engine.stream(request())) as deltas:
        async for _ in deltas:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == tokens
    assert arrivals[0] >= 0.05  # the time to first token
    assert arrivals[-1] >= 0.05 + (tokens - 1) / 200.0 - 1e-3  # then one token every 5 ms
    # The default is the bank's measured rate.
    assert ReplayEngine(bank).rate == pytest.approx(ReplayEngine(bank).bank.stats().decode_rate)


async def test_speedup_paces_faster_and_sets_the_time_scale(bank: Path) -> None:
    tokens = len((await ReplayEngine(bank, order="banked", rate=0).generate(request())).completions[0].token_ids)
    modelled = 0.4 + (tokens - 1) / 20.0
    engine = ReplayEngine(bank, order="banked", rate=20.0, ttft=0.4, speedup=40)
    started = time.perf_counter()
    await engine.generate(request())
    real = time.perf_counter() - started
    assert modelled / 40 - 1e-3 <= real < modelled / 2  # 40 times faster (a loaded machine may add some)
    assert engine.time_scale == 40.0 and ReplayEngine(bank, rate=0, speedup=40).time_scale == 1.0
    for bad in (0.5, 0, True, "fast", 1e7):
        with pytest.raises(ConfigError, match="speedup must be"):
            ReplayEngine(bank, speedup=bad)  # type: ignore[arg-type]


async def test_abort_counts_exactly_the_delivered_tokens(bank: Path) -> None:
    engine = ReplayEngine(bank, order="banked", rate=0)
    seen: list[CallUsage] = []
    engine.add_usage_hook(lambda _req, usage: seen.append(usage))
    received = 0
    async with contextlib.aclosing(engine.stream(request(n=2))) as deltas:
        async for delta in deltas:
            received += len(delta.token_ids)
            if received == 5:
                break
    assert len(seen) == 1 and seen[0].aborted and seen[0].completion_tokens == 5

    # Through a budget (which pulls deltas in a task of its own) the charge is the same.
    budget = Budget()
    llm = budget.bind(ReplayEngine(bank, order="banked", rate=0))
    received = 0
    async with contextlib.aclosing(llm.stream(request())) as deltas:
        async for delta in deltas:
            received += len(delta.token_ids)
            if received == 3:
                break
    assert budget.usage.completion_tokens == 3 and budget.usage.aborted_tokens == 3

    # Cancelling the consumer task aborts too.
    paced = ReplayEngine(bank, order="banked", rate=100.0, ttft=0.0)
    paced_usage: list[CallUsage] = []
    paced.add_usage_hook(lambda _req, usage: paced_usage.append(usage))
    got = asyncio.Event()

    async def consume() -> None:
        async for _ in paced.stream(request()):
            got.set()

    task = asyncio.create_task(consume())
    await got.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert paced_usage[0].aborted and paced_usage[0].completion_tokens == 1


async def test_trace_cut_when_banked_is_an_error_only_if_read_past_its_end(tmp_path: Path) -> None:
    # Record a live run that aborts its stream after 3 tokens.
    writer = BankWriter(tmp_path / "rec", meta={"model": "toy-model"})
    recorder = BankRecorder(live_engine(), writer, benchmark="toy")
    async with contextlib.aclosing(recorder.stream(request(logprobs=5))) as deltas:
        async for i, _ in _enumerate(deltas):
            if i == 2:
                break
    writer.close()
    engine = ReplayEngine(tmp_path / "rec", order="banked", rate=0)
    async with contextlib.aclosing(engine.stream(request(logprobs=5))) as deltas:
        async for i, _ in _enumerate(deltas):
            if i == 2:
                break  # the same decision as the live run: fine
    engine.reset()
    with pytest.raises(ReplayMiss, match="cut short when banked") as err:
        await engine.generate(request(logprobs=5))
    assert err.value.reason == "cut"


async def _enumerate(deltas: Any) -> Any:
    i = 0
    async for d in deltas:
        yield i, d
        i += 1


# -- strategies run unchanged on replay -------------------------------------------------------------------------
def _fingerprint(result: Result) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "votes": result.votes,
        "candidates": [(c.answer, c.tokens, c.confidence, c.text) for c in result.candidates],
        "decisions": result.decisions,
        "pruned": result.pruned,
        "traces": [(n.status, n.tokens, n.pruned_by, n.finish_reason) for n in result.trace.nodes],
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "aborted_tokens": result.usage.aborted_tokens,
        "calls": result.usage.calls,
    }


STRATEGIES: Sequence[Strategy] = (
    SelfConsistency(n=8),
    SelfConsistency(n=8, voting="confidence", window=4),
    DeepConf(n=8, warmup=3, window=3, keep=0.5, mode="online", consensus=None, concurrency=2),
    DeepConf(n=8, warmup=3, window=3, keep=0.9, mode="online", consensus=0.9, concurrency=1),
    DeepConf(n=8, window=3, keep=0.5, mode="offline"),
)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: f"{s.name}-{getattr(s, 'mode', '')}")
async def test_strategy_on_replay_matches_the_live_run(bank: Path, strategy: Strategy) -> None:
    # The live engine paces its tokens so that, as on a real engine, an abort stops it mid-trace.
    live = await strategy.run(PROBLEMS[0].question, context(live_engine(token_delay=0.0005)))
    replayed = await strategy.run(PROBLEMS[0].question, context(ReplayEngine(bank, order="banked", rate=0)))
    assert _fingerprint(replayed) == _fingerprint(live)
    assert live.usage.completion_tokens > 0


async def test_deepconf_prunes_on_replay_exactly_as_live(bank: Path) -> None:
    strategy = DeepConf(n=8, warmup=3, window=3, keep=0.5, consensus=None, concurrency=3)
    live = await strategy.run(PROBLEMS[1].question, context(live_engine(token_delay=0.0005)))
    replayed = await strategy.run(PROBLEMS[1].question, context(ReplayEngine(bank, order="banked", rate=0)))
    assert live.pruned > 0  # the case worth checking: traces aborted inside the engine
    assert _fingerprint(replayed) == _fingerprint(live)
    assert replayed.usage.aborted_tokens == live.usage.aborted_tokens > 0


async def test_seeded_replay_runs_a_strategy_on_a_permutation_of_the_bank(bank: Path) -> None:
    engine = ReplayEngine(bank, seed=11, rate=0)
    result = await SelfConsistency(n=8).run(PROBLEMS[2].question, context(engine))
    assert result.votes == {"4": 4.0, "5": 2.0, "3": 1.0, "6": 1.0}  # all 8 traces, whatever their order
    tracker = ConfidenceTracker(window=3)
    gen = await ReplayEngine(bank, rate=0).generate(request(PROBLEMS[2], logprobs=5))
    tracker.update(gen.completions[0].logprobs or ())
    assert tracker.num_tokens == gen.completions[0].num_tokens
