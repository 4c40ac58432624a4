"""GenerativeVerifier (GenRM style) on scripted engines: verdict parsing, scoring, one request of n=k, budget."""

from __future__ import annotations

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse, render_prompt
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError
from branchwise.search.base import Candidate, SearchContext
from branchwise.search.best_of_n import BestOfN
from branchwise.verifiers.genrm import GenerativeVerifier, VerificationResult, parse_verdict

Q = "What is 6 x 7?"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6 x 7 is 42, correct. Verdict: Yes", True),
        ("The last step is wrong.\nVerdict: No.", False),
        ("**Verdict:** yes", True),
        ("Verdict - NO", False),
        ("Verdict: 'Yes'", True),
        ("At first: Verdict: No. On reflection it is right. Verdict: Yes", True),  # the last one counts
        ("Verdict: Not sure", None),
        ("Yes, this looks right.", None),
        ("", None),
    ],
)
def test_parse_verdict(text: str, expected: bool | None) -> None:
    assert parse_verdict(text) is expected


async def test_score_is_fraction_of_yes_in_one_request() -> None:
    rationales = [
        "6 x 7 = 42. Verdict: Yes",
        "The product is wrong. Verdict: No",
        "Looks right. **Verdict:** yes",
        "I am not able to tell.",  # unparseable: counts as No
    ]
    engine = ScriptedEngine([ScriptedResponse(rationales)])
    verifier = GenerativeVerifier(engine, k=4, temperature=0.7, max_tokens=64)
    result = await verifier.score(Q, "6 x 7 = 42. The answer is 42.")
    assert isinstance(result, VerificationResult)
    assert result.score == 0.5
    assert result.verdicts == (True, False, True, None)
    assert result.unparsed == 1 and result.yes == 2 and result.finished == 4
    assert result.rationales[1].startswith("The product is wrong")
    assert len(engine.calls) == 1
    call = engine.calls[0]
    assert call.n == 4 and call.temperature == 0.7 and call.max_tokens == 64
    prompt = render_prompt(call)
    assert Q in prompt and "The answer is 42." in prompt and "Verdict: Yes" in prompt
    assert result.usage is not None
    assert result.usage.num_samples == 4
    assert result.usage.completion_tokens == sum(len(r.split()) for r in rationales)
    assert not result.budget_exhausted
    engine.assert_complete()


async def test_braces_in_problem_and_solution_are_left_alone() -> None:
    engine = ScriptedEngine(["Verdict: Yes"])
    verifier = GenerativeVerifier(engine, k=1, temperature=0.0)
    result = await verifier.score("Simplify {solution} and \\frac{1}{2}.", "It is \\boxed{\\frac{1}{2}} {problem}")
    prompt = render_prompt(engine.calls[0])
    assert "Simplify {solution} and \\frac{1}{2}." in prompt
    assert "\\boxed{\\frac{1}{2}} {problem}" in prompt
    assert result.score == 1.0


async def test_adapter_ranks_best_of_n_candidates() -> None:
    def reply(request: GenerationRequest) -> ScriptedResponse:
        prompt = render_prompt(request)
        if "Proposed solution" in prompt:
            if "The answer is 42." in prompt:
                return ScriptedResponse(["Correct. Verdict: Yes", "Verdict: Yes", "Verdict: No"])
            return ScriptedResponse(["Wrong. Verdict: No"])
        return ScriptedResponse(["The answer is 40.", "The answer is 42.", "The answer is 41."])

    engine = FunctionEngine(reply)
    verifier = GenerativeVerifier(engine, k=3)
    result = await BestOfN(n=3, scorer=verifier).run(Q, SearchContext(engine=engine))
    assert result.answer == "42"
    assert [c.score for c in result.candidates] == [0.0, pytest.approx(2 / 3), 0.0]
    verifications = [c for c in engine.calls if "Proposed solution" in render_prompt(c)]
    assert len(verifications) == 3 and all(c.n == 3 for c in verifications)
    direct = await verifier(Q, Candidate("42", "The answer is 42.", trace_id=0, tokens=4))
    assert direct == pytest.approx(2 / 3)


async def test_budget_is_charged_and_exhaustion_is_marked() -> None:
    engine = ScriptedEngine([], default="Verdict: Yes")
    budget = Budget(max_calls=1)
    verifier = GenerativeVerifier(engine, k=2, budget=budget)
    first = await verifier.score(Q, "The answer is 42.")
    assert first.score == 1.0
    assert budget.usage.calls == 1 and budget.usage.completion_tokens == 4
    second = await verifier.score(Q, "The answer is 42.")
    assert second.budget_exhausted
    assert second.score == 0.0 and second.verdicts == (None, None) and second.finished == 0
    assert len(engine.calls) == 1


async def test_budget_cut_mid_stream_scores_finished_rationales() -> None:
    long = " ".join(["hmm"] * 200) + " Verdict: No"
    # token_delay simulates decoding time: the short rationale ends after a few ms, the long one would take 0.4 s
    engine = ScriptedEngine([ScriptedResponse(["Fine. Verdict: Yes", long], token_delay=0.002)])
    budget = Budget(wall_clock_s=0.15)  # the deadline falls inside the long rationale's stream
    verifier = GenerativeVerifier(engine, k=2, max_tokens=300, budget=budget)
    result = await verifier.score(Q, "The answer is 42.")
    assert result.budget_exhausted
    assert result.finish_reasons == ("stop", "abort")
    assert result.verdicts == (True, None)
    assert result.score == 1.0  # over the one rationale that finished
    assert result.unparsed == 0
    assert budget.usage.aborted_tokens > 0  # cut inside the stream, not refused


def test_validation() -> None:
    engine = ScriptedEngine([])
    with pytest.raises(ConfigError):
        GenerativeVerifier(engine, k=0)
    with pytest.raises(ConfigError):
        GenerativeVerifier(engine, k=4, temperature=0.0)
    with pytest.raises(ConfigError):
        GenerativeVerifier(engine, prompt="Is {solution} right?")
    with pytest.raises(ConfigError):
        GenerativeVerifier(engine, max_tokens=0)
    with pytest.raises(ConfigError):
        GenerativeVerifier("not an engine")  # type: ignore[arg-type]
