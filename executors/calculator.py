"""The ``calculator`` tool: safe arithmetic by walking a whitelisted Python AST (never ``eval``/``exec``).

Allowed: int and float literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses, the constants ``pi``,
``e`` and ``tau``, and the functions ``sqrt, exp, log (x[, base]), log2, log10, sin, cos, tan, asin, acos,
atan, floor, ceil, abs, round (x[, digits]), min, max, factorial``. Everything else (names, attributes,
strings, comparisons, ``^``...) is rejected with a `ToolError` saying what was not allowed.

Guards keep a hostile or accidental expression cheap: a length cap, a nesting-depth cap, an estimate of an
integer power's size before computing it, a cap on the size of every intermediate integer, and finite floats.

Results are exact where possible: ``6/3`` is ``2`` (int) and ``7/2`` is ``3.5``; floats are rounded to 15
significant digits (``0.1 + 0.2`` gives ``0.3``) and integral floats become ints (``sqrt(16)`` gives ``4``).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Any

from ..errors import ToolError
from .registry import Tool

__all__ = ["MAX_EXPRESSION_LENGTH", "calculate", "calculator", "calculator_tool"]

MAX_EXPRESSION_LENGTH = 2000
MAX_DEPTH = 200
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_FACTORIAL = 1000

_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


def _factorial(n: float) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise ValueError("factorial() only accepts integral values")
        n = int(n)
    if n > MAX_FACTORIAL:
        raise _TooLarge(f"factorial({n}) is too large (limit {MAX_FACTORIAL})")
    return math.factorial(n)


def _round(x: float, digits: float | None = None) -> float:
    if digits is None:
        return round(x)
    if isinstance(digits, float):
        if not digits.is_integer():
            raise ValueError("round() digits must be an integer")
        digits = int(digits)
    return round(x, digits)


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "exp": math.exp,
    "log": _log,
    "ln": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "floor": math.floor,
    "ceil": math.ceil,
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "factorial": _factorial,
}


class _TooLarge(ArithmeticError):
    pass


class _Rejected(ValueError):
    pass


def _check(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Rejected(f"unsupported value {value!r}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _TooLarge(f"an intermediate result has more than {MAX_INT_BITS} bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise _TooLarge("the result is not a finite number (overflow or undefined)")
    return value


def _divide(a: int | float, b: int | float) -> int | float:
    if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
        return a // b
    return a / b


def _power(base: int | float, exponent: int | float) -> int | float:
    # |base| ** exponent has about bit_length * exponent bits: refuse before computing it.
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and (abs(base).bit_length() - 1) * exponent > MAX_INT_BITS
    ):
        raise _TooLarge(f"{base} ** {exponent} is too large")
    result = base**exponent
    if isinstance(result, complex):
        raise ValueError("a negative number raised to a fractional power is not a real number")
    return result


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: _divide,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}


def _eval(node: ast.AST, depth: int) -> int | float:
    if depth > MAX_DEPTH:
        raise _Rejected(f"the expression is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Expression):
        return _eval(node.body, depth + 1)
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.BinOp):
        operator = _BINARY.get(type(node.op))
        if operator is None:
            hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
            raise _Rejected(f"operator {type(node.op).__name__} is not allowed{hint}")
        left = _eval(node.left, depth + 1)
        right = _eval(node.right, depth + 1)
        if (
            isinstance(node.op, ast.Mult)
            and isinstance(left, int)
            and isinstance(right, int)
            and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1
        ):
            raise _TooLarge(f"an intermediate result has more than {MAX_INT_BITS} bits")
        return _check(operator(left, right))
    if isinstance(node, ast.UnaryOp):
        operand = _eval(node.operand, depth + 1)
        if isinstance(node.op, ast.USub):
            return -operand
        if isinstance(node.op, ast.UAdd):
            return +operand
        raise _Rejected(f"unary operator {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise _Rejected(f"unknown name {node.id!r}; constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            called = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise _Rejected(f"function {called!r} is not allowed; functions: {', '.join(sorted(_FUNCTIONS))}")
        if node.keywords:
            raise _Rejected(f"{node.func.id}() takes no keyword arguments")
        args = [_eval(arg, depth + 1) for arg in node.args]
        try:
            return _check(_FUNCTIONS[node.func.id](*args))
        except TypeError as err:
            raise _Rejected(f"{node.func.id}(): {err}") from None
    raise _Rejected(f"{type(node).__name__} is not allowed in an arithmetic expression")


def _normalise(value: int | float) -> int | float:
    if isinstance(value, float):
        value = float(f"{value:.15g}")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        if value == 0:
            return 0
    return value


def calculate(expression: str) -> int | float:
    """Evaluate an arithmetic expression safely.

    Args:
        expression: e.g. ``"(1950 - 1873) * 2"`` or ``"sqrt(2) * pi"``.

    Returns:
        an int when the result is exact and integral, else a float.

    Raises:
        ToolError: (tool ``calculator``) a syntax error, a disallowed construct, division by zero, a math domain
            error, or a result/expression beyond the size limits.
    """
    if not isinstance(expression, str):
        raise ToolError("calculator", f"expression must be a string, got {type(expression).__name__}")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    text = text.removesuffix("=").strip()
    if not text:
        raise ToolError("calculator", "empty expression")
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ToolError("calculator", f"expression longer than {MAX_EXPRESSION_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ToolError("calculator", f"invalid expression {text!r}: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ToolError("calculator", "the expression is nested too deeply") from None
    try:
        return _normalise(_eval(tree, 0))
    except ZeroDivisionError:
        raise ToolError("calculator", f"division by zero in {text!r}") from None
    except (_TooLarge, OverflowError) as err:
        raise ToolError("calculator", f"result too large: {err}") from None
    except _Rejected as err:
        raise ToolError("calculator", str(err)) from None
    except (ValueError, ArithmeticError) as err:
        raise ToolError("calculator", f"math error in {text!r}: {err}") from None
    except RecursionError:
        raise ToolError("calculator", "the expression is nested too deeply") from None


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt, log, sin, pi, e, min, max...

    Args:
        expression: the arithmetic expression, e.g. "(1950 - 1873) * 2".
    """
    return calculate(expression)


def calculator_tool() -> Tool:
    """A fresh `Tool` for `calculator` (it is pure and cheap: no limits)."""
    return Tool(calculator)
