"""benchmarks/bank_limits.py: the vote, the cannot-lose stopping point and the figures it derives from a bank."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bank_limits.py"


@pytest.fixture(scope="module")
def limits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bank_limits", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bank_limits"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_majority_ties_go_to_the_first_seen_and_no_answer_never_wins(limits: ModuleType) -> None:
    assert limits.majority([1, 0, 0, 1]) == 1
    assert limits.majority([-1, -1, 2]) == 2
    assert limits.majority([-1, -1]) == -1


def test_exact_stop_is_the_first_point_where_the_leader_cannot_lose(limits: ModuleType) -> None:
    assert limits.exact_stop([0, 0, 0, 0, 1]) == 3  # 3 > 0 + 2 left
    assert limits.exact_stop([0, 1, 0, 1, 0]) == 5  # never decided early
    assert limits.exact_stop([0, -1, 0, 0]) == 3  # no answer counts for nobody: 2 > 0 + 1
    assert limits.exact_stop([0, 0, 0]) == 2  # 2 > 0 + 1


def test_analyse_counts_tokens_and_accuracy_per_rule(limits: ModuleType) -> None:
    unanimous = limits.BankedRun("p1", 10, (0, 0, 0, 0), (True,), (5, 5, 5, 5))
    split = limits.BankedRun("p2", 10, (0, 1, 0, 1), (False, True), (7, 7, 7, 7))
    figures = limits.analyse([unanimous, split], orders=50, target=0.6)
    sc = figures["sc"]
    assert sc[4]["tokens"] == pytest.approx((10 + 20) + (10 + 28))  # one request per problem: the prompt once
    assert sc[1]["tokens"] == pytest.approx((10 + 5) + (10 + 7))
    # unanimous: always right; split: a tie, won by whichever answer comes first (right half the time)
    assert 0.6 < sc[4]["accuracy"] < 0.9 and 0.6 < sc[1]["accuracy"] < 0.9
    exact = figures["exact_stop"]
    # the unanimous problem stops after 3 traces (3 > 0 + 1); the split one draws all 4 in any order
    assert exact["traces_per_problem"] == pytest.approx((3 + 4) / 2)
    assert exact["tokens"] == pytest.approx((3 * 10 + 15) + (4 * 10 + 28))
    assert exact["tokens_prompt_once"] == pytest.approx((10 + 15) + (10 + 28))
    assert figures["agreement_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert figures["n"] == 4 and figures["k_at_target"] is None  # SC@1 costs 32 of 68 tokens: more than 40%
    assert limits.analyse([unanimous, split], orders=5, target=0.5)["k_at_target"] == 1


def test_a_weighted_vote_counts_each_trace_by_its_confidence(limits: ModuleType) -> None:
    assert limits.majority([0, 1, 1], [5.0, 2.0, 2.0]) == 0  # one confident vote beats two doubtful ones
    assert limits.majority([0, 1, 1], [3.0, 2.0, 2.0]) == 1
    assert limits.majority([0, 1], [0.0, 0.0]) == 0  # zero weight still answers; ties go to the first seen
    assert limits.majority([-1, 1], [9.0, 1.0]) == 1


def test_paired_figures_compare_each_run_of_a_rule_with_sc_at_n(limits: ModuleType) -> None:
    # two traces with the right answer: every rule is right on every problem, so no run differs from SC@N
    right = limits.BankedRun("p1", 10, (0, 0), (True,), (5, 5), (1.0, 1.0))
    figures = limits.analyse([right] * 20, orders=10, target=0.6, margin=0.02)
    for kind in ("sc", "weighted"):
        row = figures[kind][2]
        assert row["accuracy_diff"] == 0.0 and row["ci_low_median"] < 0.0 < row["ci_high_median"]
    # a rule that loses every problem SC@N wins: a difference of -1 whose interval never lies above -2 points
    confident_wrong = limits.BankedRun("p2", 10, (1, 0, 0), (True, False), (5, 5, 5), (9.0, 1.0, 1.0))
    figures = limits.analyse([confident_wrong] * 20, orders=10, target=0.6)
    # the plain majority of all three is cluster 0 (right); the weighted vote picks cluster 1 (9 > 1 + 1)
    assert figures["sc"][3]["accuracy_diff"] == 0.0
    assert figures["weighted"][3]["accuracy"] == 0.0
    assert figures["weighted"][3]["accuracy_diff"] == -1.0 and figures["weighted"][3]["share_above_margin"] == 0.0


def test_without_logprobs_there_is_no_weighted_vote(limits: ModuleType) -> None:
    plain = limits.BankedRun("p1", 10, (0, 0), (True,), (5, 5))
    assert limits.analyse([plain], orders=3, target=0.6)["weighted"] is None


def test_chosen_vote_sizes_always_include_n_and_stay_within_the_bank(limits: ModuleType) -> None:
    run = limits.BankedRun("p1", 10, (0, 0, 1), (True, False), (5, 5, 5))
    assert sorted(limits.analyse([run], orders=2, target=0.6, ks=[2])["sc"]) == [2, 3]
    with pytest.raises(ValueError, match="between 1 and 3"):
        limits.analyse([run], orders=2, target=0.6, ks=[4])


def test_the_selector_ceiling_is_right_whenever_any_of_the_first_k_traces_is(limits: ModuleType) -> None:
    # one right trace of four: a vote of four loses it (the wrong answer has three), a perfect selector finds it
    lone = limits.BankedRun("p1", 10, (0, 0, 1, 0), (False, True), (5, 5, 5, 5))
    none = limits.BankedRun("p2", 10, (0, -1, 0, -1), (False,), (5, 5, 5, 5))
    figures = limits.analyse([lone, none], orders=400, target=0.6)
    oracle, sc = figures["oracle"], figures["sc"]
    assert oracle[4]["accuracy"] == pytest.approx(0.5) and sc[4]["accuracy"] == 0.0  # p2 has no right trace at all
    assert oracle[1]["accuracy"] == pytest.approx(0.5 * 1 / 4, abs=0.04)  # p1's right trace comes first 1 time in 4
    assert oracle[2]["accuracy"] == pytest.approx(0.5 * 2 / 4, abs=0.05)
    assert oracle[4]["tokens"] == sc[4]["tokens"]  # the selector's own tokens are not counted
    assert oracle[4]["accuracy_diff"] == pytest.approx(0.5)  # against SC@4, which gets neither problem
