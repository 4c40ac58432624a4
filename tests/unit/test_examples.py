"""Every example pipeline runs on a scripted engine (its engine section overridden), and its YAML and its
Python construction give the same result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.engine.testing import ScriptedEngine, ScriptedResponse
from branchwise.orchestrator.pipeline import Pipeline, RunResult
from branchwise.orchestrator.spec import load_spec
from branchwise.orchestrator.tracing import read_trace
from branchwise.search import PDR, DeepConf, SelfConsistency
from branchwise.verifiers.extraction import AnswerExtractor
from branchwise.verifiers.grading import NumericGrader

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ALL = sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_there_are_at_least_six_examples_and_all_validate() -> None:
    assert len(ALL) >= 6
    for name in ALL:
        spec = load_spec(EXAMPLES / name)
        assert spec.engines["policy"].backend == "vllm"
        # the default offline model; the demo's comparison runs on the 0.5B, which `make demo` provisions
        expected = "qwen2.5-coder-0.5b-instruct" if name.startswith("demo-") else "smollm2-135m-instruct"
        assert spec.engines["policy"].model == expected, name


# -- scripted engines (the same script for both doors) -----------------------------------------------------------
SC_TEXTS = [
    "60 mph for 3 hours is 60 * 3 = 180 miles. The answer is 180.",
    "Distance = speed x time = 180. The answer is 180.",
    "60 + 3 = 63. The answer is 63.",
    "The train goes 180 miles. The answer is 180.",
]


def _long(answer: str, words: int = 80) -> str:
    return " ".join(f"w{i}" for i in range(words)) + f" The answer is {answer}."


DEEPCONF_QUEUE: list[Any] = [
    {"texts": [_long("31")] * 4, "logprobs": -0.05},  # the warm-up request (n=4): confident
    *[
        {"texts": [_long("99")], "logprobs": -3.0} if i % 2 == 0 else {"texts": [_long("31")], "logprobs": -0.05}
        for i in range(12)
    ],
]

BEAM_RULES: list[dict[str, Any]] = [
    {"when": "Is the latest step correct", "reply": {"texts": ["Yes"], "logprobs": -0.05}},
    {"when": r"<assistant>.*20 \* 0\.25 = 5", "reply": "The price is 20 - 5 = 15. The answer is 15."},
    {"when": r"<assistant>.*discount is 5", "reply": "So it costs 20 - 5 = 15 dollars. The answer is 15."},
]
BEAM_DEFAULT = ["20 * 0.25 = 5.\n\nmore", "The discount is 5 dollars.\n\nmore"]
PDR_DEFAULT = "15% of 240 is 0.15 * 240 = 36. The answer is 36."


def _response(reply: Any) -> Any:
    if isinstance(reply, dict):
        return ScriptedResponse(tuple(reply["texts"]), logprobs=reply.get("logprobs", -0.1))
    return reply


def _rules_engine(rules: list[dict[str, Any]], default: Any) -> ScriptedEngine:
    import re

    from branchwise.engine.testing import render_prompt

    compiled = [(re.compile(r["when"]), _response(r["reply"])) for r in rules]

    def reply(request: Any) -> Any:
        prompt = render_prompt(request)
        for pattern, answer in compiled:
            if pattern.search(prompt):
                return answer
        return default

    return ScriptedEngine(default=reply)


# example -> (engine override, Python construction, question, check)
Case = tuple[dict[str, Any], Callable[[], Pipeline], str, Callable[[RunResult], None]]


def _sc_python() -> Pipeline:
    return Pipeline(
        ScriptedEngine(default=SC_TEXTS),
        SelfConsistency(n=8, voting="majority"),
        budget=Budget(max_tokens=20000, wall_clock_s=300),
        extractor=AnswerExtractor(["boxed", "answer_is", "gsm8k", "last_number"]),
        grader=NumericGrader(),
        temperature=0.7,
        max_tokens=256,
    )


def _deepconf_python() -> Pipeline:
    return Pipeline(
        ScriptedEngine([_response(r) for r in DEEPCONF_QUEUE]),
        DeepConf(n=16, warmup=4, keep=0.9, window=64, consensus=0.95, concurrency=8),
        budget=Budget(max_tokens=40000, wall_clock_s=600),
        max_tokens=256,
    )


def _beam_python() -> Pipeline:
    from branchwise.search.beam import Beam
    from branchwise.verifiers.step_scorers import GenerativeJudgeScorer

    strategy = Beam(
        GenerativeJudgeScorer(top_logprobs=20),
        beam_width=2,
        expansions=2,
        max_depth=4,
        step_tokens=64,
        aggregate="last",
        selection="best",
    )
    return Pipeline(
        _rules_engine(BEAM_RULES, BEAM_DEFAULT),
        strategy,
        budget={"max_tokens": 40000, "wall_clock_s": 600},
        temperature=0.8,
        max_tokens=256,
    )


def _pdr_python() -> Pipeline:
    return Pipeline(
        ScriptedEngine(default=PDR_DEFAULT),
        PDR((4, 2), workspace_tokens=128, distill="summary", final="refine", draft_excerpt_tokens=160),
        budget=Budget(max_tokens=30000, wall_clock_s=600),
        max_tokens=192,
    )


def _check_sc(r: RunResult) -> None:
    assert r.answer == "180"
    assert r.result.votes == {"180": 6.0, "63": 2.0}


def _check_deepconf(r: RunResult) -> None:
    assert r.answer == "31"
    assert r.pruned >= 1


def _check_beam(r: RunResult) -> None:
    assert r.answer == "15"
    assert r.pruned >= 1  # duplicate sibling steps
    assert any(n.scores.get("step") is not None for n in r.result.trace.nodes)


def _check_pdr(r: RunResult) -> None:
    assert r.answer == "36"
    assert [n.kind for n in r.result.trace.nodes].count("draft") >= 6


CASES: dict[str, Case] = {
    "sc-math.yaml": (
        {"backend": "test", "default": SC_TEXTS},
        _sc_python,
        "A train goes 60 mph for 3 hours.",
        _check_sc,
    ),
    "deepconf-early-stop.yaml": (
        {"backend": "test", "replies": DEEPCONF_QUEUE},
        _deepconf_python,
        "How many eggs are left?",
        _check_deepconf,
    ),
    "beam-judge.yaml": (
        {"backend": "test", "rules": BEAM_RULES, "default": BEAM_DEFAULT},
        _beam_python,
        "A shirt costs 20 dollars and is 25% off. What is the price now?",
        _check_beam,
    ),
    "pdr.yaml": ({"backend": "test", "default": PDR_DEFAULT}, _pdr_python, "What is 15% of 240?", _check_pdr),
}


def _fingerprint(r: RunResult) -> dict[str, Any]:
    return {
        "answer": r.answer,
        "votes": r.result.votes,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "calls": r.usage.calls,
        "pruned": r.pruned,
        "traces": [(n.kind, n.status, n.tokens, n.answer) for n in r.result.trace.nodes],
    }


@pytest.mark.parametrize("name", sorted(CASES))
async def test_example_yaml_and_python_agree(name: str, tmp_path: Path) -> None:
    engine, python, question, check = CASES[name]
    trace = tmp_path / "trace.jsonl"
    from_yaml = Pipeline.from_yaml(
        EXAMPLES / name, overrides={"engine": engine, "outputs.trace": str(trace), "outputs.progress": "off"}
    )
    async with from_yaml:
        yaml_result = await from_yaml.run(question)
    async with python() as from_python:
        python_result = await from_python.run(question)
    check(yaml_result)
    assert _fingerprint(yaml_result) == _fingerprint(python_result)
    recorded = read_trace(trace)
    assert recorded.header["spec"]["name"] == name.removesuffix(".yaml")
    assert recorded.run_end is not None and recorded.run_end.data["answer"] == yaml_result.answer


PLANNER_EXAMPLES = ["compiler-corpus.yaml", "decompose-qa.yaml"]

COMPILER_PLAN = (
    '1. retrieve("Aldermoor founded")\n'
    '2. retrieve("Harlow bridge completed")\n'
    '3. think("How many years passed between the founding of Aldermoor ($1) and the Harlow bridge ($2)?")\n'
    "4. join()\n<END_OF_PLAN>"
)
AGENT_RULES: dict[str, list[dict[str, Any]]] = {
    "compiler-corpus.yaml": [
        {"when": "You are a planner", "reply": COMPILER_PLAN},
        {"when": "Results of the plan", "reply": '{"action": "finish", "answer": "146"}'},
        {"when": "Solve it step by step", "reply": "1788 - 1642 = 146. The answer is 146."},
    ],
    "decompose-qa.yaml": [
        {
            "when": "Split the question into sub-questions",
            "reply": '{"independent": ["Harlow bridge", "Aldermoor library"], "dependent": ["Which is older?"]}',
        },
        {"when": "Solve it step by step", "reply": "1788 is before 1851. The answer is the Harlow bridge."},
    ],
}
QUESTIONS = {
    "compiler-corpus.yaml": "How many years passed between the founding of Aldermoor and the Harlow bridge?",
    "decompose-qa.yaml": "Which is older, the Harlow bridge or the Aldermoor library?",
}
EXPECTED = {"compiler-corpus.yaml": "146", "decompose-qa.yaml": "the Harlow bridge"}


def _agent_python(name: str) -> Pipeline:
    from branchwise.executors.tools import ToolRegistry, default_tools
    from branchwise.planners import get_planner
    from branchwise.verifiers.grading import QAGrader

    everything = default_tools(corpus=EXAMPLES / "corpus")
    engine = _rules_engine(AGENT_RULES[name], "unexpected prompt")
    if name == "compiler-corpus.yaml":
        return Pipeline(
            engine,
            SelfConsistency(n=4),
            planner=get_planner("llmcompiler"),
            tools=ToolRegistry([everything.get("retrieve"), everything.get("calculator")]),
            budget=Budget(max_tokens=50000, max_calls=40, wall_clock_s=600),
            max_tokens=192,
            concurrency=4,
            max_replans=1,
        )
    return Pipeline(
        engine,
        SelfConsistency(n=4),
        planner=get_planner("decompose"),
        tools=ToolRegistry([everything.get("retrieve")]),
        budget=Budget(max_tokens=50000, max_calls=40, wall_clock_s=600),
        grader=QAGrader(),
        max_tokens=160,
        concurrency=4,
        max_replans=0,
    )


def _agent_fingerprint(r: RunResult) -> dict[str, Any]:
    return {
        "answer": r.answer,
        "prompt_tokens": r.usage.prompt_tokens,
        "completion_tokens": r.usage.completion_tokens,
        "calls": r.usage.calls,
        "nodes": [{i: (n.kind, n.status, n.output) for i, n in nodes.items()} for nodes in r.result.nodes],
    }


@pytest.mark.parametrize("name", PLANNER_EXAMPLES)
async def test_planner_example_yaml_and_python_agree(name: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    engine = {"backend": "test", "rules": AGENT_RULES[name], "default": "unexpected prompt"}
    from_yaml = Pipeline.from_yaml(
        EXAMPLES / name, overrides={"engine": engine, "outputs.trace": str(trace), "outputs.progress": "off"}
    )
    async with from_yaml:
        yaml_result = await from_yaml.run(QUESTIONS[name])
    async with _agent_python(name) as from_python:
        python_result = await from_python.run(QUESTIONS[name])
    assert yaml_result.answer == EXPECTED[name]
    assert _agent_fingerprint(yaml_result) == _agent_fingerprint(python_result)
    retrieved = [n.output for n in yaml_result.result.nodes[0].values() if n.name == "retrieve"]
    assert len(retrieved) == 2 and all(retrieved)
    recorded = read_trace(trace)
    kinds = {e.kind for e in recorded.events}
    assert {"plan_node", "node_start", "node_end", "plan", "trace_start", "trace_end", "engine_call"} <= kinds
    # every reasoning node's samples are traces of their own tree
    assert len({e.data["tree"] for e in recorded.of_kind("trace_start")}) >= 1


@pytest.mark.parametrize("name", PLANNER_EXAMPLES)
def test_planner_examples_name_their_corpus(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert spec.planner is not None
    corpus = next(t.options["corpus"] for t in spec.tools if t.name == "retrieve")
    assert sorted((EXAMPLES / corpus).glob("*.md"))
