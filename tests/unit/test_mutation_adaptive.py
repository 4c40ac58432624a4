"""Adaptive in detail (gaps found by mutation testing, `make mutation`): parameters, the exact decision records,
agreement at the bar and without answers, the result of each way a run ends, and delegation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import pytest

from branchwise.budget import Budget
from branchwise.engine import CallMeter, Delta, GenerationRequest
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
from branchwise.errors import ConfigError, EngineStreamBroken
from branchwise.search import Adaptive, SearchContext, SelfConsistency

Q = "What is 6 x 7?"


def test_documented_defaults() -> None:
    s = Adaptive()
    assert (s.probe, s.stages, s.stop_agreement, s.min_votes, s.escalate_to) == (4, (8, 16), 0.75, 2, None)


AGREEMENT = "adaptive: stop_agreement must be in (0, 1] and min_votes >= 1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe": 0, "stages": ()}, "adaptive: probe >= 1 and strictly increasing stages needed, got (0,)"),
        ({"probe": 4, "stages": (4,)}, "adaptive: probe >= 1 and strictly increasing stages needed, got (4, 4)"),
        ({"stop_agreement": 0}, AGREEMENT),
        ({"stop_agreement": 1.5}, AGREEMENT),
        ({"min_votes": 0}, AGREEMENT),
    ],
)
def test_bad_parameters_are_refused_with_their_message(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Adaptive(**kwargs)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_the_boundary_values_are_accepted() -> None:
    Adaptive(probe=1, stages=(2,), stop_agreement=1.0, min_votes=1)


async def test_decisions_record_agreement_and_difficulty_rounded_to_four_places() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 42.", "The answer is 42.", "The answer is 41."]))
    result = await Adaptive(probe=3, stages=(), stop_agreement=0.9).run(Q, SearchContext(engine=engine))
    assert result.decisions == [
        {
            "stage": 0,
            "samples": 3,
            "agreement": 0.6667,
            "votes": 3,
            "difficulty": 0.3333,
            "action": "stop_last_stage",
        }
    ]
    assert [n.kind for n in result.trace.nodes] == ["stage0"] * 3


async def test_agreement_exactly_at_the_bar_stops() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 42."] * 3 + ["The answer is 41."]))
    result = await Adaptive(probe=4, stages=(8,), stop_agreement=0.75).run(Q, SearchContext(engine=engine))
    assert [d["action"] for d in result.decisions] == ["stop_agreed"]
    assert result.strategy == "adaptive" and result.answer == "42" and result.votes == {"42": 3.0, "41": 1.0}
    assert len(result.candidates) == 4 and len(result.trace) == 4
    assert result.usage.calls == 1 and result.budget_exhausted is False


async def test_no_answers_is_no_agreement() -> None:
    engine = ScriptedEngine(default="no idea")
    result = await Adaptive(probe=2, stages=()).run(Q, SearchContext(engine=engine))
    assert result.decisions == [
        {"stage": 0, "samples": 2, "agreement": 0.0, "votes": 0, "difficulty": 1.0, "action": "stop_last_stage"}
    ]
    assert result.answer is None and result.votes == {}


async def test_the_last_of_several_stages_is_marked() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 41.", "The answer is 42."]))
    result = await Adaptive(probe=2, stages=(4, 6), stop_agreement=0.9).run(Q, SearchContext(engine=engine))
    assert [d["action"] for d in result.decisions] == ["escalate", "escalate", "stop_last_stage"]
    assert [n.kind for n in result.trace.nodes] == ["stage0"] * 2 + ["stage1"] * 2 + ["stage2"] * 2
    assert result.strategy == "adaptive" and len(result.candidates) == 6 and len(result.trace) == 6
    assert result.votes == {"41": 3.0, "42": 3.0} and result.usage.calls == 3 and result.budget_exhausted is False


async def test_a_budget_stop_returns_everything_drawn_so_far() -> None:
    engine = ScriptedEngine(default=ScriptedResponse(["The answer is 41.", "The answer is 42."]))
    result = await Adaptive(probe=2, stages=(4,)).run(Q, SearchContext(engine=engine, budget=Budget(max_calls=1)))
    assert result.decisions[-1]["action"] == "stop_budget" and result.budget_exhausted is True
    assert result.strategy == "adaptive" and len(result.candidates) == 2
    assert len(result.trace) == 4  # the second stage's two traces were cut before they started
    assert result.votes == {"41": 1.0, "42": 1.0} and result.usage.calls == 1


class BreaksFirst(FunctionEngine):
    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        first = not self.calls
        async with contextlib.aclosing(super()._stream(request, meter)) as deltas:
            async for delta in deltas:
                if first:
                    raise EngineStreamBroken("reset")
                yield delta


async def test_broken_streams_are_recorded_among_the_decisions() -> None:
    engine = BreaksFirst(lambda r: "The answer is 42.")
    result = await Adaptive(probe=2, stages=()).run(Q, SearchContext(engine=engine))
    assert [d.get("event", d.get("action")) for d in result.decisions] == ["engine_error", "stop_agreed"]


# -- delegation -----------------------------------------------------------------------------------------------------


def _split_then(heavy_texts: list[str]) -> FunctionEngine:
    """Probe answers split 41/42; the heavy strategy's request (the third) gets ``heavy_texts``."""

    def reply(request: GenerationRequest) -> ScriptedResponse:
        if len(engine.calls) >= 3:
            return ScriptedResponse(heavy_texts)
        return ScriptedResponse(["The answer is 41.", "The answer is 42."])

    engine = FunctionEngine(reply)
    return engine


async def test_delegation_takes_the_heavy_answer_votes_and_traces() -> None:
    engine = _split_then(["The answer is 43."])
    result = await Adaptive(probe=2, stages=(4,), escalate_to=SelfConsistency(n=2)).run(Q, SearchContext(engine=engine))
    assert result.decisions[-1] == {"action": "delegated", "strategy": "self_consistency", "answer": "43"}
    assert result.strategy == "adaptive" and result.answer == "43" and result.votes == {"43": 2.0}
    assert len(result.candidates) == 6 and result.usage.calls == 3 and result.budget_exhausted is False
    grafted = [n for n in result.trace.nodes if n.kind == "self_consistency:sample"]
    assert [(n.status, n.answer, n.text, n.finish_reason) for n in grafted] == [
        ("finished", "43", "The answer is 43.", "stop")
    ] * 2
    assert all(n.tokens == 4 for n in grafted)


async def test_a_heavy_run_without_an_answer_falls_back_to_the_vote() -> None:
    engine = _split_then(["no idea"])
    result = await Adaptive(probe=2, stages=(4,), escalate_to=SelfConsistency(n=2)).run(Q, SearchContext(engine=engine))
    assert result.decisions[-1]["answer"] is None
    assert result.answer == "41"  # the staged vote's leader (a tie: the first seen)
    assert result.votes == {"41": 2.0, "42": 2.0}  # the heavy run has no votes: the staged ones stand
