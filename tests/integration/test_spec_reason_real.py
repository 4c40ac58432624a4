"""Step-level speculative reasoning with two embedded vLLM engines in one process (a speculator drafting steps, the
policy judging them), in both scoring modes, on the real small model."""

from __future__ import annotations

import os

import pytest

from branchwise.engine.vllm_engine import VLLMEngine, split_cpu_cores
from branchwise.orchestrator.pipeline import Pipeline

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(600)]

SPEC = """
engines:
  policy: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024, kv_cache_gib: 1}
  speculator: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024, kv_cache_gib: 1}
thought:
  strategy: spec_reason
  score: SCORE
  threshold: 0.3
  step_tokens: 16
  max_steps: 3
  max_tokens: 48
  samples: {strategy: self_consistency, n: 2}
runtime: {seed: 0}
"""
QUESTION = "Tom has 3 pens and buys 2 more. How many pens does he have?"


async def test_speculator_drafts_steps_the_policy_judges_or_rewrites() -> None:
    async with Pipeline.from_yaml(SPEC.replace("SCORE", "judge")) as pipeline:
        policy, draft = pipeline.engines["policy"], pipeline.engines["speculator"]
        assert isinstance(policy, VLLMEngine) and isinstance(draft, VLLMEngine)
        # Two engines on a CPU are bound to disjoint cores (both would take core 0 otherwise).
        expected = split_cpu_cores(2)
        assert [policy.cpu_cores, draft.cpu_cores] == (expected or [None, None])
        assert len(os.sched_getaffinity(0)) < 2 or expected is not None

        judged = await pipeline.run(QUESTION)
        assert judged.result is not None
        steps = [d for d in judged.result.decisions if d["event"] == "spec_step"]
        assert steps and {d["sample"] for d in steps} == {0, 1}
        for d in steps:  # the verdict follows the policy's P(yes) and the threshold
            assert d["draft_tokens"] > 0
            if d["verdict"] == "accepted":
                assert d["score"] >= 0.3 and d["policy_tokens"] == 0
            elif d["verdict"] == "regenerated":
                assert d["score"] < 0.3
        summary = judged.result.decisions[-1]
        assert summary["event"] == "spec_reason" and summary["steps"] == len(steps)
        # Every call was charged: the draft's steps, one token per judgement, the policy's rewritten steps.
        judgements = sum(d["score"] is not None for d in steps)
        assert judged.usage.completion_tokens == summary["draft_tokens"] + summary["policy_tokens"] + judgements
        assert len(judged.result.candidates) == 2

        # The policy's own token logprobs score the same kind of steps, with no generated judgement.
        async with Pipeline.from_yaml(SPEC.replace("SCORE", "logprob"), engines=pipeline.engines) as again:
            scored = await again.run(QUESTION)
        assert scored.result is not None
        steps = [d for d in scored.result.decisions if d["event"] == "spec_step"]
        assert steps and all(d["score"] is None or 0.0 < d["score"] <= 1.0 for d in steps)
        summary = scored.result.decisions[-1]
        # Scoring by prompt logprobs generates one token per scored step (vLLM needs max_tokens >= 1).
        judgements = sum(d["score"] is not None for d in steps)
        assert scored.usage.completion_tokens == summary["draft_tokens"] + summary["policy_tokens"] + judgements
        for engine in (policy, draft):
            state = await engine.wait_idle()
            assert state.unfinished_requests == 0
