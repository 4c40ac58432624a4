"""Evaluations and batches of pipeline runs on Ray actors, one per engine replica.

Each actor (`Replica`) builds the pipeline's engines from the spec on its own node, with the resources Ray
reserved for it, and solves problems (or runs queries) ``concurrency`` at a time with the same per-problem code
as a local evaluation (`branchwise.evals.runner.ProblemSolver`: solve, grade, build the row). Rows come back to
the driver, which alone writes the results store, committing each as it arrives; `--resume`, crash safety and
the reports therefore work as they do for a local run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..budget import Budget
from ..errors import BranchwiseError, ConfigError
from ..evals.datasets import Benchmark, Problem
from ..evals.pipelines import PipelineConfig, RemoteGroup, built_group
from ..evals.repro import engine_record
from ..evals.runner import ConfigRun, Deliver, EvalConfig, ProblemSolver, failed_row
from ..evals.store import ConfigRecord, ResultRow
from ..orchestrator.pipeline import Pipeline, RunResult
from ..orchestrator.spec import PipelineSpec, load_spec_file
from .pool import ReplicaOptions, ReplicaPool, connect, require_ray

__all__ = ["BatchOutcome", "RayDispatcher", "Replica", "replica_cpus", "replica_gpus", "run_batch"]


class Replica:
    """The work of one engine replica, inside a Ray actor: `start_eval` then `solve`, or `start_pipeline` then
    `run`; `stop` closes the engines (killing the actor does too, with its process)."""

    def __init__(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self._configs: dict[str, EvalConfig] = {}
        self._solver: ProblemSolver | None = None
        self._pipeline: Pipeline | None = None

    async def start_eval(
        self, benchmark: Benchmark, group: Sequence[PipelineConfig], hash_weights: bool
    ) -> dict[str, dict[str, Any]]:
        """Build the group's engines and pipelines; returns the engines' reproducibility records by role."""
        built = await self._stack.enter_async_context(built_group(group))
        self._configs = {config.label: config for config in built.configs}
        # The evaluation's global caps are the driver's business; each problem still runs under its own budget.
        self._solver = ProblemSolver(Budget(name="replica"), benchmark.make_grader())
        return {role: engine_record(e, hash_weights=hash_weights) for role, e in built.engines.items()}

    async def solve(
        self, label: str, record: ConfigRecord, problem: Problem, origin: float, run_id: int
    ) -> ResultRow | None:
        """Solve, grade and build the row of one problem of configuration ``label``."""
        if self._solver is None:
            raise ConfigError("Replica.solve before start_eval")
        return await self._solver.solve_one(problem, self._configs[label], record, origin=origin, run_id=run_id)

    async def start_pipeline(self, spec: PipelineSpec) -> dict[str, dict[str, Any]]:
        """Build and start the pipeline of ``spec``; returns its engines' records by role."""
        pipeline = Pipeline.from_spec(spec)
        self._stack.push_async_callback(pipeline.aclose)
        await pipeline.start()
        self._pipeline = pipeline
        return {role: engine_record(e, hash_weights=False) for role, e in pipeline.engines.items()}

    async def run(self, query: str, seed: int | None) -> tuple[RunResult | None, str | None]:
        """Run one query: its result, or None and the error that stopped it."""
        if self._pipeline is None:
            raise ConfigError("Replica.run before start_pipeline")
        try:
            return await self._pipeline.run(query, seed=seed), None
        except BranchwiseError as err:
            return None, f"{type(err).__name__}: {err}"

    async def stop(self) -> None:
        """Close the engines and pipelines."""
        await self._stack.aclose()


@functools.cache
def _actor_class() -> Any:
    return require_ray().remote(Replica)


def _make_actor(**options: Any) -> Any:
    return _actor_class().options(**options).remote()


def _stop(actor: Any) -> Any:
    return actor.stop.remote()


def replica_gpus(spec: PipelineSpec) -> float:
    """GPUs one replica of ``spec`` needs, read from its vLLM engines' parallelism (``tensor_parallel_size`` x
    ``pipeline_parallel_size``, summed over engines that set either); 0 when none does (then say ``--replica-gpus``
    or `ReplicaOptions.num_gpus`)."""
    total = 0.0
    for engine in spec.resolved().engines.values():
        options = engine.options
        if engine.backend == "vllm" and ({"tensor_parallel_size", "pipeline_parallel_size"} & set(options)):
            total += int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1))
    return total


def replica_cpus(spec: PipelineSpec) -> float:
    """CPUs one replica of ``spec`` needs: the cores its vLLM engines bind (``cpu_cores``, e.g. "0-3,6"), or 1
    when none sets them (then say ``--replica-cpus`` or `ReplicaOptions.num_cpus`)."""
    cores: set[int] = set()
    for engine in spec.resolved().engines.values():
        listed = engine.options.get("cpu_cores") if engine.backend == "vllm" else None
        for part in str(listed).split(",") if listed else ():
            first, _, last = part.partition("-")
            cores.update(range(int(first), int(last or first) + 1))
    return float(len(cores) or 1)


def _check_distributable(spec: PipelineSpec) -> None:
    replays = [role for role, e in spec.resolved().engines.items() if e.backend == "replay"]
    if replays:
        raise ConfigError(
            f"a replay engine ({', '.join(replays)}) serves its bank's samples in one order to one process; "
            "evaluate replay pipelines without --ray"
        )


@dataclass
class _PoolDispatch:
    """A `branchwise.evals.runner.Dispatch` over a started pool of `Replica` actors."""

    pool: ReplicaPool[Problem, ResultRow | None]

    async def run(self, job: ConfigRun, deliver: Deliver) -> bool:
        label, record, origin, run_id = job.config.label, job.record, job.origin, job.run_id

        async def on_lost(problem: Problem, reason: str) -> bool:
            return await deliver(failed_row(problem, record, reason, run_id=run_id))

        return await self.pool.map(
            job.pending,
            lambda actor, problem: actor.solve.remote(label, record, problem, origin, run_id),
            lambda _problem, row: deliver(row),
            on_lost,
        )


@dataclass
class RayDispatcher:
    """Solves an evaluation's problems on Ray actors (a `branchwise.evals.pipelines.GroupDispatcher`): for each
    group of configurations sharing their engines, ``options.replicas`` actors each build the engines and run
    ``options.concurrency`` problems at a time; the evaluating process commits the rows.

    Connect to Ray first (`branchwise.distributed.connect`).

    Attributes:
        options: replicas, their resources, concurrency and fault handling.
        pools: the pool of each group opened so far (its ``deaths`` and ``restarts_left`` say what happened).
    """

    options: ReplicaOptions
    pools: list[ReplicaPool[Problem, ResultRow | None]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def open(
        self, benchmark: Benchmark, group: Sequence[PipelineConfig], *, hash_weights: bool
    ) -> AsyncIterator[RemoteGroup]:
        """Start the group's actors (each builds its engines), yield their dispatch, and kill them on exit."""
        _check_distributable(group[0].spec)
        ray = require_ray()
        shared = await asyncio.to_thread(ray.put, benchmark)  # sent to the object store once, not per actor
        configs = list(group)
        pool: ReplicaPool[Problem, ResultRow | None] = ReplicaPool(
            self.options, _make_actor, lambda actor: actor.start_eval.remote(shared, configs, hash_weights), _stop
        )
        self.pools.append(pool)
        async with pool:
            yield RemoteGroup(_PoolDispatch(pool), pool.started[0] if pool.started else {})


@dataclass(frozen=True)
class BatchOutcome:
    """One query of `run_batch`: its result, or the error that stopped it (a pipeline error, or ``ReplicaLost``
    when the actors running it kept dying)."""

    query: str
    result: RunResult | None
    error: str | None = None


async def run_batch(
    spec: PipelineSpec | str | Path,
    queries: Sequence[str],
    options: ReplicaOptions | None = None,
    *,
    address: str | None = None,
    seed: int | None = None,
    init: Mapping[str, Any] | None = None,
) -> list[BatchOutcome]:
    """Run ``Pipeline.run`` on every query, spread over Ray actors that each build the pipeline from ``spec``.

    Args:
        spec: a pipeline spec, or the path of its YAML file.
        queries: the queries; outcomes come back in the same order.
        options: replicas, their resources and concurrency (default: 2 replicas, 4 queries each at a time).
        address: the Ray cluster to join when this process is not connected yet (None: start one here).
        seed: passed to every run.
        init: more `ray.init` arguments when this call connects.
    """
    if isinstance(spec, (str, Path)):
        spec = load_spec_file(Path(spec))
    options = options if options is not None else ReplicaOptions()
    ray = require_ray()
    if not ray.is_initialized():
        await asyncio.to_thread(connect, address, **dict(init or {}))
    outcomes: list[BatchOutcome | None] = [None] * len(queries)
    items = list(enumerate(queries))

    async def on_result(item: tuple[int, str], answer: tuple[RunResult | None, str | None]) -> bool:
        outcomes[item[0]] = BatchOutcome(item[1], *answer)
        return True

    async def on_lost(item: tuple[int, str], reason: str) -> bool:
        outcomes[item[0]] = BatchOutcome(item[1], None, reason)
        return True

    frozen = spec
    pool: ReplicaPool[tuple[int, str], tuple[RunResult | None, str | None]] = ReplicaPool(
        options, _make_actor, lambda actor: actor.start_pipeline.remote(frozen), _stop
    )
    async with pool:
        await pool.map(items, lambda actor, item: actor.run.remote(item[1], seed), on_result, on_lost)
    return [o for o in outcomes if o is not None]
