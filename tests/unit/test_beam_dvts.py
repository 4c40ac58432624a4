"""Beam search and DVTS on scripted engines and scripted step scores: tree shape, continuation prompts, pruning,
answer selection, budget exhaustion, and DVTS's independent concurrent subtrees."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.search import SearchContext
from branchwise.search.base import TraceNode, TraceTree
from branchwise.search.beam import PRUNE_DUPLICATE, PRUNE_LOW_SCORE, Beam, step_end
from branchwise.search.dvts import DVTS
from branchwise.verifiers.step_scorers import ScriptedStepScorer

Q = "Ann has 3 apples and buys 4 more. How many apples does she have?"
D = "\n\n"


def prefix_of(request: GenerationRequest) -> str:
    """The beam text a request continues ("" for the first step)."""
    if not request.continue_final_message:
        return ""
    assert request.messages is not None
    return request.messages[-1].content


def step_engine(children: dict[str, Sequence[str]], *, token_delay: float = 0.0) -> FunctionEngine:
    """Answers each step request with the scripted next steps of the prefix it continues."""

    def reply(request: GenerationRequest) -> ScriptedResponse:
        return ScriptedResponse(list(children[prefix_of(request)]))

    return FunctionEngine(reply, token_delay=token_delay)


def by_text(tree: TraceTree) -> dict[str, TraceNode]:
    return {node.text: node for node in tree.nodes if node.kind == "step"}


def ancestors(tree: TraceTree, node: TraceNode) -> list[int]:
    chain = []
    while node.parent is not None:
        chain.append(node.parent)
        node = tree.nodes[node.parent]
    return chain


async def test_beam_expands_keeps_best_and_prunes_the_rest() -> None:
    engine = step_engine(
        {
            "": ["Alpha", "Bravo", "Charlie", "Delta"],
            "Alpha" + D: ["Echo", "Foxtrot"],
            "Bravo" + D: ["Golf", "Hotel"],
            "Alpha" + D + "Foxtrot" + D: ["The answer is 5.", "India"],
            "Bravo" + D + "Golf" + D: ["Juliet", "So the answer is 7."],
        }
    )
    scores = {
        "Alpha": 0.9, "Bravo": 0.8, "Charlie": 0.3, "Delta": 0.2,
        "Echo": 0.5, "Foxtrot": 0.95, "Golf": 0.7, "Hotel": 0.1,
        "The answer is 5.": 0.6, "India": 0.4, "Juliet": 0.65, "So the answer is 7.": 0.9,
    }  # fmt: skip
    scorer = ScriptedStepScorer(scores, default=None)
    strategy = Beam(scorer, beam_width=2, expansions=2, max_depth=3)
    result = await strategy.run(Q, SearchContext(engine=engine))

    tree = result.trace
    nodes = by_text(tree)
    assert len(tree) == 12  # 4 first steps, then 2 beams x 2 expansions at each of two depths
    assert all(n.kind == "step" for n in tree.nodes)
    # Parents: every expansion extends the node of the beam it continues.
    for first in ("Alpha", "Bravo", "Charlie", "Delta"):
        assert nodes[first].parent is None
    assert nodes["Echo"].parent == nodes["Foxtrot"].parent == nodes["Alpha"].id
    assert nodes["Golf"].parent == nodes["Hotel"].parent == nodes["Bravo"].id
    assert nodes["The answer is 5."].parent == nodes["Foxtrot"].id
    assert nodes["Juliet"].parent == nodes["Golf"].id
    # Statuses: the two best of each depth survive, the others are pruned by score.
    pruned = {n.text for n in result.trace.pruned()}
    assert pruned == {"Charlie", "Delta", "Echo", "Hotel", "The answer is 5.", "India"}
    assert all(n.pruned_by == PRUNE_LOW_SCORE for n in result.trace.pruned())
    assert nodes["So the answer is 7."].status == "finished"
    assert nodes["So the answer is 7."].answer == "7"
    assert nodes["Foxtrot"].scores == {"step": 0.95, "beam": 0.95}
    # The best finished beam wins; the other survivor of the last depth finished at max_depth without an answer.
    assert result.answer == "7"
    assert {c.text for c in result.candidates} == {
        "Bravo" + D + "Golf" + D + "So the answer is 7.",
        "Bravo" + D + "Golf" + D + "Juliet",
    }
    assert result.pruned == 6
    assert not result.budget_exhausted
    assert [d["expanded"] for d in result.decisions] == [4, 4, 4]
    # Scorer calls: only the new step of each candidate, with its whole prefix.
    assert ("Alpha", "Foxtrot", "The answer is 5.") in scorer.calls
    assert len(scorer.calls) == 12


async def test_continuation_requests_carry_the_beam_prefix() -> None:
    engine = step_engine(
        {
            "": ["First step", "Other step"],
            "First step" + D: ["Second step"],
            "First step" + D + "Second step" + D: ["The answer is 7."],
        }
    )
    scorer = ScriptedStepScorer({"First step": 0.9, "Other step": 0.1})
    ctx = SearchContext(engine=engine, temperature=0.8, max_tokens=300)
    result = await Beam(scorer, beam_width=1, expansions=2, max_depth=5, step_tokens=40).run(Q, ctx)
    assert result.answer == "7"
    first, second, third = engine.calls
    assert first.n == 2 and not first.continue_final_message
    assert first.messages is not None and [m.role for m in first.messages] == ["user"]
    for request in (second, third):
        assert request.continue_final_message
        assert request.messages is not None
        assert [m.role for m in request.messages] == ["user", "assistant"]
        assert request.messages[0] == first.messages[0]  # the prompt is unchanged: the prefix cache is hit
        assert request.n == 2
    assert second.messages is not None and second.messages[-1].content == "First step" + D
    assert third.messages is not None and third.messages[-1].content == "First step" + D + "Second step" + D
    for request in engine.calls:
        assert request.stop == (D,)
        assert request.max_tokens == 40
        assert request.temperature == 0.8


async def test_best_scored_path_beats_a_more_frequent_answer() -> None:
    engine = step_engine(
        {"": ["So the answer is 4.", "Thus the answer is 4.", "Hence the answer is 4.", "The answer is 7."]}
    )
    scores = {"So the answer is 4.": 0.3, "Thus the answer is 4.": 0.3, "Hence the answer is 4.": 0.3}
    scorer = ScriptedStepScorer(scores, default=0.8)
    best = await Beam(scorer, beam_width=4, expansions=1).run(Q, SearchContext(engine=engine))
    assert best.answer == "7"
    assert best.votes == {"4": 0.3, "7": 0.8}
    assert len(best.candidates) == 4 and all(c.answer is not None for c in best.candidates)
    # A score-weighted vote lets three weak paths (0.9 in total) outvote the best one.
    voted = await Beam(scorer, beam_width=4, expansions=1, selection="weighted_vote").run(
        Q, SearchContext(engine=engine)
    )
    assert voted.answer == "4"
    assert voted.votes == {"4": pytest.approx(0.9), "7": pytest.approx(0.8)}


async def test_aggregate_changes_which_path_wins() -> None:
    engine = step_engine(
        {
            "": ["Shaky start", "Steady start"],
            "Shaky start" + D: ["Great finish, the answer is 1."],
            "Steady start" + D: ["Fine finish, the answer is 2."],
        }
    )
    scores = {
        "Shaky start": 0.2, "Great finish, the answer is 1.": 0.9,
        "Steady start": 0.6, "Fine finish, the answer is 2.": 0.7,
    }  # fmt: skip
    last = await Beam(ScriptedStepScorer(scores), beam_width=2, expansions=1, aggregate="last").run(
        Q, SearchContext(engine=engine)
    )
    assert last.answer == "1"
    least = await Beam(ScriptedStepScorer(scores), beam_width=2, expansions=1, aggregate="min").run(
        Q, SearchContext(engine=engine)
    )
    assert least.answer == "2"
    assert {c.answer: c.score for c in least.candidates} == {"1": 0.2, "2": 0.6}
    prod = await Beam(ScriptedStepScorer(scores), beam_width=2, expansions=1, aggregate="prod").run(
        Q, SearchContext(engine=engine)
    )
    assert {c.answer: c.score for c in prod.candidates} == pytest.approx({"1": 0.18, "2": 0.42})


async def test_empty_step_and_length_finish_beams() -> None:
    engine = step_engine(
        {
            "": ["Add three and four", "word " * 30],
            "Add three and four" + D: [""],  # the model has nothing to add: the solution ended (EOS)
        }
    )
    scorer = ScriptedStepScorer({"Add three and four": 0.9}, default=0.5)
    result = await Beam(scorer, beam_width=2, expansions=1, step_tokens=10).run(Q, SearchContext(engine=engine))
    nodes = result.trace.nodes
    long_step = next(n for n in nodes if n.text.startswith("word"))
    assert long_step.finish_reason == "length" and long_step.tokens == 10 and long_step.status == "finished"
    empty = next(n for n in nodes if n.parent is not None)
    assert empty.text == "" and empty.status == "finished"
    assert empty.scores["beam"] == 0.9  # keeps its parent's score: no new step to judge
    assert len(scorer.calls) == 2  # the empty step was not scored
    assert {c.text for c in result.candidates} == {"Add three and four", ("word " * 10).rstrip()}
    assert len(engine.calls) == 2  # the length-cut beam was not continued


def test_step_end_uses_the_stop_reason_when_reported() -> None:
    assert step_end("stop", D, D) == "delimiter"
    assert step_end("stop", None, D) == "delimiter"  # unknown: assumed, an EOS shows as an empty next step
    assert step_end("stop", "<|im_end|>", D) == "eos"
    assert step_end("stop", 2, D) == "eos"  # a stop token id
    assert step_end("length", None, D) == "length"
    assert step_end("abort", None, D) == "incomplete"
    assert step_end(None, None, D) == "incomplete"


async def test_duplicate_siblings_are_pruned_without_scoring() -> None:
    engine = step_engine({"": ["Same step", "Same step ", "The answer is 3."]})
    scorer = ScriptedStepScorer({"Same step": 0.9, "The answer is 3.": 0.4})
    result = await Beam(scorer, beam_width=3, expansions=1, max_depth=1).run(Q, SearchContext(engine=engine))
    dupes = [n for n in result.trace.pruned() if n.pruned_by == PRUNE_DUPLICATE]
    assert len(dupes) == 1
    assert len(scorer.calls) == 2
    assert result.answer == "3"  # "Same step" reached max_depth without an answer; extracted: none


async def test_budget_exhaustion_returns_best_so_far() -> None:
    engine = step_engine({"": ["The answer is 3.", "Alpha", "Bravo", "Charlie"], "Alpha" + D: ["Delta", "Echo"]})
    scorer = ScriptedStepScorer({"The answer is 3.": 0.5, "Alpha": 0.9, "Bravo": 0.2, "Charlie": 0.1})
    ctx = SearchContext(engine=engine, budget=Budget(max_calls=1))
    result = await Beam(scorer, beam_width=2, expansions=2, max_depth=4).run(Q, ctx)
    assert result.budget_exhausted
    assert result.answer == "3"
    refused = [n for n in result.trace.nodes if n.status == "budget"]
    assert len(refused) == 2 and all(n.parent == by_text(result.trace)["Alpha"].id for n in refused)
    assert result.usage.calls == 1
    assert len(engine.calls) == 1


async def test_budget_cut_mid_step_aborts_inside_the_engine() -> None:
    long_step = " ".join(["word"] * 200)
    children = {"": ["Start here", "Also here"], "Start here" + D: [long_step], "Also here" + D: [long_step]}
    engine = step_engine(children, token_delay=0.0005)
    scorer = ScriptedStepScorer({"Start here": 0.9, "Also here": 0.6})
    ctx = SearchContext(engine=engine, budget=Budget(max_completion_tokens=40), max_tokens=400)
    # Two beams step concurrently: each call is admitted with the whole remaining allowance, so the cap is
    # crossed mid-stream and both calls are aborted inside the engine.
    result = await Beam(scorer, beam_width=2, expansions=1, max_depth=4).run(Q, ctx)
    assert result.budget_exhausted
    cut = [n for n in result.trace.nodes if n.status == "budget"]
    assert len(cut) == 2 and all(0 < n.tokens < 200 for n in cut)
    assert engine.aborted == 2 and engine.active == 0
    assert result.usage.completion_tokens <= 40
    # No beam finished: the beams the cut steps extended are the best so far (their text has no answer).
    assert [c.text for c in result.candidates] == ["Start here", "Also here"]
    assert result.answer is None


async def test_budget_clipped_step_is_a_budget_cut_not_a_finished_beam() -> None:
    engine = step_engine({"": ["Start here", "Weak start"], "Start here" + D: [" ".join(["word"] * 200)]})
    scorer = ScriptedStepScorer({"Start here": 0.9, "Weak start": 0.1})
    ctx = SearchContext(engine=engine, budget=Budget(max_completion_tokens=40), max_tokens=400)
    result = await Beam(scorer, beam_width=1, expansions=2, max_depth=4).run(Q, ctx)
    # The budget clipped the second request to 18 tokens a sample: those steps are cut, not finished by length.
    assert result.budget_exhausted
    cut = [n for n in result.trace.nodes if n.status == "budget"]
    assert [n.tokens for n in cut] == [18, 18]
    assert [c.text for c in result.candidates] == ["Start here"]


async def test_judge_scorer_calls_are_charged_to_the_budget() -> None:
    def reply(request: GenerationRequest) -> ScriptedResponse:
        if request.max_tokens == 1 and request.logprobs:  # a judge call
            assert request.messages is not None
            return ScriptedResponse(["Yes" if "right" in request.messages[-1].content else "No"])
        return ScriptedResponse(["A wrong step", "The right answer is 7."])

    engine = FunctionEngine(reply)
    budget = Budget()
    result = await Beam(beam_width=1, expansions=2).run(Q, SearchContext(engine=engine, budget=budget))
    assert result.answer == "7"
    assert budget.usage.calls == 3  # one step request + two judge requests
    assert {n.text: n.scores.get("step") for n in result.trace.nodes} == {
        "A wrong step": 0.0,
        "The right answer is 7.": 1.0,
    }

    # A budget that refuses the judge leaves the steps unscored and stops the search.
    engine2 = FunctionEngine(reply)
    limited = await Beam(beam_width=1, expansions=2).run(Q, SearchContext(engine=engine2, budget=Budget(max_calls=1)))
    assert limited.budget_exhausted
    assert {n.status for n in limited.trace.nodes} == {"budget"}
    assert limited.answer is None


async def test_bad_parameters() -> None:
    for kwargs in ({"beam_width": 0}, {"expansions": 0}, {"max_depth": 0}, {"delimiter": ""}, {"aggregate": "median"},
                   {"selection": "random"}, {"step_tokens": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            Beam(ScriptedStepScorer({}), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Beam(scorer=lambda p, s: 0.5)  # type: ignore[arg-type]
    engine = step_engine({"": ["x"]})
    with pytest.raises(ConfigError, match="temperature"):
        await Beam(ScriptedStepScorer({}), expansions=2).run(Q, SearchContext(engine=engine, temperature=0.0))
    assert not engine.calls  # failed before any call
    with pytest.raises(ConfigError, match="multiple"):
        DVTS(ScriptedStepScorer({}), n=10, beam_width=4)
    for kwargs in ({"n": 0}, {"beam_width": 0}, {"subtree_width": 0}):
        with pytest.raises(ConfigError):
            DVTS(ScriptedStepScorer({}), **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# DVTS
# ---------------------------------------------------------------------------------------------------------------
def dvts_engine(
    roots: list[list[str]], children: dict[str, Sequence[str]], *, barrier: asyncio.Barrier | None = None
) -> FunctionEngine:
    """Root requests get ``roots[i]`` in arrival order; continuations get ``children[prefix]``."""
    arrivals = iter(roots)

    async def reply(request: GenerationRequest) -> ScriptedResponse:
        prefix = prefix_of(request)
        if prefix:
            return ScriptedResponse(list(children[prefix]))
        texts = next(arrivals)
        if barrier is not None:
            await barrier.wait()  # every subtree's first request must be in flight at once
        return ScriptedResponse(texts)

    return FunctionEngine(reply)


async def test_dvts_subtrees_are_independent_and_concurrent() -> None:
    roots = [["A hi", "A mid", "A low", "A least"], ["B hi", "B mid", "B low", "B least"]]
    children = {
        "A hi" + D: ["A done, the answer is 5.", "A other, the answer is 6.", "A third", "A fourth"],
        "B hi" + D: ["B done, the answer is 7.", "B other", "B third", "B fourth"],
    }
    scores = {"A hi": 0.9, "A mid": 0.85, "A low": 0.8, "A least": 0.75, "B hi": 0.5, "B mid": 0.4, "B low": 0.3}
    scores |= {"A done, the answer is 5.": 0.6, "B done, the answer is 7.": 0.7}
    scorer = ScriptedStepScorer(scores, default=0.1)
    engine = dvts_engine(roots, children, barrier=asyncio.Barrier(2))
    strategy = DVTS(scorer, n=8, beam_width=4, max_depth=4)
    assert strategy.subtrees == 2
    async with asyncio.timeout(5):  # sequential subtrees would wait at the barrier forever
        result = await strategy.run(Q, SearchContext(engine=engine))

    tree = result.trace
    subtrees = [n for n in tree.nodes if n.kind == "subtree"]
    assert len(subtrees) == 2 and all(n.parent is None for n in subtrees)
    nodes = by_text(tree)
    # Each subtree keeps its own best step, although "A mid" and "A low" outscore "B hi".
    assert nodes["B hi"].status == "finished"
    assert {nodes[t].status for t in ("A mid", "A low", "A least")} == {"pruned"}
    # Every step descends from exactly one subtree root, and siblings share it.
    root_of = {n.id: ancestors(tree, n)[-1] for n in tree.nodes if n.kind == "step"}
    a_root, b_root = root_of[nodes["A hi"].id], root_of[nodes["B hi"].id]
    assert a_root != b_root
    assert all(root_of[n.id] == (a_root if n.text.startswith("A") else b_root) for n in tree.nodes if n.kind == "step")
    # Each subtree draws beam_width steps per request (n=8 split in two).
    assert [r.n for r in engine.calls] == [4, 4, 4, 4]
    # The best leaf across subtrees wins.
    assert result.answer == "7"
    assert {c.answer for c in result.candidates} == {"5", "7"}
    assert sorted(d["finished"] for d in result.decisions if d["event"] == "subtree") == [1, 1]
    assert tree.nodes[b_root].scores["best"] == 0.7


async def test_dvts_weighted_vote_and_budget() -> None:
    roots = [["So the answer is 4."] * 2, ["Thus the answer is 4.", "Hence"], ["The answer is 9."] * 2]
    scorer = ScriptedStepScorer({"So the answer is 4.": 0.5, "Thus the answer is 4.": 0.5, "The answer is 9.": 0.8})
    voted = await DVTS(scorer, n=6, beam_width=2, selection="weighted_vote").run(
        Q, SearchContext(engine=dvts_engine(roots, {}))
    )
    assert voted.answer == "4"  # 0.5 + 0.5 over 0.8
    best = await DVTS(scorer, n=6, beam_width=2).run(Q, SearchContext(engine=dvts_engine(roots, {})))
    assert best.answer == "9"

    # Budget: only the first subtree's request is admitted; the search stops with what it has.
    limited = await DVTS(scorer, n=6, beam_width=2).run(
        Q, SearchContext(engine=dvts_engine(roots, {}), budget=Budget(max_calls=1))
    )
    assert limited.budget_exhausted
    assert limited.answer == "4"
    statuses = [n.status for n in limited.trace.nodes if n.kind == "subtree"]
    assert statuses.count("budget") == 2 and statuses.count("finished") == 1
