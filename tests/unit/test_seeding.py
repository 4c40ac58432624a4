"""Run seeds (`branchwise.engine.seeding`): every engine call of a seeded run gets a seed derived from the run's,
reproducibly, distinct for repeated identical requests, never overriding a request's own seed."""

from __future__ import annotations

import asyncio

import pytest

from branchwise.engine import Capabilities, GenerationRequest
from branchwise.engine.seeding import MAX_SEED, current_run_seed, run_seed, seeded
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.errors import ConfigError
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.tracing import Event
from branchwise.search import Adaptive, SelfConsistency

pytestmark = pytest.mark.timeout(30)

A = GenerationRequest(prompt="What is 6 x 7?", n=2)
B = GenerationRequest(prompt="What is 6 x 8?", n=2)


def seeds_of(seed: int, *requests: GenerationRequest) -> list[int | None]:
    with run_seed(seed):
        return [seeded(r).seed for r in requests]


def test_outside_a_seeded_run_requests_are_unchanged() -> None:
    assert seeded(A) is A and current_run_seed() is None
    with run_seed(None):
        assert seeded(A) is A


def test_the_same_run_seed_gives_the_same_seeds_and_repeats_get_new_ones() -> None:
    first = seeds_of(5, A, A, B, A)
    assert first == seeds_of(5, A, A, B, A)
    assert all(isinstance(s, int) and 0 <= s <= MAX_SEED for s in first)
    assert len(set(first)) == 4  # a repeated request is a new draw, not the same samples again
    assert first[:2] == seeds_of(5, A, B, A)[::2]  # a request's seed does not depend on other prompts' calls
    assert seeds_of(6, A) != first[:1]
    assert seeds_of(5, GenerationRequest(prompt="What is 6 x 7?", n=2, temperature=0.5)) != first[:1]


def test_a_requests_own_seed_is_kept() -> None:
    own = GenerationRequest(prompt="x", seed=3)
    assert seeds_of(5, own) == [3]


async def test_tasks_started_in_the_run_share_its_seed_state() -> None:
    async def draw() -> int | None:
        return seeded(A).seed

    with run_seed(9):
        assert current_run_seed() == 9
        inside = await asyncio.gather(draw(), draw())
    assert len(set(inside)) == 2 and set(inside) == set(seeds_of(9, A, A))
    assert current_run_seed() is None


@pytest.mark.parametrize("bad", [-1, MAX_SEED + 1, 1.5, True, "7"])
def test_a_bad_run_seed_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="run seed"), run_seed(bad):  # type: ignore[arg-type]
        pass


def engine() -> FunctionEngine:
    return FunctionEngine(lambda request: ScriptedResponse(["The answer is 42."]))


async def test_a_seeded_pipeline_run_seeds_every_call_and_records_its_seed() -> None:
    llm = engine()
    pipeline = Pipeline(llm, Adaptive(probe=2, stages=(4,)))
    events: list[Event] = []
    await pipeline.run("What is 6 x 7?", seed=11, listeners=[events.append])
    calls = [c.seed for c in llm.calls]
    assert len(calls) >= 1 and None not in calls
    await pipeline.run("What is 6 x 7?", seed=11)
    assert [c.seed for c in llm.calls[len(calls) :]] == calls
    await pipeline.run("What is 6 x 7?")
    assert llm.calls[-1].seed is None
    start = next(e for e in events if e.kind == "run_start")
    assert start.data["seed"] == 11


class NoSeeds(FunctionEngine):
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(per_request_seed=False)


async def test_a_seed_an_engine_cannot_honour_or_out_of_range_is_a_config_error() -> None:
    pipeline = Pipeline(NoSeeds(lambda request: ScriptedResponse(["42"])), SelfConsistency(n=2))
    with pytest.raises(ConfigError, match=r"policy engine .* does not"):
        await pipeline.run("q", seed=1)
    good = Pipeline(engine(), SelfConsistency(n=2))
    with pytest.raises(ConfigError, match="seed must be an integer"):
        await good.run("q", seed=-3)
    assert (await good.run("q", seed=MAX_SEED)).answer == "42"
