"""Fidelity of replay on the real engine: bank the traces a live run draws, replay them, get the same run.

A live self-consistency run (confidence-weighted, so logprobs and DeepConf confidences matter) on the real
SmolLM2 engine is recorded into a bank by `BankRecorder`; replaying that bank in banked order must reproduce its
decisions, answers, votes, candidate confidences and token counts exactly. A bank drawn by `draw_bank` from the
same engine is compact and replays the engine's live stream shape.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from branchwise.engine.replay import ReplayEngine
from branchwise.engine.tracebank import TraceBank
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.bank import BankRecorder, BankWriter, draw_bank
from branchwise.evals.datasets import load_benchmark
from branchwise.search.base import Result, SearchContext
from branchwise.search.deepconf import DeepConf
from branchwise.search.self_consistency import SelfConsistency

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

MAX_TOKENS = 96


def fingerprint(result: Result) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "votes": result.votes,
        "candidates": [(c.answer, c.tokens, c.confidence, c.text) for c in result.candidates],
        "decisions": result.decisions,
        "traces": [(n.status, n.tokens, n.pruned_by, n.finish_reason, n.answer) for n in result.trace.nodes],
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "calls": result.usage.calls,
    }


async def test_self_consistency_replays_a_live_run_exactly(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    problems = load_benchmark("arithmetic", limit=3).problems
    strategy = SelfConsistency(n=4, voting="confidence", window=16)
    writer = BankWriter(tmp_path / "bank", meta={"model": vllm_engine.model})
    recorder = BankRecorder(vllm_engine, writer, benchmark="arithmetic")
    live = [await strategy.run(p.question, SearchContext(engine=recorder, max_tokens=MAX_TOKENS)) for p in problems]
    writer.close()

    replay = ReplayEngine(tmp_path / "bank", order="banked", rate=0)
    assert replay.model == vllm_engine.model
    replayed = [await strategy.run(p.question, SearchContext(engine=replay, max_tokens=MAX_TOKENS)) for p in problems]
    for a, b in zip(replayed, live, strict=True):
        assert fingerprint(a) == fingerprint(b)
    assert sum(r.usage.completion_tokens for r in live) > 0
    assert all(c.confidence is not None for r in live for c in r.candidates)


async def test_deepconf_online_replays_the_same_decisions(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    """Pruned traces are banked cut where the live run aborted them; replay makes the same cuts."""
    problem = load_benchmark("arithmetic", limit=1).problems[0]
    # keep=0.1 (DeepConf-low): the threshold is near the best warm-up trace, so later traces get pruned.
    strategy = DeepConf(n=6, warmup=2, window=8, keep=0.1, consensus=None, concurrency=2)
    writer = BankWriter(tmp_path / "bank", meta={"model": vllm_engine.model})
    live = await strategy.run(problem.question, SearchContext(engine=BankRecorder(vllm_engine, writer), max_tokens=64))
    writer.close()
    replayed = await strategy.run(
        problem.question, SearchContext(engine=ReplayEngine(tmp_path / "bank", order="banked", rate=0), max_tokens=64)
    )
    assert live.pruned > 0
    same = ("answer", "votes", "candidates", "decisions", "traces", "prompt_tokens")
    assert {k: fingerprint(replayed)[k] for k in same} == {k: fingerprint(live)[k] for k in same}
    # The live engine may deliver a token or two past an abort before it lands (charged live); replay stops at once.
    assert replayed.usage.completion_tokens <= live.usage.completion_tokens


async def test_drawn_bank_is_compact_and_replays_the_stream(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    problems = load_benchmark("arithmetic", limit=4).problems
    ctx = SearchContext(engine=vllm_engine, max_tokens=MAX_TOKENS)
    with BankWriter(tmp_path / "bank", meta={"model": vllm_engine.model, "logprobs": 5}) as writer:
        summary = await draw_bank(
            vllm_engine, problems, lambda p: ctx.request(p.question, logprobs=5), writer, n=4, benchmark="arithmetic"
        )
    assert summary.drawn == 4 and not summary.failed
    bank = TraceBank(tmp_path / "bank")
    stats = bank.stats()
    assert stats.tokens == summary.tokens > 0
    assert stats.decode_rate is not None and stats.decode_rate > 0
    record = next(iter(bank.problems()))
    assert record.rendered is not None and "<|im_start|>" in record.rendered  # the chat template, as vLLM saw it
    assert record.prompt_tokens > 0
    # Deltas of the replayed stream carry tokens and logprobs together, one entry per token.
    replay = ReplayEngine(bank, rate=0)
    async with contextlib.aclosing(replay.stream(ctx.request(problems[0].question, n=4, logprobs=5))) as deltas:
        async for delta in deltas:
            assert delta.logprobs is not None and len(delta.logprobs) == len(delta.token_ids)
