"""Refine (sequential refinement) and PDR (Parallel-Distill-Refine) on scripted engines."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse, render_prompt, tokenize
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.search.base import SearchContext
from branchwise.search.pdr import PDR
from branchwise.search.refine import Refine

Q = "What is 6 x 7?"


def ctx_for(engine: ScriptedEngine | FunctionEngine, **kw: object) -> SearchContext:
    return SearchContext(engine=engine, **kw)  # type: ignore[arg-type]


def prompt_of(request: GenerationRequest) -> str:
    return render_prompt(request)


# ---------------------------------------------------------------------------------------------------------------
# Refine
# ---------------------------------------------------------------------------------------------------------------
async def test_refine_rounds_chain_parents_and_show_previous_attempt() -> None:
    engine = ScriptedEngine(
        ["DRAFT 6 x 7 = 41. The answer is 41.", "FIX-1 6 x 7 = 42. The answer is 42.", "FIX-2 The answer is 42."]
    )
    result = await Refine(rounds=2).run(Q, ctx_for(engine))
    nodes = result.trace.nodes
    assert [n.kind for n in nodes] == ["draft", "refine", "refine"]
    assert [n.parent for n in nodes] == [None, 0, 1]
    assert all(n.status == "finished" for n in nodes)
    assert result.answer == "42"
    assert len(engine.calls) == 3
    # Each refinement sees the problem and the attempt it revises (as the assistant's turn), not older ones.
    second, third = engine.calls[1], engine.calls[2]
    assert second.messages is not None and third.messages is not None
    assert Q in prompt_of(second) and "DRAFT" in prompt_of(second)
    assert second.messages[-2].role == "assistant" and second.messages[-2].content.startswith("DRAFT")
    assert "FIX-1" in prompt_of(third) and "DRAFT" not in prompt_of(third)
    assert "mistake" in third.messages[-1].content
    assert not result.budget_exhausted
    engine.assert_complete()


async def test_refine_stops_at_patience() -> None:
    engine = ScriptedEngine(
        ["The answer is 41.", "The answer is 42.", "The answer is 42.0", "The answer is 42."],
        default="The answer is 99.",
    )
    result = await Refine(rounds=6, patience=2).run(Q, ctx_for(engine))
    # 41 -> 42 (changed) -> 42.0 (same by the grader: 1) -> 42 (2 = patience): stop after 3 refinements.
    assert len(engine.calls) == 4
    assert result.answer == "42"
    assert {"event": "early_stop", "after_round": 3, "unchanged_rounds": 2} in result.decisions
    engine.assert_complete()


async def test_refine_without_patience_runs_every_round() -> None:
    engine = ScriptedEngine([], default="The answer is 42.")
    result = await Refine(rounds=3).run(Q, ctx_for(engine))
    assert len(engine.calls) == 4
    assert [n.parent for n in result.trace.nodes] == [None, 0, 1, 2]


async def test_refine_final_vote_versus_last() -> None:
    texts = ["The answer is 42.", "The answer is 42.", "The answer is 41."]
    last = await Refine(rounds=2).run(Q, ctx_for(ScriptedEngine(texts)))
    vote = await Refine(rounds=2, final="vote").run(Q, ctx_for(ScriptedEngine(texts)))
    assert last.answer == "41"
    assert vote.answer == "42"
    assert vote.votes == {"42": 2.0, "41": 1.0}
    assert len(vote.candidates) == 3


async def test_refine_builds_on_last_attempt_with_an_answer() -> None:
    engine = ScriptedEngine(["BASE The answer is 42.", "I am not sure what to do.", "The answer is 42."])
    result = await Refine(rounds=2).run(Q, ctx_for(engine))
    assert "BASE" in prompt_of(engine.calls[2])  # the answerless round was not built on
    assert [n.parent for n in result.trace.nodes] == [None, 0, 0]
    assert any(d["event"] == "kept_previous" for d in result.decisions)
    assert result.answer == "42"


async def test_refine_budget_refusal_returns_best_so_far() -> None:
    engine = ScriptedEngine([], default="The answer is 42.")
    budget = Budget(max_calls=2)
    result = await Refine(rounds=4).run(Q, ctx_for(engine, budget=budget))
    assert result.budget_exhausted
    assert result.answer == "42"
    assert len(engine.calls) == 2
    assert [n.status for n in result.trace.nodes] == ["finished", "finished", "budget"]


async def test_refine_budget_cut_mid_stream_keeps_previous_answer() -> None:
    long = " ".join(["step"] * 300) + " The answer is 7."
    engine = ScriptedEngine(["The answer is 42.", ScriptedResponse(long, token_delay=0.005)])  # 1.5 s to decode
    budget = Budget(wall_clock_s=0.3)  # the deadline falls inside the refinement's stream
    result = await Refine(rounds=3).run(Q, ctx_for(engine, budget=budget, max_tokens=400))
    assert result.budget_exhausted
    assert result.answer == "42"
    assert [n.status for n in result.trace.nodes] == ["finished", "budget"]
    assert budget.usage.aborted_tokens > 0  # it was cut inside the stream, not refused
    engine.assert_complete()


def test_refine_validation() -> None:
    with pytest.raises(ConfigError):
        Refine(rounds=-1)
    with pytest.raises(ConfigError):
        Refine(patience=0)
    with pytest.raises(ConfigError):
        Refine(final="best")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# PDR
# ---------------------------------------------------------------------------------------------------------------
DRAFTS = ScriptedResponse(
    ["RAW-A 6 x 7 = 42. The answer is 42.", "RAW-B The answer is 42.", "RAW-C The answer is 41.", "RAW-D 42."]
)


def pdr_engine(summary: str = "SUMMARY: most attempts multiply to get 42.") -> FunctionEngine:
    def reply(request: GenerationRequest) -> ScriptedResponse | str:
        prompt = prompt_of(request)
        if "attempted solutions" in prompt:
            return summary
        if "Notes distilled" in prompt:
            return ScriptedResponse(["REFINED 6 x 7 = 42. The answer is 42.", "REFINED The answer is 42."])
        return DRAFTS

    return FunctionEngine(reply)


def is_distill(request: GenerationRequest) -> bool:
    return "attempted solutions" in prompt_of(request)


async def test_pdr_schedule_sets_request_n_and_trace_structure() -> None:
    engine = pdr_engine()
    result = await PDR(m=(4, 2, 3), workspace_tokens=32).run(Q, ctx_for(engine))
    # drafts(4), distill, drafts(2), distill, drafts(3), distill, refine
    assert [c.n for c in engine.calls] == [4, 1, 2, 1, 3, 1, 1]
    assert [is_distill(c) for c in engine.calls] == [False, True, False, True, False, True, False]
    nodes = result.trace.nodes
    kinds = [n.kind for n in nodes]
    assert kinds == ["draft"] * 4 + ["distill"] + ["draft"] * 2 + ["distill"] + ["draft"] * 3 + ["distill", "refine"]
    d1, d2, d3 = (i for i, k in enumerate(kinds) if k == "distill")
    assert all(nodes[i].parent is None for i in range(4))
    assert all(nodes[i].parent == d1 for i in range(d1 + 1, d2))
    assert all(nodes[i].parent == d2 for i in range(d2 + 1, d3))
    assert nodes[d1].parent is None and nodes[d2].parent == d1 and nodes[d3].parent == d2
    assert nodes[-1].parent == d3
    assert all(nodes[i].answer is None for i in (d1, d2, d3))  # summaries are not solutions
    assert result.answer == "42"
    assert result.decisions[-1]["source"] == "refine"
    sizes = [d["tokens"] for d in result.decisions if d["event"] == "workspace"]
    assert len(sizes) == 3 and all(0 < s <= 32 for s in sizes)
    assert not result.budget_exhausted


async def test_pdr_workspace_is_bounded_and_replaces_raw_drafts() -> None:
    long_summary = "SUMMARY " + " ".join(f"w{i}" for i in range(200))
    engine = pdr_engine(long_summary)
    result = await PDR(m=(4, 2), workspace_tokens=16).run(Q, ctx_for(engine))
    distills = [c for c in engine.calls if is_distill(c)]
    assert len(distills) == 2
    assert all(c.max_tokens <= 16 for c in distills)
    # The distiller sees every draft of its round.
    assert all(f"RAW-{x}" in prompt_of(distills[0]) for x in "ABCD")
    workspace_nodes = [n for n in result.trace.nodes if n.kind == "distill"]
    assert all(n.tokens == 16 and len(tokenize(n.text)) <= 16 for n in workspace_nodes)
    assert all(n.finish_reason == "length" for n in workspace_nodes)
    # Round 2's drafts and the final refinement see the problem and the (clipped) workspace, never the raw drafts.
    later = [c for c in engine.calls if not is_distill(c)][1:]
    assert len(later) == 2
    for call in later:
        prompt = prompt_of(call)
        assert Q in prompt
        assert "SUMMARY w0" in prompt
        assert "w16" not in prompt  # beyond the bound
        assert "RAW-" not in prompt
    ws = [d for d in result.decisions if d["event"] == "workspace"]
    assert [d["tokens"] for d in ws] == [16, 16]
    assert all(d["truncated"] and d["limit"] == 16 for d in ws)
    assert ws[0]["sources"] == [0, 1, 2, 3]


async def test_pdr_single_int_schedule_with_rounds() -> None:
    engine = pdr_engine()
    result = await PDR(m=3, rounds=3, final="vote").run(Q, ctx_for(engine))
    # No distill after the last round when the final answer is a vote.
    assert [c.n for c in engine.calls] == [3, 1, 3, 1, 3]
    assert "refine" not in {n.kind for n in result.trace.nodes}
    assert result.answer == "42"
    assert result.decisions[-1]["source"] == "vote"
    assert result.votes == {"42": 3.0}


async def test_pdr_topk_distill_makes_no_llm_call() -> None:
    confident = "SURE " + " ".join(["x"] * 30) + " The answer is 42."
    unsure = "SHAKY The answer is 41."
    drafts = ScriptedResponse([unsure, confident, "MID The answer is 40."], logprobs=[[-3.0], [-0.01], [-1.0]])
    seen: list[GenerationRequest] = []

    def reply(request: GenerationRequest) -> ScriptedResponse:
        seen.append(request)
        if len(seen) == 1:
            return drafts
        return ScriptedResponse(["The answer is 42."])

    engine = FunctionEngine(reply)
    result = await PDR(m=(3, 2), distill="topk", top_k=1, workspace_tokens=12).run(Q, ctx_for(engine))
    assert [c.n for c in engine.calls] == [3, 2, 1]  # drafts, drafts, refine: the workspaces cost no call
    assert all(c.logprobs is not None and c.logprobs >= 2 for c in engine.calls[:2])
    second = prompt_of(engine.calls[1])
    assert "answer is 42" in second  # the conclusion of the most confident draft is kept
    assert "SHAKY" not in second and "MID" not in second
    assert "SURE" not in second  # cut to its last 12 tokens
    workspaces = [n for n in result.trace.nodes if n.kind == "distill"]
    assert len(workspaces) == 2 and all(n.tokens == 0 for n in workspaces)
    assert all(n.scores["workspace_tokens"] <= 12 for n in workspaces)
    first_ws = next(d for d in result.decisions if d["event"] == "workspace")
    assert first_ws["mode"] == "topk" and first_ws["sources"] == [1] and first_ws["tokens"] == 12
    assert result.answer == "42"


async def test_pdr_budget_cut_mid_round_returns_best_so_far() -> None:
    long = " ".join(["step"] * 100)

    def reply(request: GenerationRequest) -> ScriptedResponse | str:
        prompt = prompt_of(request)
        if "attempted solutions" in prompt:
            return "SUMMARY most say 42"
        if "Notes distilled" in prompt:
            return ScriptedResponse([long, long], token_delay=0.01)  # 1 s to decode; round 1 takes no time
        return DRAFTS

    engine = FunctionEngine(reply)
    budget = Budget(wall_clock_s=0.3)  # the deadline falls inside round 2's stream
    result = await PDR(m=(4, 2)).run(Q, ctx_for(engine, budget=budget, max_tokens=200))
    assert result.budget_exhausted
    assert budget.usage.aborted_tokens > 0  # round 2 was cut inside the engine
    statuses = [(n.kind, n.status) for n in result.trace.nodes]
    assert statuses[:5] == [("draft", "finished")] * 4 + [("distill", "finished")]
    assert {s for k, s in statuses[5:]} == {"budget"}
    assert result.answer == "42"  # the vote of round 1, the last round with answers
    assert result.votes == {"42": 3.0, "41": 1.0}


async def test_pdr_budget_refusal_before_start() -> None:
    engine = pdr_engine()
    budget = Budget(max_calls=1)
    await PDR(m=(2,), final="vote").run(Q, ctx_for(engine, budget=budget))
    result = await PDR(m=(2,), final="vote").run(Q, ctx_for(engine, budget=budget))
    assert result.budget_exhausted
    assert result.answer is None
    assert len(engine.calls) == 1


async def test_pdr_falls_back_to_vote_when_refinement_has_no_answer() -> None:
    def reply(request: GenerationRequest) -> ScriptedResponse | str:
        prompt = prompt_of(request)
        if "attempted solutions" in prompt:
            return "SUMMARY"
        if "Notes distilled" in prompt:
            return "I cannot tell."
        return DRAFTS

    result = await PDR(m=(4,)).run(Q, ctx_for(FunctionEngine(reply)))
    assert result.trace.nodes[-1].kind == "refine"
    assert result.answer == "42"
    assert result.decisions[-1]["source"] == "vote"


def test_pdr_validation() -> None:
    assert PDR(m=5, rounds=2).schedule == (5, 5)
    assert PDR(m=[8, 4, 2]).schedule == (8, 4, 2)
    for bad in (
        {"m": []},
        {"m": [4, 0]},
        {"m": [4, 2], "rounds": 3},
        {"distill": "mean"},
        {"final": "best"},
        {"workspace_tokens": 0},
        {"top_k": 0},
        {"workspace_prompt": "{question} only"},
    ):
        with pytest.raises(ConfigError):
            PDR(**bad)  # type: ignore[arg-type]


def test_pdr_and_refine_names() -> None:
    assert PDR.name == "pdr"
    assert Refine.name == "refine"
    assert PDR(m=(2, 1)).describe()["schedule"] == (2, 1)
