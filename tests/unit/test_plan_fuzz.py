"""Fuzzing the LLMCompiler plan parser, whole and streamed (hypothesis; profiles in tests/_hypothesis_profiles.py).

Properties: any planner output ends in a validated `Plan` or a `PlanError`, in bounded time; and feeding it in
arbitrary pieces (as tokens stream in), with each node checked as its line completes like the planner does, ends
in the same plan or fails with a `PlanError` too.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tool_fakes import FakeRegistry

from branchwise.errors import PlanError
from branchwise.planners.llmcompiler import END_OF_PLAN, PlanParser, parse_plan
from branchwise.planners.plan import Plan, check_node

pytestmark = pytest.mark.timeout(120)

PER_INPUT_S = 1.0  # generous bound on one input (shared machines); typical: a few milliseconds


def retrieve(query: str, k: int = 3) -> str:
    return query


def calculator(expression: str) -> str:
    return expression


TOOLS = FakeRegistry(retrieve, calculator)

# -- strategies ---------------------------------------------------------------------------------------------------
numbers = st.one_of(
    st.integers(min_value=0, max_value=14).map(str),
    st.text(alphabet="0123456789", min_size=1, max_size=6000),  # past int()'s digit limit
    st.sampled_from(["٣", "1.5", "-1", ""]),
)
refs = st.builds(
    lambda form, n, field: form.format(n=n) + field,
    st.sampled_from(["${n}", "${{{n}}}", "$ {n}", "$"]),
    numbers,
    st.sampled_from(["", ".field", ".0", ".a.b", "."]),
)
arguments = st.one_of(
    refs,
    refs.map(lambda r: f'"{r} and more"'),
    st.sampled_from(
        ['"Paris"', "'x'", "3", "k=2", "query=$1", "true", "null", "[1, 'a']", "{'a': 1}", "x +", "((", "**kw"]
    ),
    st.text(max_size=10),
)
calls = st.builds(
    lambda name, args, close: f"{name}({', '.join(args)}{')' if close else ''}",
    st.sampled_from(["retrieve", "calculator", "think", "join", "retreive", "search_web", "", "1x"]),
    st.lists(arguments, max_size=3),
    st.booleans(),
)
task_lines = st.builds(
    lambda bullet, number, sep, call, tail: f"{bullet}{number}{sep} {call}{tail}",
    st.sampled_from(["", "- ", "* ", "Step ", "task "]),
    numbers,
    st.sampled_from([".", ")", ":", ""]),
    calls,
    st.sampled_from(["", ";", END_OF_PLAN, f" {END_OF_PLAN} thanks", " # note"]),
)
other_lines = st.one_of(
    st.sampled_from(["", "Thought: think first", "```", "```python", END_OF_PLAN, "Here is the plan:", "join()"]),
    calls,
    st.text(max_size=30),
)
plan_texts = st.lists(st.one_of(task_lines, task_lines, other_lines), max_size=12).map("\n".join)


@st.composite
def pieces(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=10)))
    return [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


# -- helpers ------------------------------------------------------------------------------------------------------
def whole(text: str) -> Plan | PlanError:
    try:
        return parse_plan(text, TOOLS)
    except PlanError as err:
        return err


def streamed(chunks: list[str]) -> Plan | PlanError:
    """As `LLMCompilerPlanner.plan` does it: nodes checked as their lines complete, the whole plan at the end."""
    parser = PlanParser(TOOLS)
    seen: set[int] = set()
    try:
        for chunk in chunks:
            for node in parser.feed(chunk):
                check_node(node, seen, TOOLS)
                seen.add(node.id)
        for node in parser.finish():
            check_node(node, seen, TOOLS)
            seen.add(node.id)
        return parser.plan().validate(TOOLS)
    except PlanError as err:
        return err


# -- properties ---------------------------------------------------------------------------------------------------
@given(text=st.one_of(plan_texts, st.text(max_size=200)))
@example(text="9" * 5000 + '. retrieve("a")\n' + "1. join()")
@example(text='1. retrieve("a")\n2. calculator($' + "9" * 5000 + ")\n3. join()")
@example(text="1. retrieve(" + "[" * 300 + ")\n2. join()")
@example(text="1. join()" + END_OF_PLAN)
def test_any_planner_output_is_a_valid_plan_or_a_plan_error(text: str) -> None:
    started = time.perf_counter()
    outcome = whole(text)
    assert time.perf_counter() - started < PER_INPUT_S
    if isinstance(outcome, Plan):
        assert outcome.nodes and outcome.nodes[-1].kind == "join"
        assert all(r.kind and r.detail for r in outcome.repairs)


@given(data=st.data(), text=plan_texts)
def test_streamed_parsing_ends_like_whole_parsing(data: Any, text: str) -> None:
    expected = whole(text)
    got = streamed(data.draw(pieces(text)))
    if isinstance(expected, Plan):
        assert isinstance(got, Plan), got
        assert got.describe() == expected.describe()
        assert [r.to_dict() for r in got.repairs] == [r.to_dict() for r in expected.repairs]
    else:
        assert isinstance(got, PlanError)
