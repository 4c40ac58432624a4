"""Beam search with the generative judge on the real embedded vLLM engine (the default model judges itself)."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.arithmetic import arithmetic_problems
from branchwise.search import SearchContext
from branchwise.search.beam import PRUNE_LOW_SCORE, Beam, BeamPath, StepSearch
from branchwise.search.dvts import DVTS
from branchwise.verifiers.step_scorers import EmbeddedPoolingClient, GenerativeJudgeScorer

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]


async def test_continuation_prompt_keeps_the_beam_prefix(vllm_engine: VLLMEngine) -> None:
    await vllm_engine.start()
    ctx = SearchContext(engine=vllm_engine)
    search = StepSearch(width=2, expansions=2, max_depth=3)
    request = search.request("What is 2 + 3?", ctx, BeamPath(steps=("First, add 2 and 3.",), node=0), 2)
    rendered = vllm_engine.render(request)
    # The chat template must leave the assistant turn open, delimiter included, for the next step to follow it.
    assert rendered.endswith("First, add 2 and 3.\n\n")
    assert "What is 2 + 3?" in rendered


async def test_beam_with_generative_judge_on_arithmetic(vllm_engine: VLLMEngine) -> None:
    problem = arithmetic_problems(1, seed=3, levels=(2,))[0]
    budget = Budget(max_completion_tokens=4000)
    ctx = SearchContext(engine=vllm_engine, budget=budget, temperature=0.8, max_tokens=256)
    # Small on purpose: ~10-20 s on an idle 2-core machine (4 + 2..4 step samples, one judge call per step).
    strategy = Beam(GenerativeJudgeScorer(), beam_width=2, expansions=2, max_depth=2, step_tokens=48)
    result = await strategy.run(problem.question, ctx)

    tree = result.trace
    steps = [n for n in tree.nodes if n.kind == "step"]
    assert steps and tree.nodes[0].parent is None
    assert all(n.status in ("finished", "pruned", "budget") for n in steps)
    # Each depth keeps the 2 best scored candidates and prunes the rest by score. How many there were depends on
    # the samples (duplicates are dropped before scoring, finished beams leave), so count from the decisions.
    depths = [d for d in result.decisions if d["event"] == "depth"]
    low = [n for n in tree.pruned() if n.pruned_by == PRUNE_LOW_SCORE]
    assert depths and len(low) == sum(max(0, d["scored"] - 2) for d in depths)
    scored = [n for n in steps if "step" in n.scores]
    assert scored and all(0.0 <= n.scores["step"] <= 1.0 for n in scored)
    # The judge's yes/no answers were found among the top logprobs (0.5 is the no-answer fallback).
    assert any(n.scores["step"] != 0.5 for n in scored)
    # Continuations extend their parent's node.
    assert all(tree.nodes[n.parent].kind == "step" for n in steps if n.parent is not None)
    assert result.answer is None or result.answer.strip()
    assert result.candidates
    assert result.usage.completion_tokens > 0
    # Step requests (one per expanded beam) plus one judge request per scored step.
    assert result.usage.calls == len({n.parent for n in steps}) + len(scored)


async def test_dvts_subtrees_on_the_real_engine(vllm_engine: VLLMEngine) -> None:
    problem = arithmetic_problems(1, seed=4, levels=(1,))[0]
    ctx = SearchContext(engine=vllm_engine, budget=Budget(max_completion_tokens=3000), temperature=0.8, max_tokens=256)
    strategy = DVTS(GenerativeJudgeScorer(), n=4, beam_width=2, max_depth=2, step_tokens=40)
    result = await strategy.run(problem.question, ctx)

    tree = result.trace
    roots = [n for n in tree.nodes if n.kind == "subtree"]
    assert len(roots) == 2 and all(r.parent is None for r in roots)
    # Every step descends from exactly one subtree root: subtrees never share a path.
    for node in (n for n in tree.nodes if n.kind == "step"):
        ancestor = node
        while ancestor.parent is not None:
            ancestor = tree.nodes[ancestor.parent]
        assert ancestor in roots
    # Width 1 per subtree: of each pair of sampled steps at most one is kept, the other pruned by score
    # (or as a duplicate).
    assert tree.pruned()
    assert {d["subtree"] for d in result.decisions if d["event"] == "subtree"} == {0, 1}
    assert result.candidates and result.usage.completion_tokens > 0
    assert (await vllm_engine.wait_idle(timeout=30)).idle


async def test_real_pooling_params_accept_the_request_fields() -> None:
    # The embedded PRM client builds vllm.PoolingParams; check the 0.32 constructor takes our fields.
    class _LLM:
        def encode(self) -> None: ...
        def get_tokenizer(self) -> None: ...

    params = EmbeddedPoolingClient(_LLM(), step_tag_id=151651).pooling_params()
    assert params.task == "token_classify"
    assert params.step_tag_id == 151651
