"""A pipeline whose policy decodes speculatively with a draft model, on the real embedded engine."""

from __future__ import annotations

import pytest

from branchwise.engine import GenerationRequest
from branchwise.engine.vllm_engine import _on_cpu
from branchwise.errors import EngineRequestError
from branchwise.orchestrator.pipeline import Pipeline

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(300)]

SPEC = """
engines:
  policy: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024}
  draft: {model: smollm2-135m-instruct, num_speculative_tokens: 2, max_batch: 2}
# Greedy: vLLM's CPU backend corrupts sampled tokens under speculation, and the engine refuses such requests there.
thought: {strategy: self_consistency, n: 1, temperature: 0, max_tokens: 24}
runtime: {seed: 0}
"""


async def test_draft_model_speculative_decoding_runs_a_pipeline() -> None:
    async with Pipeline.from_yaml(SPEC) as pipeline:
        policy = pipeline.engines["policy"]
        result = await pipeline.run("What is 3 + 4? Answer with a number.", budget=None)
        llm = policy._llm  # type: ignore[attr-defined]
        config = llm.vllm_config.speculative_config
        assert config is not None and config.num_speculative_tokens == 2
        assert config.method == "draft_model"
        assert result.usage.completion_tokens > 0 and result.result.candidates
        # vLLM's speculative-decoding counters reach the engine state: proposals made, some of them accepted.
        state = await policy.engine_state()  # type: ignore[attr-defined]
        assert state.spec_draft_tokens > 0
        assert 0 <= state.spec_accepted_tokens <= state.spec_draft_tokens
        if _on_cpu():
            with pytest.raises(EngineRequestError, match="corrupts sampled output under speculative decoding"):
                await policy.generate(GenerationRequest(prompt="Count: 1, 2,", max_tokens=8, temperature=0.7))
