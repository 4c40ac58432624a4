"""Answer extraction: find the final answer in a model's text.

Every function here is pure and total: it never raises on odd input, so it can be run on partial (streaming)
text as often as a strategy likes. On partial text an unclosed ``\\boxed{`` is ignored (only complete boxes
count), while the numeric rules see whatever digits have arrived so far.

The default `AnswerExtractor` tries, in order:

1. ``boxed``: the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed);
2. ``gsm8k``: the text after the last ``####`` marker (GSM8K's gold format);
3. ``answer_is``: the last "The (final) answer is X" / "Answer: X" phrase;
4. ``last_number``: the last number in the text.

Numeric answers found by rules 2-4 are normalised with `normalize_number` ("1,000" -> "1000",
"$12.50" -> "12.5"); boxed content is returned as written (it is often LaTeX, graded by `MathGrader`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import NamedTuple

from ..errors import ConfigError, UnknownNameError

__all__ = [
    "DEFAULT_RULES",
    "MAX_EXPONENT",
    "AnswerExtractor",
    "Extraction",
    "ExtractionRule",
    "extract_all_boxed",
    "extract_answer",
    "extract_answer_is",
    "extract_boxed",
    "extract_gsm8k",
    "extract_last_number",
    "normalize_number",
    "parse_number",
]

ExtractionRule = Callable[[str], str | None]
"""A rule maps text to the answer it finds, or None."""

# A number as written in prose: optional sign, thousands groups or plain digits, decimals, an optional
# "/denominator". The lookbehind keeps us from starting inside a word ("x2"), a decimal ("3.5" -> "5") or a
# fraction ("3/4" -> "4"); a minus directly after a word or bracket is subtraction, not a sign ("5-3" -> "3").
_NUMBER_RE = re.compile(
    r"(?<![\w./)\]}])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"
    r"|(?<![\w./)\]}])-?\.\d+"
)
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"\banswer\b\s*(?:\bis\b\s*:?|:)[ \t]*", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?;](?=\s|$)")
# Periods that do not end an answer: after a title or place word ("St. Louis", "Dr. Who"), and within initials
# ("J. R. R. Tolkien", "U.S. Army"); see `_ends_answer`.
_TITLE_RE = re.compile(
    r"\b(?:Mr|Mrs|Ms|Dr|St|Mt|Ft|Jr|Sr|Prof|Gen|Col|Lt|Sgt|Capt|Gov|Sen|Pres|Hon|vs|etc|Inc|Ltd|Corp|Bros|approx)$"
)
_INITIAL_RE = re.compile(r"(?:^|[^\w.])(?:[A-Z]\.\s?)*[A-Z]$")
_AFTER_INITIALS_RE = re.compile(r"(?:[A-Z]\.\s?)+[A-Z]$")
_NEXT_INITIAL_RE = re.compile(r"\s*[A-Z]\.")
_NEXT_WORD_RE = re.compile(r"\s*([A-Z][a-z]+)\b")
# fmt: off
_SENTENCE_STARTERS = frozenset({
    "It", "The", "This", "That", "These", "Those", "He", "She", "They", "We", "I", "You", "So", "Thus", "Therefore",
    "Hence", "Let", "Note", "But", "And", "However", "Also", "Here", "There", "In", "As", "To", "For", "If",
    "Because", "Since", "Wait", "Final", "Answer", "Then", "Now", "My", "Our", "Its",
})
# fmt: on
_NUMBER_WITH_UNITS_RE = re.compile(
    r"^(?:\\?\$)?\s*(?P<num>[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)\s*"
    r"(?:\\?%|[A-Za-z][A-Za-z/ ]*|\\text\{[^{}]*\})?$"
)
_LATEX_FRAC_RE = re.compile(r"^\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}$")
_SIMPLE_NUMBER_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d{1,12}))?$")
MAX_EXPONENT = 1000
"""Numbers in scientific notation with a larger exponent are not read as numbers (``parse_number`` gives None)."""
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d*)?$")


class Extraction(NamedTuple):
    """An extracted answer and the name of the rule that found it."""

    answer: str
    rule: str


# ---------------------------------------------------------------------------------------------------------
# Numbers


def parse_number(text: str) -> Fraction | None:
    """Parse a number written in prose or simple LaTeX into an exact `Fraction`.

    Accepts thousands separators ("1,000"), signs ("-3.5", "−2"), decimals, scientific notation ("1e-3"; not
    beyond an exponent of `MAX_EXPONENT`), fractions ("3/4", ``\\frac{3}{4}``, ``\\dfrac``, ``\\tfrac``), a leading
    currency sign ("$12", ``\\$12``), surrounding math delimiters (``$...$``, ``\\(...\\)``) and a trailing
    percent sign, which is *dropped*, not applied ("50%" -> 50); graders that care compare both readings.

    Args:
        text: the candidate answer.

    Returns:
        The exact value, or None when the text is not a plain number.
    """
    s = text.strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    s = s.replace("\u2212", "-").replace("\\!", "").replace("{,}", ",").replace("\\,", "")
    s = s.removeprefix("\\$").removeprefix("$").strip()
    if s.startswith(("-\\$", "-$")):  # "-$5"
        s = "-" + s.split("$", 1)[1].strip()
    s = s.removesuffix("\\%").removesuffix("%").strip()
    if not s:
        return None
    frac = _LATEX_FRAC_RE.match(s)
    if frac is None and s.startswith(("-\\", "+\\")):
        frac = _LATEX_FRAC_RE.match(s[1:])
        if frac is not None:
            value = _fraction(frac.group(1), frac.group(2))
            return -value if value is not None and s[0] == "-" else value
    if frac is not None:
        return _fraction(frac.group(1), frac.group(2))
    if "/" in s:
        num, _, den = s.partition("/")
        return _fraction(num, den)
    return _plain(s)


def _plain(s: str) -> Fraction | None:
    s = s.strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    match = _SIMPLE_NUMBER_RE.match(s)
    if not match:
        return None
    exponent = match.group(1)
    if exponent is not None and abs(int(exponent)) > MAX_EXPONENT:
        return None  # an exact 10**exponent would take unbounded time and memory; no answer looks like this
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _fraction(num: str, den: str) -> Fraction | None:
    n, d = _plain(num), _plain(den)
    if n is None or d is None or d == 0:
        return None
    return n / d


def _format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # not a terminating decimal: keep it exact
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        # exact: p / (2**a * 5**b) has at most len(p) + max(a, b) significant digits, and max(a, b) < bit_length
        ctx.prec = len(str(value.numerator)) + value.denominator.bit_length() + 1
        dec = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    return format(dec, "f")


def normalize_number(text: str) -> str | None:
    """Canonical text of a number: "1,000" -> "1000", "12.50" -> "12.5", "$3" -> "3", "3/4" -> "0.75".

    Integers print without a decimal point, other values with a terminating decimal expansion as that
    decimal in shortest form, the rest as a reduced "p/q" ("2/6" -> "1/3"). Equal values therefore get equal
    text. Accepts everything `parse_number` accepts (a percent sign is dropped).

    Returns:
        The canonical string, or None when the text is not a plain number.
    """
    value = parse_number(text)
    return None if value is None else _format_fraction(value)


# ---------------------------------------------------------------------------------------------------------
# Rules


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the brace closing the one at ``open_index``, or None if the text ends first."""
    depth = 0
    i = open_index
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # an escaped brace (\{ or \}) does not nest
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_all_boxed(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` in order (nested braces allowed).

    ``\\boxed 5`` (no braces) yields "5". Unclosed boxes (partial text) and empty boxes are skipped.
    """
    found: list[str] = []
    for match in _BOX_RE.finditer(text):
        start = match.end()
        if start < len(text) and text[start] == "{":
            end = _matching_brace(text, start)
            if end is None:
                continue
            content = text[start + 1 : end].strip()
        else:
            bare = re.match(r"[^\s$]+", text[start:]) if match.group(0)[-1:].isspace() else None
            if bare is None:
                continue
            content = bare.group(0)
        if content:
            found.append(content)
    return found


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), or None."""
    boxes = extract_all_boxed(text)
    return boxes[-1] if boxes else None


def _ends_answer(s: str, i: int) -> bool:
    """Whether the punctuation at ``s[i]`` (followed by a space or the end) ends the answer."""
    if s[i] != ".":
        return True
    before, after = s[:i], s[i + 1 :]
    if _TITLE_RE.search(before):
        return False
    if not _INITIAL_RE.search(before):
        return True
    if _NEXT_INITIAL_RE.match(after):
        return False  # "J. R. R. Tolkien": another initial follows
    if _AFTER_INITIALS_RE.search(before):
        # The last of several initials: "U.S. Army" goes on, "Washington, D.C. It is..." does not.
        word = _NEXT_WORD_RE.match(after)
        return word is None or word.group(1) in _SENTENCE_STARTERS
    return True  # one capital letter alone ("B. Because...") is a whole answer


def _clean_answer(raw: str) -> str | None:
    s = raw.strip().replace("**", "").strip()
    if s.startswith("$") and not s.startswith("$$") and _NUMBER_WITH_UNITS_RE.match(s) is None:
        # "$\frac{1}{2}$. I hope it is correct." -> the first inline-math span
        close = s.find("$", 1)
        if close > 1:
            s = s[1:close]
    elif s.startswith("\\(") and "\\)" in s:
        s = s[2 : s.index("\\)")]
    else:
        for end in _SENTENCE_END_RE.finditer(s):
            if _ends_answer(s, end.start()):
                s = s[: end.start()]
                break
    s = s.strip().strip("$").strip().rstrip(".").strip()
    if not s:
        return None
    numeric = _NUMBER_WITH_UNITS_RE.match(s)
    if numeric is not None:
        normalized = normalize_number(numeric.group("num"))
        if normalized is not None:
            return normalized
    return s


def extract_gsm8k(text: str) -> str | None:
    """The answer after the last GSM8K ``####`` marker ("#### 1,000" -> "1000"), or None."""
    matches = _GSM8K_RE.findall(text)
    for raw in reversed(matches):
        answer = _clean_answer(raw)
        if answer is not None:
            return answer
    return None


def extract_answer_is(text: str) -> str | None:
    """The answer in the last "The (final) answer is X" / "Answer: X" phrase (case-insensitive).

    The answer runs to the end of its sentence or line (a period after a title such as "St." or within initials
    such as "J. R. R." does not end it); markdown bold, surrounding ``$`` and a trailing period are stripped,
    and a number followed only by units ("18 dollars", "$18", "25%") becomes the number.
    """
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        line_end = text.find("\n", match.end())
        raw = text[match.end() : line_end if line_end != -1 else len(text)]
        answer = _clean_answer(raw)
        if answer is not None:
            return answer
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text, normalised ("... costs $1,000." -> "1000", "-3.5", "3/4"), or None."""
    matches = _NUMBER_RE.findall(text)
    if not matches:
        return None
    last: str = matches[-1]
    normalized = normalize_number(last)
    return normalized if normalized is not None else last


_BUILTIN_RULES: dict[str, ExtractionRule] = {
    "boxed": extract_boxed,
    "gsm8k": extract_gsm8k,
    "answer_is": extract_answer_is,
    "last_number": extract_last_number,
}
DEFAULT_RULES: tuple[str, ...] = ("boxed", "gsm8k", "answer_is", "last_number")


class AnswerExtractor:
    r"""Finds the final answer in generated text by trying rules in order; the first that matches wins.

    Args:
        rules: rule names ("boxed", "gsm8k", "answer_is", "last_number") and/or callables mapping text to
            an answer or None (named by their ``__name__``), tried in the given order.

    Raises:
        UnknownNameError: a rule name is not one of the built-in rules.
        ConfigError: ``rules`` is empty or holds something that is neither a name nor a callable.

    Example:
        >>> AnswerExtractor().extract("so 3 + 4 = 7. The answer is $\\boxed{7}$.")
        '7'
        >>> AnswerExtractor(["answer_is"]).extract_with_rule("The final answer is 12 apples.")
        Extraction(answer='12', rule='answer_is')
    """

    def __init__(self, rules: Sequence[str | ExtractionRule] = DEFAULT_RULES) -> None:
        if isinstance(rules, str):
            rules = (rules,)
        if not rules:
            raise ConfigError("AnswerExtractor needs at least one rule")
        resolved: list[tuple[str, ExtractionRule]] = []
        for rule in rules:
            if isinstance(rule, str):
                if rule not in _BUILTIN_RULES:
                    raise UnknownNameError("extraction rule", rule, list(_BUILTIN_RULES))
                resolved.append((rule, _BUILTIN_RULES[rule]))
            elif callable(rule):
                resolved.append((getattr(rule, "__name__", "custom"), rule))
            else:
                raise ConfigError(f"an extraction rule must be a rule name or a callable, got {rule!r}")
        self._rules = tuple(resolved)

    @property
    def rule_names(self) -> tuple[str, ...]:
        """The rules in the order they are tried."""
        return tuple(name for name, _ in self._rules)

    def extract_with_rule(self, text: str) -> Extraction | None:
        """The answer and the name of the first rule that found one, or None if no rule matched."""
        for name, rule in self._rules:
            answer = rule(text)
            if answer is not None:
                return Extraction(answer, name)
        return None

    def extract(self, text: str) -> str | None:
        """The answer found by the first matching rule, or None."""
        found = self.extract_with_rule(text)
        return None if found is None else found.answer

    def __call__(self, text: str) -> str | None:
        return self.extract(text)

    def __repr__(self) -> str:
        return f"AnswerExtractor(rules={list(self.rule_names)!r})"


_DEFAULT_EXTRACTOR = AnswerExtractor()


def extract_answer(text: str) -> str | None:
    """Extract with the default rules (boxed, gsm8k, answer_is, last_number)."""
    return _DEFAULT_EXTRACTOR.extract(text)
