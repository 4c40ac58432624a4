"""calculator: exact arithmetic over a whitelisted AST; everything else, and anything huge, is a clear ToolError."""

from __future__ import annotations

import math
import time

import pytest

from branchwise.errors import ToolError
from branchwise.executors import calculate, calculator_tool


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1950 - 1873) * 2", 154),
        ("6 / 3", 2),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** -1", 0.5),
        ("-(3 - 5)", 2),
        ("+4", 4),
        ("0.1 + 0.2", 0.3),
        ("sqrt(16)", 4),
        ("sqrt(2) ** 2", 2),
        ("log(8, 2)", 3),
        ("log10(1000)", 3),
        ("round(2.567, 2)", 2.57),
        ("round(2.5)", 2),
        ("min(3, 1, 2) + max(4, 9)", 10),
        ("abs(-3.5)", 3.5),
        ("floor(2.7) + ceil(2.1)", 5),
        ("factorial(5)", 120),
        ("pi", math.pi),
        ("sin(pi / 2)", 1),
        ("e ** 0", 1),
        ("1_000 * 3", 3000),
        ("12 × 3 ÷ 4", 9),
        ("2 + 2 =", 4),
        ("10 ** 300 // 10 ** 299", 10),
    ],
)
def test_values(expression: str, expected: float) -> None:
    result = calculate(expression)
    assert result == pytest.approx(expected)
    assert type(result) is type(expected)  # ints stay ints when exact


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "not allowed"),
        ("().__class__", "not allowed"),
        ("'a' * 3", "unsupported value"),
        ("x + 1", "unknown name 'x'"),
        ("lambda: 1", "not allowed"),
        ("1 < 2", "not allowed"),
        ("2 ^ 3", "use \\*\\* for powers"),
        ("True + 1", "unsupported value"),
        ("1j * 2", "unsupported value"),
        ("open('f')", "function 'open' is not allowed"),
        ("math.sqrt(4)", "function 'math.sqrt' is not allowed"),
        ("sqrt(x=4)", "keyword"),
        ("sqrt(1, 2)", "sqrt"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("sqrt(-1)", "math error"),
        ("(-8) ** 0.5", "not a real number"),
        ("exp(1000)", "too large"),
        ("1e308 * 10", "too large"),
        ("", "empty"),
        ("1 +", "invalid expression"),
    ],
)
def test_rejections(expression: str, message: str) -> None:
    with pytest.raises(ToolError, match=message) as info:
        calculate(expression)
    assert info.value.tool == "calculator"


@pytest.mark.parametrize(
    "expression",
    ["9 ** 9 ** 9", "10 ** 100000", "2 ** 5000", "factorial(100000)", "(10 ** 1000) * (10 ** 1000) * (10 ** 1000)"],
)
def test_huge_results_are_refused_fast(expression: str) -> None:
    started = time.monotonic()
    with pytest.raises(ToolError, match="too large"):
        calculate(expression)
    assert time.monotonic() - started < 0.5


def test_deep_nesting_and_long_input_are_refused() -> None:
    with pytest.raises(ToolError, match="nested"):
        calculate("abs(" * 250 + "1" + ")" * 250)
    with pytest.raises(ToolError, match="nested"):
        calculate("-" * 500 + "1")
    assert calculate("1" + " + 1" * 150) == 151  # a long flat sum is fine
    with pytest.raises(ToolError, match="longer than"):
        calculate("1+" * 2000 + "1")


async def test_calculator_tool_call() -> None:
    t = calculator_tool()
    assert t.signature() == "calculator(expression: str)"
    assert await t.call({"expression": "(2 + 3) * 4"}) == 20
    with pytest.raises(ToolError, match="division by zero"):
        await t.call({"expression": "1/0"})
