"""Graders: numeric, math-verify (process pool, timeouts, cache), QA EM/F1, yes/no, registry."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from branchwise.errors import ConfigError, UnknownNameError
from branchwise.verifiers import (
    Grader,
    GradeResult,
    GraderPoolError,
    MathGrader,
    NumericGrader,
    QAGrader,
    TimeoutProcessPool,
    YesNoGrader,
    available_graders,
    close_default_pool,
    get_grader,
    normalize_qa_answer,
    qa_f1,
)

# -- fixtures ------------------------------------------------------------------------------------------

_HELPER_SOURCE = textwrap.dedent(
    """
    import os
    import time

    def slow_equal(prediction, golds):
        # "sleep S" sleeps S seconds (a stuck item), "crash" kills the worker process, anything else is
        # case-insensitive string equality.
        if prediction == "crash":
            os._exit(3)
        if prediction.startswith("sleep "):
            time.sleep(float(prediction.split()[1]))
            return True
        return prediction.lower() in [g.lower() for g in golds]
    """
)


@pytest.fixture(scope="module")
def slow_equal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, tuple[str, ...]], bool]]:
    """A picklable verify function importable by worker processes (they inherit sys.path at launch)."""
    folder = tmp_path_factory.mktemp("grading_helper")
    (folder / "_bw_grading_helper.py").write_text(_HELPER_SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        import _bw_grading_helper

        yield _bw_grading_helper.slow_equal
        sys.modules.pop("_bw_grading_helper", None)


class SignallingPool(TimeoutProcessPool):
    """A pool that sets ``submitted`` once an item was handed to it: tests wait on that, not on the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted = threading.Event()

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float) -> concurrent.futures.Future[Any]:
        future = super().submit(fn, *args, timeout=timeout)
        self.submitted.set()
        return future


@pytest.fixture
def pool() -> Iterator[SignallingPool]:
    p = SignallingPool(max_workers=1)
    yield p
    p.close()


@pytest.fixture(scope="module")
def math_grader() -> Iterator[MathGrader]:
    """A MathGrader on the shared default pool (real math-verify)."""
    grader = MathGrader()
    yield grader
    close_default_pool()


# -- GradeResult / protocol ----------------------------------------------------------------------------


def test_grade_result_score_must_be_in_unit_interval() -> None:
    assert GradeResult(True, 1.0, "x").score == 1.0
    with pytest.raises(ConfigError):
        GradeResult(True, 1.5)


def test_every_grader_satisfies_the_protocol() -> None:
    for name in available_graders():
        grader = get_grader(name)
        assert isinstance(grader, Grader)
        assert grader.name == name


# -- numeric -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("3/4", "0.75"),
        ("$12.50", "12.5"),
        ("-3", "-3.0"),
        ("50%", "50"),
        ("50%", "0.5"),
        ("0.5", "50%"),
        ("0.3333333333", "1/3"),  # within the relative tolerance
        ("025", "25"),
    ],
)
def test_numeric_accepts_equal_numbers(prediction: str, gold: str) -> None:
    result = NumericGrader().grade_sync(prediction, gold)
    assert result == GradeResult(True, 1.0, "numeric")


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [("0.5", "0.6"), ("1001", "1000"), ("-3", "3"), ("0.333", "1/3"), ("12", "1,2")],
)
def test_numeric_rejects_different_numbers(prediction: str, gold: str) -> None:
    assert not NumericGrader().grade_sync(prediction, gold).correct


def test_numeric_edge_cases() -> None:
    grader = NumericGrader()
    assert grader.grade_sync(None, "3") == GradeResult(False, 0.0, "no answer")
    assert grader.grade_sync("three", "3").detail == "not a number"
    assert grader.grade_sync("7", ["5", "7"]).correct  # any accepted answer
    assert not NumericGrader(percent=False).grade_sync("50%", "0.5").correct
    assert NumericGrader(rel_tol=0.01).grade_sync("3.14", "3.14159").correct
    assert grader.equivalent("1,000", "1000.0")
    assert not grader.equivalent("1", "2")
    huge = "1" + "0" * 400
    assert grader.grade_sync(huge, huge).correct  # beyond float range: exact comparison
    assert not grader.grade_sync(huge + "1", huge).correct
    with pytest.raises(ConfigError):
        grader.grade_sync("1", [])


async def test_cheap_graders_grade_async_too() -> None:
    assert (await NumericGrader().grade("1,000", "1000")).correct
    assert (await QAGrader().grade("the Eiffel Tower", "Eiffel Tower")).correct
    assert await NumericGrader().aequivalent("0.5", "1/2")


# -- math ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "detail"),
    [
        ("0.5", "\\frac{1}{2}", "numeric"),  # fast path, no worker
        ("1,000", "1000", "numeric"),
        ("3/56", "\\dfrac{3}{56}", "numeric"),
        ("14/3", "\\frac{14}{3}", "numeric"),
        ("x=3", "3", "math-verify"),
        ("3", "x = 3", "math-verify"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "math-verify"),
        ("[1, 2)", "[1,2)", "exact"),
        ("[-2, 7]", "x \\in [-2,7]", "math-verify"),
        ("\\{2, 1\\}", "\\{1,2\\}", "math-verify"),
        ("-2, 1", "1,-2", "math-verify"),
        ("11\\sqrt{2}", "11\\sqrt2", "math-verify"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", "math-verify"),
        ("Evelyn", "\\text{Evelyn}", "math-verify"),
        ("90", "90^\\circ", "math-verify"),
        ("p-q", "p - q", "exact"),
    ],
)
def test_math_accepts_equivalent_answers(math_grader: MathGrader, prediction: str, gold: str, detail: str) -> None:
    assert math_grader.grade_sync(prediction, gold) == GradeResult(True, 1.0, detail)


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("0.6", "0.5"),
        ("1001", "1,000"),
        ("x=4", "3"),
        ("(3, \\pi/3)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("[1, 2]", "[1,2)"),
        ("q-p", "p - q"),
        ("\\{1, 3\\}", "\\{1,2\\}"),
        ("Bob", "\\text{Evelyn}"),
        ("\\frac{4}{56}", "\\frac{3}{56}"),
    ],
)
def test_math_rejects_different_answers(math_grader: MathGrader, prediction: str, gold: str) -> None:
    result = math_grader.grade_sync(prediction, gold)
    assert not result.correct
    assert result.score == 0.0
    assert result.detail in ("numeric", "math-verify")


def test_math_none_and_empty_predictions(math_grader: MathGrader) -> None:
    assert math_grader.grade_sync(None, "1") == GradeResult(False, 0.0, "no answer")
    assert math_grader.grade_sync("  ", "1") == GradeResult(False, 0.0, "no answer")


def test_math_accepts_any_alias_and_clusters(math_grader: MathGrader) -> None:
    assert math_grader.grade_sync("x=5", ["7", "5"]).correct
    assert math_grader.equivalent("\\frac{1}{2}", "0.5")
    assert math_grader.equivalent("\\left( 1, 2 \\right)", "(1,2)")
    assert not math_grader.equivalent("\\frac{1}{2}", "0.6")


def test_math_grade_many_keeps_order_and_caches(math_grader: MathGrader) -> None:
    pairs: list[tuple[str | None, str]] = [
        ("\\frac{a}{b}", "a/b"),
        ("2", "2"),
        ("a+b", "b + a"),
        (None, "1"),
        ("\\sqrt{4}", "3"),
    ]
    results = math_grader.grade_many(pairs)
    assert [r.correct for r in results] == [True, True, True, False, False]
    before = math_grader.cache_info()["cached"]
    again = math_grader.grade_many(pairs)
    assert again == results
    assert math_grader.cache_info()["cached"] == before  # served from the cache, nothing new graded
    assert math_grader.cache_info()["inflight"] == 0


async def test_math_async_grade_and_dedupe(math_grader: MathGrader) -> None:
    items = [("y=2", "2"), ("y=2", "2"), ("(0, 1]", "(0,1]"), ("2y", "y+y"), ("0.25", "\\frac14")]
    results = await asyncio.gather(*(math_grader.grade(p, g) for p, g in items))
    assert [r.correct for r in results] == [True, True, True, True, True]
    assert results[0] == results[1]
    assert await math_grader.aequivalent("\\frac{3}{4}", "0.75")


def test_math_cache_is_bounded(slow_equal: Callable[[str, tuple[str, ...]], bool], pool: TimeoutProcessPool) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, cache_size=2)
    grader.grade_many([("a", "a b"), ("b", "c"), ("c", "d")])
    assert grader.cache_info()["cached"] == 2
    grader.close()
    assert grader.cache_info()["cached"] == 0


def test_math_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        MathGrader(timeout=0)
    with pytest.raises(ConfigError):
        MathGrader(cache_size=-1)


# -- MathGrader on a pool: timeouts, crashes, a pool that cannot start ------------------------------------


def test_math_grader_timeout_counts_as_wrong_and_pool_survives(
    slow_equal: Callable[[str, tuple[str, ...]], bool], pool: TimeoutProcessPool
) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, timeout=0.5)
    assert grader.grade_sync("alpha", "alpha beta") == GradeResult(False, 0.0, "math-verify")
    result = grader.grade_sync("sleep 60", "anything")
    assert result == GradeResult(False, 0.0, "timeout")
    assert pool.restarts == 1
    # the next item runs on the replacement pool
    assert grader.grade_sync("GAMMA", ["delta", "gamma"]) == GradeResult(True, 1.0, "math-verify")
    # the timeout is cached: the pathological pair is not run again
    assert grader.grade_sync("sleep 60", "anything").detail == "timeout"
    assert pool.restarts == 1


def test_math_grader_crashing_item_is_wrong_not_fatal(
    slow_equal: Callable[[str, tuple[str, ...]], bool], pool: TimeoutProcessPool
) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, timeout=10)
    assert grader.grade_sync("crash", "x") == GradeResult(False, 0.0, "error: worker crashed")
    assert grader.grade_sync("X", "x").correct


def test_pool_that_cannot_start_raises_instead_of_grading_wrong(
    slow_equal: Callable[[str, tuple[str, ...]], bool],
) -> None:
    broken = TimeoutProcessPool(initializer=sys.exit, startup_timeout=30)  # every worker exits at start-up
    try:
        with pytest.raises(GraderPoolError, match="failed to start"):
            broken.run(math.sqrt, 4.0, timeout=10)
        grader = MathGrader(pool=broken, verify_fn=slow_equal)
        with pytest.raises(GraderPoolError):
            grader.grade_sync("a", "b")
        assert grader.cache_info() == {"cached": 0, "inflight": 0, "maxsize": 4096}
    finally:
        broken.close()


async def test_closing_a_pool_under_a_waiting_grade_raises(
    slow_equal: Callable[[str, tuple[str, ...]], bool], pool: SignallingPool
) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, timeout=10)
    waiting = asyncio.create_task(grader.grade("sleep 5", "x"))
    assert await asyncio.to_thread(pool.submitted.wait, 30)
    assert grader.cache_info()["inflight"] == 1
    await asyncio.to_thread(pool.close)
    with pytest.raises(GraderPoolError, match="closed"):
        await waiting
    assert grader.cache_info()["inflight"] == 0


async def test_math_grader_async_does_not_block_the_event_loop(
    slow_equal: Callable[[str, tuple[str, ...]], bool], pool: TimeoutProcessPool
) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, timeout=10)
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    ticker_task = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        result = await grader.grade("sleep 1.0", "x")
        elapsed = time.monotonic() - started
    finally:
        done.set()
        await ticker_task
    assert result.correct
    assert elapsed >= 1.0
    assert len(ticks) >= 20
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.5  # a blocking grade would have frozen the ticker for a whole second


async def test_math_grader_cancelled_waiter_does_not_break_shared_item(
    slow_equal: Callable[[str, tuple[str, ...]], bool], pool: SignallingPool
) -> None:
    grader = MathGrader(pool=pool, verify_fn=slow_equal, timeout=10)
    first = asyncio.create_task(grader.grade("sleep 2", "x"))
    assert await asyncio.to_thread(pool.submitted.wait, 30)  # the item is in flight
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # Still in flight (not cached yet), so this grade waits on the same item the cancelled waiter left.
    assert grader.cache_info()["inflight"] == 1
    assert (await grader.grade("sleep 2", "x")).correct


def test_worker_helper_is_importable_by_workers(slow_equal: Any, pool: TimeoutProcessPool) -> None:
    # guards the fixture itself: a mis-set sys.path would make every timeout test pass for the wrong reason
    assert pool.run(slow_equal, "a", ("a",), timeout=10) is True
    assert pool.run(slow_equal, "a", ("b",), timeout=10) is False


# -- QA ------------------------------------------------------------------------------------------------


def test_squad_normalisation() -> None:
    assert normalize_qa_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_qa_answer("An apple, a pear") == "apple pear"
    assert normalize_qa_answer("Janet\u2019s") == "janets"


@pytest.mark.parametrize(
    ("prediction", "gold"),
    [
        ("the Eiffel Tower", "Eiffel Tower"),
        ("Eiffel tower.", "The Eiffel Tower"),
        ("  PARIS ", "Paris"),
        ("an onion", "Onion"),
    ],
)
def test_qa_exact_match_ignores_case_articles_punctuation(prediction: str, gold: str) -> None:
    assert QAGrader().grade_sync(prediction, gold) == GradeResult(True, 1.0, "exact match")


def test_qa_aliases_and_f1() -> None:
    grader = QAGrader()
    aliases = ["Onion", "Allium cepa", "Bulb onion"]
    assert grader.grade_sync("allium cepa", aliases).correct
    assert not grader.grade_sync("garlic", aliases).correct
    partial = grader.grade_sync("red bulb onion", aliases)
    assert not partial.correct  # not an exact match...
    assert partial.score == pytest.approx(0.8)  # ...but F1 with "bulb onion" is 2*(2/3*1)/(2/3+1)
    assert QAGrader(f1_threshold=0.75).grade_sync("red bulb onion", aliases).correct
    assert not QAGrader(f1_threshold=0.9).grade_sync("red bulb onion", aliases).correct
    assert qa_f1("", "") == 1.0
    assert qa_f1("the", "Paris") == 0.0
    assert grader.equivalent("The Beatles", "beatles")
    assert not grader.equivalent("The Beatles", "The Rolling Stones")
    assert grader.grade_sync(None, "x").detail == "no answer"
    with pytest.raises(ConfigError):
        QAGrader(f1_threshold=0)


# -- yes/no --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("**No**", "no"),
        ("True", "yes"),
        ("false", "no"),
        ("(A)", "yes"),
        ("B)", "no"),
        ("b", "no"),
        ("No, because the moon is too big.", "no"),
        ("I think the answer is yes", "yes"),
        ("maybe", None),
        ("either yes or no", None),
        ("a dog", None),
    ],
)
def test_yesno_labels(text: str, label: str | None) -> None:
    assert YesNoGrader().label(text) == label


def test_yesno_grading() -> None:
    grader = YesNoGrader()
    assert grader.grade_sync("(A) Yes", "Yes").correct
    assert not grader.grade_sync("No", "Yes").correct
    assert grader.grade_sync("maybe", "Yes").detail == "not yes/no"
    assert grader.equivalent("True", "yes")
    assert not grader.equivalent("maybe", "maybe")
    assert YesNoGrader(letters=("b", "a")).grade_sync("(B)", "yes").correct
    with pytest.raises(ConfigError):
        grader.grade_sync("yes", "perhaps")
    with pytest.raises(ConfigError):
        YesNoGrader(letters=("ab", "c"))


# -- registry ------------------------------------------------------------------------------------------


def test_get_grader_by_name() -> None:
    assert available_graders() == ("math", "numeric", "qa", "yesno")
    assert isinstance(get_grader("qa", f1_threshold=0.5), QAGrader)
    assert isinstance(get_grader("math"), MathGrader)
    with pytest.raises(UnknownNameError) as info:
        get_grader("maths")
    assert "math" in info.value.suggestions
    with pytest.raises(ConfigError, match="invalid options"):
        get_grader("qa", bogus=1)


def test_unguarded_script_can_use_the_math_pool(tmp_path: Path) -> None:
    """Workers start with forkserver/spawn; a user script without a __main__ guard must not run twice."""
    script = tmp_path / "grade_script.py"
    script.write_text(
        "from branchwise.verifiers import MathGrader\n"
        "print('top-level ran', flush=True)\n"
        "grader = MathGrader(timeout=60)\n"
        "print('RESULT', grader.grade_sync(r'\\frac{1}{2}', '0.5').correct, grader.grade_sync('x^2', 'x^3').correct)\n"
        "grader.close()\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("top-level ran") == 1
    assert "RESULT True False" in proc.stdout
