"""Built-in arithmetic word problems: seeded, reproducible, exact answers that follow from the worked steps."""

from __future__ import annotations

import re

import pytest

from branchwise.errors import ConfigError
from branchwise.evals.arithmetic import arithmetic_problems


def test_same_seed_same_problems_different_seed_different() -> None:
    assert arithmetic_problems(10, seed=7) == arithmetic_problems(10, seed=7)
    assert arithmetic_problems(10, seed=7) != arithmetic_problems(10, seed=8)


@pytest.mark.parametrize("seed", range(5))
def test_answers_follow_from_steps(seed: int) -> None:
    for problem in arithmetic_problems(30, seed=seed, levels=(1, 2, 3, 4, 5)):
        assert len(problem.steps) == problem.level
        assert problem.question.endswith("have now?")
        start = int(re.search(r"has (\d+) ", problem.question).group(1))  # type: ignore[union-attr]
        value = start
        for line in problem.steps:
            expression, result = line.split(" = ")
            assert int(expression.split()[0]) == value  # each step starts from the previous result
            value = eval(expression.replace("x", "*").replace("/", "//"))  # generated digits and operators only
            assert value == int(result)
        assert str(value) == problem.answer
        assert value >= 0


def test_levels_cycle_and_ids_are_stable() -> None:
    problems = arithmetic_problems(6, seed=3, levels=(2, 4))
    assert [p.level for p in problems] == [2, 4, 2, 4, 2, 4]
    assert [p.id for p in problems[:2]] == ["arith-3-0", "arith-3-1"]


@pytest.mark.parametrize(("count", "levels"), [(0, (1,)), (3, ()), (3, (0,)), (3, (6,))])
def test_bad_arguments(count: int, levels: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError):
        arithmetic_problems(count, levels=levels)
