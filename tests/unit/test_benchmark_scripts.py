"""The pure helpers of the benchmark scripts: the order of compared sides, the dev-split guard, token and
schedule figures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helpers (_paired) from there
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def paired() -> ModuleType:
    return load("_paired")


@pytest.fixture(scope="module")
def tts() -> ModuleType:
    return load("tts_tradeoffs")


@pytest.fixture(scope="module")
def executor() -> ModuleType:
    return load("executor_overhead")


@pytest.fixture(scope="module")
def agents() -> ModuleType:
    return load("parallel_vs_sequential")


def test_alternating_reverses_every_other_round_so_positions_even_out(paired: ModuleType) -> None:
    sides = ["a", "b", "c"]
    assert [paired.alternating(sides, i) for i in range(3)] == [sides, ["c", "b", "a"], sides]
    positions = {s: sum(paired.alternating(sides, i).index(s) for i in range(2)) for s in sides}
    assert set(positions.values()) == {2}
    assert paired.alternating(sides, 1) is not sides and sides == ["a", "b", "c"]


def test_only_a_window_straddling_the_gsm8k_dev_split_is_refused(tts: ModuleType) -> None:
    dev = tts.GSM8K_DEV_OFFSET
    assert not tts.overlaps_dev(0, dev)  # reported problems, up to the split
    assert not tts.overlaps_dev(dev, 100)  # the dev split itself
    assert tts.overlaps_dev(dev - 1, 2)
    assert tts.overlaps_dev(0, dev + 1)


def test_token_reduction_counts_prompts_and_completions(tts: ModuleType) -> None:
    sc = tts.Tally(8, [True, False, True], prompt_tokens=300, completion_tokens=2700, seconds=10.0)
    per_trace = tts.Tally(8, [True, True, False], prompt_tokens=2400, completion_tokens=1800, seconds=15.0)
    vs = tts.against(per_trace, sc)
    assert vs["completion_token_reduction"] == pytest.approx(1 / 3)
    assert vs["total_token_reduction"] == pytest.approx(1 - 4200 / 3000)  # negative: more tokens in all
    assert vs["discordant"] == [1, 1]
    assert vs["accuracy_diff"][0] == 0.0
    assert vs["time_ratio"] == pytest.approx(1.5)
    assert tts.reduction_text(vs["total_token_reduction"]) == "40.0% more"


def test_list_schedule_is_first_come_first_served_within_the_slots(executor: ModuleType) -> None:
    deps: list[list[int]] = [[], [], [], [], [1, 2]]
    latency = {1: 1.0, 2: 2.0, 3: 3.0, 4: 1.0}
    assert executor.list_schedule(deps, latency, 4) == pytest.approx(3.0)  # critical path: 2 then 1, or 3
    # two slots: 1 and 2 start at 0; 3 takes the slot 1 frees at 1 and ends at 4 (4 runs from 2 to 3)
    assert executor.list_schedule(deps, latency, 2) == pytest.approx(4.0)
    assert executor.list_schedule(deps, latency, 1) == pytest.approx(7.0)  # one slot: one after another
    assert executor.critical_path(deps, latency) == pytest.approx(3.0)


def test_shared_prefix_counts_leading_tokens_in_common(agents: ModuleType) -> None:
    assert agents.shared_prefix(["a", "b", "c"], ["a", "b", "d"]) == 2
    assert agents.shared_prefix(["a", "b"], ["a", "b", "c"]) == 2
    assert agents.shared_prefix([], ["a"]) == 0


def test_the_oracle_charges_only_prompt_tokens_no_earlier_prompt_shares(agents: ModuleType) -> None:
    oracle = agents.Oracle([], prefill_delay=0.0)
    assert oracle.uncached(["<system>", "q1"]) == 2
    assert oracle.uncached(["<system>", "q1", "obs"]) == 1  # a ReAct turn re-sends the last prompt and more
    assert oracle.uncached(["<system>", "q2"]) == 1


def test_eval_throughput_full_counts_prompt_and_completion_tokens_per_problem() -> None:
    script = load("eval_throughput")
    figures = {"n": 4, "prompt_tokens": 400, "completion_tokens": 1200, "accuracy": 0.5, "ci": [0.15, 0.85],
               "problems_per_min": 2.0}  # fmt: skip
    cells = script.full_row(figures)
    assert cells[2:5] == ["100", "300", "400"]  # prompt, completion, total per problem
    assert figures["mean_total_tokens"] == 400


def test_speculation_summary_ratios_and_the_rule_pick() -> None:
    script = load("speculation")
    work = script.workloads(16)
    assert [(w.name, w.batch) for w in work] == [("greedy", 1), ("sc8", 8), ("refine", 1), ("judge", 4)]

    def cell(tok_s: float) -> dict[str, float | None]:
        return {"tok_s": tok_s, "acceptance": 0.5, "rss_mb": 100.0, "tokens": 0, "seconds": 0.0}

    rounds = [
        {
            "off": {w.name: cell(10.0) for w in work},
            "ngram": {w.name: cell(12.0 if w.batch == 1 else 8.0) for w in work},
        },
        {
            "off": {w.name: cell(20.0) for w in work},
            "ngram": {w.name: cell(22.0 if w.batch == 1 else 16.0) for w in work},
        },
    ]
    figures = script.summarize(rounds, work, max_batch=2)
    assert figures["greedy"]["ngram"]["speedup"] == pytest.approx(17.0 / 15.0)  # medians over rounds
    assert figures["greedy"]["auto"] == "ngram" and figures["greedy"]["auto_vs_best"] == 1.0
    assert figures["sc8"]["auto"] == "off" and figures["sc8"]["best"] == "off"
    assert figures["judge"]["auto"] == "off"  # 4 sequences: above the rule's max_batch of 2
