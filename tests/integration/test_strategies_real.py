"""Strategies on the real embedded engine: they run end to end, prune inside vLLM, and leave it idle."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.errors import ConfigError
from branchwise.evals.arithmetic import arithmetic_problems
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.search import (
    Adaptive,
    BestOfN,
    DeepConf,
    Prune,
    Refine,
    SearchContext,
    SelfConsistency,
    Single,
    Strategy,
)

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

PROBLEM = arithmetic_problems(1, seed=5, levels=(1,))[0]


@pytest.mark.parametrize(
    "strategy",
    [
        Single(),
        SelfConsistency(n=4),
        SelfConsistency(n=4, voting="confidence"),
        BestOfN(n=3),
        DeepConf(n=6, warmup=2, window=16, keep=0.9, consensus=None),
        Prune(n=4, interval=16, min_tokens=16),
        Adaptive(probe=2, stages=(4,)),
        Refine(rounds=1),
    ],
    ids=lambda s: s.name,
)
async def test_strategy_runs_on_real_engine(vllm_engine: VLLMEngine, strategy: Strategy) -> None:
    budget = Budget()
    ctx = SearchContext(engine=vllm_engine, budget=budget, max_tokens=96, temperature=0.8)
    result = await strategy.run(PROBLEM.question, ctx)
    assert result.strategy == strategy.name
    assert len(result.trace) >= 1
    assert result.usage.completion_tokens == budget.usage.completion_tokens > 0
    assert result.usage.calls >= 1
    assert all(n.status in ("finished", "pruned") for n in result.trace.nodes)
    assert sum(n.tokens for n in result.trace.nodes) == result.usage.completion_tokens
    for node in result.trace.pruned():
        assert node.pruned_by
    assert (await vllm_engine.wait_idle(timeout=30)).idle  # pruned traces were aborted inside vLLM


async def test_budget_cap_on_real_engine(vllm_engine: VLLMEngine) -> None:
    budget = Budget(max_completion_tokens=150)
    ctx = SearchContext(engine=vllm_engine, budget=budget, max_tokens=200, temperature=0.8)
    result = await DeepConf(n=8, warmup=2, window=16, consensus=None).run(PROBLEM.question, ctx)
    assert budget.usage.completion_tokens <= 150 + 8  # at most one delta per in-flight sample past the cap
    assert result.budget_exhausted or budget.usage.completion_tokens <= 150
    assert (await vllm_engine.wait_idle(timeout=30)).idle


async def test_a_seeded_run_is_reproducible_on_real_engine(vllm_engine: VLLMEngine) -> None:
    on_cpu = vllm_engine.capabilities.extra["platform"] == "cpu"
    assert vllm_engine.capabilities.per_request_seed is not on_cpu  # chunked prefill (the default) breaks seeds on CPU
    # Prefix caching off and one sequence decoding at a time: on some CPUs (this machine's, avx512_bf16) a prompt
    # served from the cache, or a batch of another size or makeup (concurrent samples arrive at varying times), gives
    # logits that differ in their last bits, and the second run's seeded samples drift apart from the first's.
    no_chunks = {"enable_chunked_prefill": False, "max_num_seqs": 1}
    engine = VLLMEngine("smollm2-135m-instruct", max_model_len=2048, enable_prefix_caching=False, engine_args=no_chunks)
    async with engine:
        pipeline = Pipeline(engine, Adaptive(probe=2, stages=(4,)), max_tokens=64, temperature=1.0)
        first, again, other = [await pipeline.run(PROBLEM.question, seed=s) for s in (11, 11, 12)]
    texts = [sorted(n.text for n in r.result.trace.nodes) for r in (first, again, other)]  # type: ignore[union-attr]
    assert texts[0] == texts[1] != texts[2]
    assert len(set(texts[0])) > 1  # the samples of one run differ, also those of one prompt in two stages
    assert first.usage.completion_tokens == again.usage.completion_tokens
    if on_cpu:
        with pytest.raises(ConfigError, match="enable_chunked_prefill: false"):
            await Pipeline(vllm_engine, Single()).run(PROBLEM.question, seed=1)
