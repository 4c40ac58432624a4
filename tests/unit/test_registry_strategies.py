"""Strategies register themselves: a strategy defined here runs from YAML, with its object parameter filled from the
spec's verifiers section, its bounds in the JSON schema and its typos answered with "did you mean".

Nothing in branchwise.orchestrator names this strategy: everything comes from its `register_strategy` declaration.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from branchwise.errors import ConfigError, SpecError, UnknownNameError
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.spec import load_spec
from branchwise.orchestrator.spec_schema import pipeline_json_schema
from branchwise.orchestrator.tracing import read_trace
from branchwise.search import (
    Component,
    NestedStrategy,
    Result,
    SearchContext,
    Strategy,
    TraceTree,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_info,
)
from branchwise.search.sampling import candidates_of, sample
from branchwise.verifiers.step_scorers import StepScorer


@register_strategy(
    "scored_pick_test",
    maxima={"n": 16},
    sources={"scorer": Component("step_scorer")},
    fan_out=lambda s: s.n,
)
class ScoredPick(Strategy):
    """Sample n solutions and keep the one the step scorer rates highest (each solution scored as one step).

    Args:
        n: solutions sampled.
        scorer: rates a whole solution.
        tag: written into the result's decisions.
    """

    def __init__(self, n: int = 2, *, scorer: StepScorer | None = None, tag: str = "picked") -> None:
        if n < 1:
            raise ConfigError(f"scored_pick_test: n must be >= 1, got {n}")
        self.n, self.scorer, self.tag = n, scorer, tag

    async def run(self, problem: str, ctx: SearchContext) -> Result:
        assert self.scorer is not None, "the pipeline hands over the spec's step scorer"
        tree = TraceTree()
        traces, exhausted = await sample(ctx, problem, tree, n=self.n)
        candidates = candidates_of(traces)
        scores = [await self.scorer.score_last(problem, [c.text.strip()]) for c in candidates]
        best = max(range(len(candidates)), key=lambda i: scores[i])
        answer = candidates[best].answer
        votes = {answer: scores[best]} if answer is not None else {}
        decisions = [{"tag": self.tag, "scores": scores}]
        return Result(self.name, answer, candidates, votes, tree, ctx.usage(), exhausted, decisions)


SPEC = """\
engine: {backend: test, default: ["The answer is 1.", "The answer is 2.", "The answer is 3."]}
thought: {strategy: scored_pick_test, n: 3, tag: from-yaml}
verifiers:
  step_scorer:
    kind: scripted
    scores: {"The answer is 1.": 0.1, "The answer is 2.": 0.9, "The answer is 3.": 0.4}
outputs: {otel: false}
"""


async def test_a_strategy_defined_here_runs_from_yaml_with_its_component(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    async with Pipeline.from_yaml(SPEC, overrides={"outputs.trace": str(trace)}) as pipeline:
        result = await pipeline.run("Which number?")
    assert result.answer == "2"  # the scripted step scorer's favourite, not the first or the majority
    assert isinstance(result.result, Result) and result.result.decisions[0]["tag"] == "from-yaml"
    start = read_trace(trace).of_kind("run_start")[0]
    assert start.data["strategy"] == "scored_pick_test" and start.data["params"]["n"] == 3
    assert start.data["params"]["scorer"] == "scripted"  # the object, recorded by name


def test_its_parameters_are_checked_from_the_declaration() -> None:
    assert "scored_pick_test" in available_strategies()
    with pytest.raises(SpecError, match="Did you mean 'tag'") as info:
        load_spec(SPEC.replace("tag: from-yaml", "tga: from-yaml"))
    assert info.value.path == "thought.tga" and info.value.line == 2
    with pytest.raises(SpecError, match="at most 16") as info:
        load_spec(SPEC.replace("n: 3", "n: 17"))
    assert info.value.path == "thought.n"
    with pytest.raises(SpecError, match=r"verifiers\.step_scorer") as info:
        load_spec(SPEC.replace("tag: from-yaml", "scorer: mine"))
    assert info.value.path == "thought.scorer"
    with pytest.raises(SpecError, match="n must be >= 1"):  # the constructor's own check, at load time
        load_spec(SPEC.replace("n: 3", "n: 0"))


def test_its_schema_branch_lists_its_plain_parameters_with_bounds() -> None:
    thought = pipeline_json_schema()["$defs"]["ThoughtSpec"]
    assert "scored_pick_test" in thought["properties"]["strategy"]["enum"]
    (branch,) = [
        b for b in thought["allOf"] if b["if"].get("properties", {}).get("strategy") == {"const": "scored_pick_test"}
    ]
    props = branch["then"]["properties"]
    assert props["n"]["maximum"] == 16 and props["n"]["default"] == 2
    assert props["tag"]["type"] == "string" and props["tag"]["description"] == "written into the result's decisions."
    assert "scorer" not in props  # filled from verifiers.step_scorer, never written under thought


def test_get_strategy_checks_types_and_bounds() -> None:
    assert isinstance(get_strategy("scored_pick_test", n=4), ScoredPick)
    with pytest.raises(ConfigError, match="at most 16"):
        get_strategy("scored_pick_test", n=17)
    with pytest.raises(ConfigError, match="boolean"):
        get_strategy("scored_pick_test", n=True)
    with pytest.raises(UnknownNameError, match="Did you mean 'scored_pick_test'"):
        get_strategy("scored_pik_test")
    with pytest.raises(UnknownNameError, match="tag"):
        get_strategy("scored_pick_test", tga="x")


def test_registration_refuses_incomplete_declarations() -> None:
    class Unbounded(Strategy):
        name = "unbounded_test"

        def __init__(self, n: int = 1) -> None:
            self.n = n

        async def run(self, problem: str, ctx: SearchContext) -> Result:
            raise NotImplementedError

    with pytest.raises(ConfigError, match="'n' is a count and needs an upper bound"):
        register_strategy()(Unbounded)
    with pytest.raises(ConfigError, match="'width' is not a constructor parameter"):
        register_strategy(maxima={"n": 4, "width": 4})(Unbounded)
    with pytest.raises(ConfigError, match="registered as 'self_consistency'"):
        register_strategy("self_consistency", maxima={"n": 4})(Unbounded)
    Unbounded.name = "self_consistency"
    with pytest.raises(ConfigError, match=r"already registered by branchwise\.search\.self_consistency"):
        register_strategy(maxima={"n": 4})(Unbounded)
    assert "unbounded_test" not in available_strategies()
    assert strategy_info("self_consistency").cls.__module__ == "branchwise.search.self_consistency"


def test_every_registered_strategy_declares_a_usable_schema_and_bounds() -> None:
    for name in available_strategies():
        info = strategy_info(name)
        assert info.cls.name == name
        for param in info.params.values():
            if param.source is None:
                assert param.json_schema() is not None  # a validator and a schema exist for every plain type
                if param.default is not inspect.Parameter.empty:
                    assert param.check(param.default) is not None or param.default is None
            else:
                assert isinstance(param.source, (Component, NestedStrategy))
        assert info.fan_out is not None, f"{name} declares no fan-out"
        assert info.fan_out(info.cls()) >= 1
        largest = {k: p.maximum for k, p in info.params.items() if p.maximum is not None and p.annotation is int}
        try:
            at_the_bounds = info.cls(**largest)
        except ConfigError:
            continue  # the counts constrain each other (adaptive's probe below its stages)
        info.check_bounds(at_the_bounds)  # what the constructor derives from them stays within bounds too
