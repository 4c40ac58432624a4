"""PDR and the generative verifier on the real embedded vLLM engine with the default model (tiny settings)."""

from __future__ import annotations

import time

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import render_prompt
from branchwise.engine.types import CallUsage, GenerationRequest
from branchwise.engine.vllm_engine import VLLMEngine
from branchwise.evals.arithmetic import arithmetic_problems
from branchwise.search.base import SearchContext
from branchwise.search.pdr import PDR
from branchwise.verifiers.genrm import GenerativeVerifier

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(300)]

PROBLEM = arithmetic_problems(1)[0]
WORKSPACE = 32


async def test_pdr_runs_with_bounded_workspace(vllm_engine: VLLMEngine) -> None:
    requests: list[GenerationRequest] = []

    def record(request: GenerationRequest, usage: CallUsage) -> None:
        requests.append(request)

    remove = vllm_engine.add_usage_hook(record)
    budget = Budget()
    ctx = SearchContext(engine=vllm_engine, budget=budget, max_tokens=64, temperature=0.8)
    strategy = PDR(m=(3, 2), workspace_tokens=WORKSPACE, draft_excerpt_tokens=48)
    started = time.perf_counter()
    try:
        result = await strategy.run(PROBLEM.question, ctx)
    finally:
        remove()
    elapsed = time.perf_counter() - started

    assert not result.budget_exhausted
    assert result.usage.calls == 5  # drafts, distill, drafts, distill, refine
    assert [r.n for r in requests] == [3, 1, 2, 1, 1]
    nodes = result.trace.nodes
    kinds = [n.kind for n in nodes]
    assert kinds == ["draft"] * 3 + ["distill"] + ["draft"] * 2 + ["distill", "refine"]
    assert all(n.status == "finished" for n in nodes)
    distills = [i for i, k in enumerate(kinds) if k == "distill"]
    assert [nodes[i].parent for i in distills] == [None, distills[0]]
    assert all(nodes[i].parent == distills[0] for i in range(4, 6))
    assert nodes[-1].parent == distills[1]
    # The workspace bound holds: the summary requests ask for at most WORKSPACE tokens and get no more.
    summary_requests = [r for r in requests if r.max_tokens == WORKSPACE]
    assert len(summary_requests) == 2
    for i in distills:
        assert 0 < nodes[i].tokens <= WORKSPACE
    sizes = [d["tokens"] for d in result.decisions if d["event"] == "workspace"]
    assert len(sizes) == 2 and all(0 < s <= WORKSPACE for s in sizes)
    # Round 2 sees the problem and the workspace, not the raw drafts of round 1.
    round2 = render_prompt(requests[2])
    # The workspace is the summary without surrounding whitespace; the node keeps the raw sampled text.
    workspace = nodes[distills[0]].text.strip()
    assert PROBLEM.question in round2 and workspace in round2
    outside_workspace = round2.replace(workspace, "")  # a summary may quote a short draft word for word
    for draft in nodes[:3]:
        if len(draft.text.strip()) > 20:
            assert draft.text.strip() not in outside_workspace
    assert result.usage.completion_tokens == sum(n.tokens for n in nodes)
    assert elapsed < 120


async def test_genrm_scores_a_solution(vllm_engine: VLLMEngine) -> None:
    verifier = GenerativeVerifier(vllm_engine, k=3, temperature=0.8, max_tokens=48)
    solution = " ".join(PROBLEM.steps) + f" The answer is {PROBLEM.answer}."
    result = await verifier.score(PROBLEM.question, solution)
    assert 0.0 <= result.score <= 1.0
    assert len(result.verdicts) == len(result.rationales) == 3
    assert all(r in ("stop", "length") for r in result.finish_reasons)
    assert result.usage is not None and result.usage.num_samples == 3
    assert result.score == sum(v is True for v in result.verdicts) / 3
