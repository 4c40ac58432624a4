"""Two example pipelines end to end on the real embedded engine (the shared session engine, small token caps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.tracing import read_trace

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def test_sc_math_example_on_the_real_engine(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    trace = tmp_path / "sc.jsonl"
    overrides = {"thought.n": 4, "thought.max_tokens": 48, "outputs.trace": str(trace)}
    async with Pipeline.from_yaml(EXAMPLES / "sc-math.yaml", overrides=overrides, engines={"policy": vllm_engine}) as p:
        result = await p.run("A train goes 60 mph for 3 hours. How far does it go, in miles?")
    assert result.usage.calls == 1 and 0 < result.usage.completion_tokens <= 4 * 48
    assert len(result.result.trace) == 4
    recorded = read_trace(trace)
    calls = recorded.of_kind("engine_call")
    assert len(calls) == 1 and calls[0].data["backend"] == "vllm" and calls[0].data["prompt_tokens"] > 0
    assert recorded.run_end is not None and recorded.run_end.data["status"] == "ok"
    assert vllm_engine.capabilities  # the shared engine stays open for the next test


async def test_deepconf_example_on_the_real_engine(vllm_engine: VLLMEngine, tmp_path: Path) -> None:
    trace = tmp_path / "dc.jsonl"
    overrides = {
        "thought.n": 6,
        "thought.warmup": 2,
        "thought.window": 8,
        "thought.consensus": "null",
        "thought.concurrency": 4,
        "thought.max_tokens": 48,
        "outputs.trace": str(trace),
    }
    async with Pipeline.from_yaml(
        EXAMPLES / "deepconf-early-stop.yaml", overrides=overrides, engines={"policy": vllm_engine}
    ) as pipeline:
        result = await pipeline.run("Tom has 3 boxes of 12 eggs and breaks 5. How many are left?")
    assert len(result.result.trace) == 6
    recorded = read_trace(trace)
    ends = recorded.of_kind("trace_end")
    assert len(ends) == 6
    # pruned traces were aborted inside the engine after at least a window of tokens
    for end in ends:
        if end.data["status"] == "pruned":
            assert 8 <= end.data["tokens"] < 48
    assert result.pruned == sum(1 for e in ends if e.data["status"] == "pruned")
    assert result.usage.calls == 5  # the warm-up request (n=2) and one request per later trace
