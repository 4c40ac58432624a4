"""Fuzz (issue 12): answer extraction and grading, the calculator, and tool-argument validation take any input.

Each property: the call returns its documented type or raises only the documented error (`ConfigError` for a
bad gold answer, `ToolError` / `ToolArgumentError` for tools), within a bounded time per input. The number of
examples comes from the hypothesis profile (``short`` by default, ``HYPOTHESIS_PROFILE=long`` for a longer run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Annotated, Any

import pydantic
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from branchwise.errors import ConfigError, ToolArgumentError, ToolError
from branchwise.executors.calculator import MAX_EXPRESSION_LENGTH, calculate
from branchwise.executors.registry import Tool
from branchwise.verifiers import (
    AnswerExtractor,
    GradeResult,
    MathGrader,
    NumericGrader,
    QAGrader,
    YesNoGrader,
    close_default_pool,
    extract_all_boxed,
    extract_answer_is,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    normalize_number,
    parse_number,
)

pytestmark = pytest.mark.timeout(300)

PER_INPUT_S = 0.5  # generous for a shared machine; a pathological (super-linear) input takes far longer

# Text that looks like model output: numbers, LaTeX, answer phrases, punctuation, and arbitrary unicode.
pieces = st.sampled_from(
    [
        "The answer is ", "\\boxed{", "}", "{", "####", " ", "\n", "$", "\\frac{", "}{", "1,000", "3/4", "-2.5",
        "1e-3", "50%", "x = ", "(", ")", "[", "]", "\\dfrac", "\\text{", "yes", "No.", "(A)", "B)", ".", "St.",
        "Dr. J. R. R.", "0", "7", "99999999999999999999", "\\sqrt{2}", "\\pi", "**", "Final Answer:",
    ]
)  # fmt: skip
model_text = st.one_of(st.text(max_size=300), st.lists(pieces | st.text(max_size=5), max_size=60).map("".join))


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


# -- answer extraction ------------------------------------------------------------------------------------------
@given(text=model_text)
def test_extraction_returns_text_or_none_quickly(text: str) -> None:
    for rule in (extract_boxed, extract_gsm8k, extract_answer_is, extract_last_number, normalize_number):
        value, seconds = timed(rule, text)
        assert value is None or isinstance(value, str)
        assert seconds < PER_INPUT_S, (rule.__name__, text)
    boxed, seconds = timed(extract_all_boxed, text)
    assert isinstance(boxed, list) and all(isinstance(b, str) for b in boxed) and seconds < PER_INPUT_S
    number, seconds = timed(parse_number, text)
    assert (number is None or isinstance(number, Fraction)) and seconds < PER_INPUT_S
    answer, seconds = timed(AnswerExtractor().extract, text)
    assert (answer is None or isinstance(answer, str)) and seconds < PER_INPUT_S


@given(depth=st.integers(1, 3000), inner=st.text(max_size=20))
def test_deeply_nested_braces_are_handled_without_recursion_or_blowup(depth: int, inner: str) -> None:
    text = "\\boxed{" + "{" * depth + inner + "}" * depth + "}"
    value, seconds = timed(extract_boxed, text)
    assert value is None or isinstance(value, str)
    assert seconds < PER_INPUT_S


# -- grading -----------------------------------------------------------------------------------------------------
golds = st.one_of(model_text, st.lists(model_text, min_size=1, max_size=3))


@given(prediction=st.none() | model_text, gold=golds)
def test_cheap_graders_return_a_verdict_or_a_config_error(prediction: str | None, gold: str | list[str]) -> None:
    for grader in (NumericGrader(), QAGrader(), QAGrader(f1_threshold=0.5), YesNoGrader()):
        started = time.perf_counter()
        try:
            result = grader.grade_sync(prediction, gold)
        except ConfigError:  # documented: a gold the grader cannot read (e.g. not yes/no for YesNoGrader)
            assert isinstance(grader, YesNoGrader)
            continue
        assert isinstance(result, GradeResult) and 0.0 <= result.score <= 1.0
        assert time.perf_counter() - started < PER_INPUT_S
        if prediction is None:
            assert not result.correct


@given(a=model_text, b=model_text)
def test_equivalence_never_raises(a: str, b: str) -> None:
    for grader in (NumericGrader(), QAGrader()):
        assert isinstance(grader.equivalent(a, b), bool)


@pytest.fixture(scope="module")
def math_grader() -> Iterator[MathGrader]:
    pytest.importorskip("math_verify")
    grader = MathGrader(timeout=3.0)
    yield grader
    close_default_pool()


@given(
    prediction=st.lists(pieces, min_size=1, max_size=12).map("".join), gold=st.lists(pieces, max_size=8).map("".join)
)
def test_math_grader_returns_a_verdict_within_its_time_limit(
    math_grader: MathGrader, prediction: str, gold: str
) -> None:
    assume(gold.strip())
    started = time.perf_counter()
    result = asyncio.run(math_grader.grade(prediction, gold))
    assert isinstance(result, GradeResult)
    assert result.detail in {"no answer", "exact", "numeric", "math-verify", "timeout"} or result.detail.startswith(
        "error: "
    )
    assert time.perf_counter() - started < 3.0 + 10.0  # the item's hard limit, plus a worker restart


# -- calculator --------------------------------------------------------------------------------------------------
@given(expression=st.text(max_size=MAX_EXPRESSION_LENGTH + 50))
def test_calculator_takes_any_text(expression: str) -> None:
    started = time.perf_counter()
    try:
        value = calculate(expression)
    except ToolError:
        pass
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
    assert time.perf_counter() - started < PER_INPUT_S


ints = st.integers(-(10**6), 10**6).map(str)
arithmetic = st.recursive(
    ints,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["+", "-", "*"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"-{e}"),
    ),
    max_leaves=30,
)


@given(expression=arithmetic)
def test_calculator_is_exact_on_integer_arithmetic(expression: str) -> None:
    expected = eval(expression, {"__builtins__": {}})  # the oracle, on generated integer arithmetic
    refused: ToolError | None = None
    try:
        value = calculate(expression)
    except ToolError as err:
        refused = err
    if refused is not None:  # only the documented size limit may refuse a valid expression
        assert "too large" in str(refused) or "too long" in str(refused), refused
        return
    assert value == expected and isinstance(value, int)


hostile = st.sampled_from(
    ["9**9**9**9", "2**(2**64)", "factorial(10**6)", "(" * 500 + "1" + ")" * 500, "10**1000 * 10**1000",
     "exp(1e308)", "1/0", "log(-1)", "sqrt(-1)", "__import__('os')", "().__class__",
     "[1]*10**9", "'a'*10**9", "lambda: 1", "max()", "min(*[])", "1 if 1 else 2", "1 < 2"]
)  # fmt: skip


@given(expression=hostile)
def test_hostile_expressions_are_refused_quickly(expression: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ToolError):
        calculate(expression)
    assert time.perf_counter() - started < PER_INPUT_S


# -- tool-argument validation ------------------------------------------------------------------------------------
def lookup(query: str, k: Annotated[int, pydantic.Field(ge=1, le=10)] = 3, exact: bool = False) -> str:
    """Look something up."""
    return f"{query}:{k}:{exact}"


TOOL = Tool(lookup)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@given(args=st.lists(json_values, max_size=5), kwargs=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_tool_arguments_bind_and_validate_or_raise_tool_argument_errors(
    args: list[Any], kwargs: dict[str, Any]
) -> None:
    started = time.perf_counter()
    refused: ToolArgumentError | None = None
    try:
        values = TOOL.validate(TOOL.bind(args, kwargs))
    except ToolArgumentError as err:
        refused = err
    if refused is not None:
        assert refused.tool == "lookup"
        assert refused.field is None or isinstance(refused.field, str)
    else:
        assert set(values) == {"query", "k", "exact"}
        assert isinstance(values["query"], str) and 1 <= values["k"] <= 10 and isinstance(values["exact"], bool)
    assert time.perf_counter() - started < PER_INPUT_S


@given(arguments=json_values)
def test_tool_validate_rejects_anything_but_a_mapping_with_a_tool_argument_error(arguments: Any) -> None:
    try:
        TOOL.validate(arguments)
    except ToolArgumentError:
        pass
