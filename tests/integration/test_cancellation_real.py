"""Cancellation reaches the embedded engine (issue 12): cancelling a pipeline run or an evaluation mid-flight, or
a budget stopping a run, aborts every vLLM request it started; afterwards vLLM reports nothing running or waiting.
Also checks that the engine counts a prompt before sending it exactly as vLLM does (the budget's reservation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from branchwise.budget import Budget
from branchwise.engine.base import CallMeter, Engine
from branchwise.engine.types import Capabilities, Delta, GenerationRequest
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.datasets import load_benchmark
from branchwise.evals.runner import EvalConfig, run_eval, strategy_solver
from branchwise.evals.store import ResultsStore
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.search import Prune, SelfConsistency

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

QUESTION = "Write a long story about a train that travels across the country, station by station."


class Generating(Engine):
    """The vLLM engine, with an event set once its first token has been delivered (the run is mid-flight), and the
    largest number of tokens vLLM put in one delta (it merges steps when its output piles up)."""

    backend = "vllm"

    def __init__(self, inner: VLLMEngine) -> None:
        super().__init__(model=inner.model)
        self.inner = inner
        self.generating = asyncio.Event()
        self.largest_delta = 0

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        async with contextlib.aclosing(self.inner._metered(request, meter)) as deltas:
            async for delta in deltas:
                if delta.token_ids:
                    self.generating.set()
                    self.largest_delta = max(self.largest_delta, len(delta.token_ids))
                yield delta


async def cancel_when_generating(engine: Generating, task: asyncio.Task[object]) -> None:
    await asyncio.wait_for(engine.generating.wait(), timeout=120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelling_a_pipeline_run_aborts_its_requests(vllm_engine: VLLMEngine) -> None:
    engine = Generating(vllm_engine)
    pipeline = Pipeline(engine, SelfConsistency(n=8), max_tokens=400, temperature=0.8)
    task = asyncio.create_task(pipeline.run(QUESTION))
    await cancel_when_generating(engine, task)
    state = await vllm_engine.wait_idle(timeout=30)  # raises EngineTimeout if a request were still running
    assert state.idle and state.num_running == 0 and state.num_waiting == 0


async def test_cancelling_an_evaluation_aborts_every_problem_in_flight(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    engine = Generating(vllm_engine)
    bench = load_benchmark("arithmetic", limit=8, seed=3)
    config = EvalConfig("sc", strategy_solver(SelfConsistency(n=4), engine, bench, max_tokens=400))
    with ResultsStore(tmp_path / "results.db") as store:
        task = asyncio.create_task(run_eval(bench, [config], store, concurrency=4))
        await cancel_when_generating(engine, task)
    state = await vllm_engine.wait_idle(timeout=30)
    assert state.idle and state.num_running == 0 and state.num_waiting == 0


async def test_a_budget_stopping_a_run_aborts_its_requests(vllm_engine: VLLMEngine) -> None:
    # Eight traces stream at once, one request each, all admitted while the budget is untouched: the cap is
    # reached mid-stream and aborts the others (one request of n samples would be clipped instead).
    engine = Generating(vllm_engine)
    budget = Budget(max_completion_tokens=60)
    strategy = Prune(n=8, min_tokens=10_000)  # never prunes: only the budget stops these traces
    result = await Pipeline(engine, strategy, max_tokens=400, temperature=0.8).run(QUESTION, budget=budget)
    assert result.budget_exhausted and budget.exhausted_cap == "max_completion_tokens"
    assert budget.usage.aborted_tokens > 0
    assert budget.usage.completion_tokens <= 60 + engine.largest_delta - 1  # the documented bound
    state = await vllm_engine.wait_idle(timeout=30)
    assert state.idle and state.num_running == 0 and state.num_waiting == 0


async def test_prompt_counts_before_the_call_match_what_vllm_reports(vllm_engine: VLLMEngine) -> None:
    await vllm_engine.start()
    for request in (
        GenerationRequest(messages=[{"role": "user", "content": QUESTION}], max_tokens=2),
        GenerationRequest(prompt="Once upon a time", max_tokens=2),
    ):
        counted = vllm_engine.count_prompt_tokens(request)
        generation = await vllm_engine.generate(request)
        assert counted == generation.prompt_tokens
