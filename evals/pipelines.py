"""Evaluating YAML pipelines: benchmark defaults applied to a spec, sweep configurations, and a runner solver.

`pipeline_configs` turns one spec and its ``--sweep`` values into validated configurations; `evaluate_pipelines`
runs them on a benchmark, building each distinct engine section once, and records everything in a results store.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..budget import Budget
from ..engine.base import Engine
from ..engine.replay import ReplayEngine
from ..errors import ConfigError
from ..orchestrator.pipeline import Pipeline, RunResult, build_engines
from ..orchestrator.spec import PipelineSpec
from .datasets import Benchmark, Problem
from .repro import reproducibility_record
from .runner import Dispatch, EvalConfig, EvalSummary, ProgressSink, Solve, parse_sweep, run_eval
from .store import ResultsStore

__all__ = [
    "EvalSettings",
    "GroupBuild",
    "GroupDispatcher",
    "PipelineConfig",
    "RemoteGroup",
    "benchmark_overrides",
    "built_group",
    "evaluate_pipelines",
    "group_params",
    "pipeline_configs",
    "pipeline_solver",
]


@dataclass(frozen=True)
class PipelineConfig:
    """One configuration of an evaluation: its label, the sweep values that made it, and its validated spec."""

    label: str
    sweep: dict[str, Any]
    spec: PipelineSpec


def benchmark_overrides(raw: Mapping[str, Any], benchmark: Benchmark) -> dict[str, Any]:
    """The benchmark's prompt, grader and extraction rules, for whichever of them the YAML does not set."""
    thought = raw.get("thought") or {}
    verifiers = raw.get("verifiers") or {}
    out: dict[str, Any] = {}
    # Mapping and list values: `with_overrides` parses plain strings as YAML, which a prompt is not.
    if not isinstance(thought, Mapping) or "prompt" not in thought:
        prompt = {"user": benchmark.prompt.user}
        if benchmark.prompt.system:
            prompt["system"] = benchmark.prompt.system
        out["thought.prompt"] = prompt
    if not isinstance(verifiers, Mapping) or "grader" not in verifiers:
        out["verifiers.grader"] = {"kind": benchmark.grader}
    if not isinstance(verifiers, Mapping) or "extractor" not in verifiers:
        names = [r for r in benchmark.extractor_rules if isinstance(r, str)]
        if not names:  # the custom QA / yes-no fallbacks have no spec name: keep the built-in ones
            names = ["boxed", "answer_is"]
        out["verifiers.extractor"] = names
    return out


def pipeline_configs(
    spec: PipelineSpec, benchmark: Benchmark, sweeps: Sequence[str], *, traces: bool = False, prefix: str | None = None
) -> list[PipelineConfig]:
    """One configuration per sweep combination, every spec validated before anything runs.

    Labels are the sweep values (``thought.n=4``), else the spec's name; with ``prefix`` (several pipelines in
    one evaluation), ``prefix`` followed by the sweep values.

    The pipeline's live progress is turned off (the evaluation has its own), and so are its per-run traces unless
    ``traces`` (an evaluation of 1,000 problems would otherwise write 1,000 trace files).
    """
    defaults = benchmark_overrides(spec.raw(), benchmark)
    defaults["outputs.progress"] = "off"
    if not traces:
        defaults["outputs.trace"] = None
    out = []
    for combo in parse_sweep(sweeps):
        swept = " ".join(f"{k}={v}" for k, v in combo.items())
        label = " ".join(part for part in (prefix, swept) if part) or (spec.name or "pipeline")
        out.append(PipelineConfig(label, dict(combo), spec.with_overrides({**defaults, **combo})))
    return out


def pipeline_solver(pipeline: Pipeline) -> Solve:
    """A runner ``solve`` over a pipeline: the run gets a budget with the pipeline's per-run caps, charged to the
    problem's budget (and so to the evaluation's)."""
    caps = {k: v for k, v in pipeline.caps.items() if v is not None}

    async def solve(problem: Problem, budget: Budget) -> RunResult:
        run_budget = budget.child("run", **caps) if caps else budget
        return await pipeline.run(problem.question, budget=run_budget)

    return solve


def _engine_key(spec: PipelineSpec) -> str:
    raw = spec.raw()
    return json.dumps(
        {"engines": raw.get("engines"), "engine": raw.get("engine"), "runtime": raw.get("runtime")},
        sort_keys=True,
        default=str,
    )


@dataclass
class GroupBuild:
    """The engines of a group of configurations (started) and the group's runner configurations over them."""

    engines: dict[str, Engine]
    configs: list[EvalConfig]


def group_params(config: PipelineConfig) -> dict[str, Any]:
    """What identifies a configuration in the store (its config id is a hash of this)."""
    return {"spec": config.spec.redacted(), "sweep": config.sweep}


@contextlib.asynccontextmanager
async def built_group(group: Sequence[PipelineConfig]) -> AsyncIterator[GroupBuild]:
    """Build and start the engines the configurations of ``group`` share (their engine sections are equal) and
    one pipeline per configuration; close them all on exit. Used in the evaluating process, and by workers that
    solve problems for it elsewhere (`branchwise.distributed`)."""
    resolved = group[0].spec.resolved()
    engines = build_engines(resolved)
    pipelines: list[Pipeline] = []
    try:
        for engine in engines.values():
            await engine.start()
        eval_configs = []
        replays = [engine for engine in engines.values() if isinstance(engine, ReplayEngine)]

        scales = {engine.time_scale for engine in replays} or {1.0}
        if len(scales) > 1:
            raise ConfigError(f"the replay engines of one pipeline must pace at one speedup, got {sorted(scales)}")
        (time_scale,) = scales

        async def start_over() -> None:
            for engine in replays:  # every configuration draws the same banked samples, in the same order
                engine.reset()

        for config in group:
            pipeline = Pipeline.from_spec(config.spec, engines=engines)
            pipelines.append(pipeline)
            prepare = start_over if replays else None
            solver = pipeline_solver(pipeline)
            eval_configs.append(
                EvalConfig(config.label, solver, group_params(config), prepare=prepare, time_scale=time_scale)
            )
        yield GroupBuild(engines, eval_configs)
    finally:
        for pipeline in pipelines:
            await pipeline.aclose()
        for engine in engines.values():
            await engine.aclose()


@dataclass(frozen=True)
class RemoteGroup:
    """A group's configurations solved elsewhere: the `Dispatch` that solves them and the records of the engines
    (`branchwise.evals.repro.engine_record`, by role) that its workers built."""

    dispatch: Dispatch
    engines: dict[str, dict[str, Any]]


class GroupDispatcher(Protocol):
    """Solves the problems of each group of configurations somewhere else (e.g. on Ray actors, one per engine
    replica); the evaluating process stays the only writer of the results store."""

    def open(
        self, benchmark: Benchmark, group: Sequence[PipelineConfig], *, hash_weights: bool
    ) -> contextlib.AbstractAsyncContextManager[RemoteGroup]:
        """Start the workers of ``group`` (each builds its engines from the specs) and stop them on exit."""
        ...


@dataclass
class EvalSettings:
    """How `evaluate_pipelines` runs: concurrency, resuming, progress, and what goes into the reproducibility
    record (``record``: extra settings, e.g. the command-line sweep; ``seed``: the benchmark generator's seed).
    With ``dispatcher`` the problems are solved by its workers (``concurrency`` at a time on each), not here."""

    concurrency: int = 4
    resume: bool = False
    progress: ProgressSink | None = None
    hash_weights: bool = True
    seed: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    argv: list[str] | None = None
    dispatcher: GroupDispatcher | None = None


async def evaluate_pipelines(
    benchmark: Benchmark,
    configs: Sequence[PipelineConfig],
    store: ResultsStore,
    budget: Budget,
    settings: EvalSettings,
) -> list[EvalSummary]:
    """Run every configuration on the benchmark; configurations with the same engine section share one engine
    (built once, closed when its group is done). Stops after the group in which ``budget`` ran out."""
    groups: dict[str, list[PipelineConfig]] = {}
    for config in configs:
        groups.setdefault(_engine_key(config.spec), []).append(config)
    summaries = []
    for group in groups.values():
        summary = await _evaluate_group(benchmark, group, store, budget, settings)
        summaries.append(summary)
        if summary.stopped_by_budget:
            break
    return summaries


async def _evaluate_group(
    benchmark: Benchmark,
    group: Sequence[PipelineConfig],
    store: ResultsStore,
    budget: Budget,
    settings: EvalSettings,
) -> EvalSummary:
    if settings.dispatcher is not None:
        remote = [EvalConfig(config.label, None, group_params(config)) for config in group]
        async with settings.dispatcher.open(benchmark, group, hash_weights=settings.hash_weights) as opened:
            repro = _repro(benchmark, group, budget, settings, {})
            repro["engines"] = opened.engines
            return await _run(benchmark, remote, store, budget, settings, repro=repro, dispatch=opened.dispatch)
    async with built_group(group) as built:
        repro = _repro(benchmark, group, budget, settings, built.engines)
        return await _run(benchmark, built.configs, store, budget, settings, repro=repro, dispatch=None)


def _repro(
    benchmark: Benchmark,
    group: Sequence[PipelineConfig],
    budget: Budget,
    settings: EvalSettings,
    engines: Mapping[str, Engine],
) -> dict[str, Any]:
    resolved = group[0].spec.resolved()
    return reproducibility_record(
        engines=engines,
        seeds={"runtime.seed": resolved.runtime.seed, "benchmark.seed": settings.seed},
        settings={
            "benchmark": benchmark.name,
            "data": benchmark.source,
            "data_sha256": benchmark.sha256,
            "problems": len(benchmark.problems),
            "concurrency": settings.concurrency,
            "max_num_seqs": resolved.runtime.max_num_seqs,
            "dtype": resolved.runtime.dtype,
            "eval_budget": {
                k: getattr(budget, k) for k in ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock_s")
            },
            **settings.record,
        },
        hash_weights=settings.hash_weights,
    )


async def _run(
    benchmark: Benchmark,
    configs: Sequence[EvalConfig],
    store: ResultsStore,
    budget: Budget,
    settings: EvalSettings,
    *,
    repro: Mapping[str, Any],
    dispatch: Dispatch | None,
) -> EvalSummary:
    return await run_eval(
        benchmark,
        configs,
        store,
        concurrency=settings.concurrency,
        budget=budget,
        resume=settings.resume,
        progress=settings.progress,
        repro=repro,
        argv=settings.argv or (),
        dispatch=dispatch,
    )
