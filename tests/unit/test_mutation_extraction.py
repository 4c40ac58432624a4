"""Answer extraction in detail (gaps found by mutation testing, `make mutation`): inline math and ``\\(...\\)`` spans,
the line an "answer is" phrase reads, escaped and unclosed boxes, LaTeX spacing and delimiters, signs on fractions
and currency, exact decimals for long terminating fractions, and the extractor's rules and messages."""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest

from branchwise.errors import ConfigError, UnknownNameError
from branchwise.verifiers.extraction import (
    AnswerExtractor,
    extract_all_boxed,
    extract_answer_is,
    extract_last_number,
    normalize_number,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The answer is $a. b$ indeed", "a. b"),  # the first inline-math span, whatever is inside it
        ("The answer is $a$ or $b$", "a"),
        ("The answer is $a$. It is", "a"),
        ("The answer is $$x. y$$", "x"),  # display math is not an inline span: the sentence ends at "x."
        ("The answer is \\(x. y\\) so", "x. y"),
        ("The answer is \\(a\\) or \\(b\\)", "a"),
        ("The answer is \\($Xy$\\)", "Xy"),
        ("The answer is \\(aX\\)", "aX"),
        ("The answer is ab\\)c", "ab\\)c"),  # a closing \) alone opens nothing
        ("The answer is **42**.", "42"),
        ("First line\nThe answer is 42\nmore", "42"),  # the phrase's own line, not the first one
        ("The answer is 42\nThen 7 apples.\nEnd", "42"),
    ],
)
def test_answer_is_spans_and_lines(text: str, answer: str) -> None:
    assert extract_answer_is(text) == answer


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        ("\\boxed{a\\}b}", ["a\\}b"]),  # an escaped brace does not close the box
        ("\\boxed{ \\boxed{3}", ["3"]),  # an unclosed box does not hide a complete one after it
        ("\\boxed, then", []),  # a bare box needs whitespace before its content
        ("\\boxed$x$ and \\boxed{7}", ["7"]),
    ],
)
def test_boxes(text: str, boxes: list[str]) -> None:
    assert extract_all_boxed(text) == boxes


def test_the_last_number_is_kept_as_written_when_it_does_not_normalise() -> None:
    assert extract_last_number("divide 1/0") == "1/0"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1\\!000", Fraction(1000)),
        ("1\\,000", Fraction(1000)),
        ("\\(5\\)", Fraction(5)),
        ("\\[5\\]", Fraction(5)),
        ("-\\$5", Fraction(-5)),
        ("50\\%", Fraction(50)),
        ("+\\frac{1}{2}", Fraction(1, 2)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("-$5$7", None),
        ("12$", None),
        ("abc/2", None),
        ("-\\frac{1}{0}", None),
    ],
)
def test_parse_number_latex_and_currency(text: str, value: Fraction | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("1/5", "0.2"),
        ("0.0000001", "0.0000001"),  # plain digits, never scientific notation
        ("1/59604644775390625", "0.000000000000000016777216"),  # 1 / 5**24
        ("1/1099511627776", "0.0000000000009094947017729282379150390625"),  # 1 / 2**40, every digit
        ("-3/1048576", "-0.00000286102294921875"),
    ],
)
def test_terminating_fractions_normalise_to_their_exact_decimal(text: str, canonical: str) -> None:
    assert normalize_number(text) == canonical
    assert Fraction(canonical) == parse_number(text)


# -- the extractor --------------------------------------------------------------------------------------------------


def test_an_extractor_takes_one_rule_name_and_is_callable() -> None:
    extractor = AnswerExtractor("boxed")
    assert extractor.rule_names == ("boxed",)
    assert extractor("so \\boxed{7}") == "7"
    assert repr(extractor) == "AnswerExtractor(rules=['boxed'])"


def test_callable_rules_are_named_by_their_name_or_custom() -> None:
    def mine(text: str) -> str | None:
        return "m"

    partial = functools.partial(lambda text, v: v, v="p")  # no __name__
    extractor = AnswerExtractor([mine, partial, "boxed"])
    assert extractor.rule_names == ("mine", "custom", "boxed")
    assert extractor.extract_with_rule("x") == ("m", "mine")


def test_bad_rules_are_refused_with_their_message() -> None:
    with pytest.raises(ConfigError) as caught:
        AnswerExtractor([])
    assert str(caught.value) == "AnswerExtractor needs at least one rule"
    with pytest.raises(UnknownNameError) as unknown:
        AnswerExtractor(["boxd"])
    assert unknown.value.kind == "extraction rule"
    assert str(unknown.value).startswith("unknown extraction rule 'boxd'. Did you mean 'boxed'?")
    with pytest.raises(ConfigError) as caught:
        AnswerExtractor([42])  # type: ignore[list-item]
    assert str(caught.value) == "an extraction rule must be a rule name or a callable, got 42"


def test_a_latex_fraction_parses_only_when_nothing_but_a_sign_precedes_it() -> None:
    assert parse_number("\\frac{1}{2}") == Fraction(1, 2)
    assert parse_number("-\\frac{1}{2}") == Fraction(-1, 2)
    assert parse_number("x\\frac{1}{2}") is None
    assert parse_number("7\\frac{1}{2}") is None
