"""``branchwise eval`` and ``branchwise report``: the evaluation harness on the command line.

```
branchwise eval PIPELINE.yaml --benchmark gsm8k [--data PATH|URL --sha256 HEX] [--limit N] [--seed S]
                [--concurrency K] [--sweep thought.n=1,2,4 ...] [--out results.db] [--resume]
                [--max-tokens T --max-completion-tokens T --max-calls C --wall-clock S] [--progress auto|on|off]
branchwise report RESULTS.db [OTHER.db] [--out DIR] [--no-plots]
```

``eval`` builds one pipeline per configuration (the YAML with each ``--sweep`` combination applied as dotted-path
overrides; several ``--sweep`` flags make the cartesian product). Unless the YAML sets them, the benchmark's
prompt (``thought.prompt.user``), grader (``verifiers.grader``) and extraction rules (``verifiers.extractor``)
are applied. Configurations whose engines are the same share one engine, built once. The YAML's ``budget``
caps each problem; the ``--max-*`` flags cap the whole evaluation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["add_commands", "benchmark_overrides", "pipeline_configs", "pipeline_solver"]

logger = logging.getLogger(__name__)


def add_commands(subparsers: Any) -> None:
    """Register ``eval`` and ``report`` on the ``branchwise`` command's subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate a pipeline on a benchmark (resumable results store)")
    ev.add_argument("pipeline", metavar="PIPELINE.yaml")
    ev.add_argument("--benchmark", required=True, help="benchmark name (gsm8k, math500, ..., arithmetic, multihop)")
    ev.add_argument("--data", help="benchmark file or http(s) URL (default: $BRANCHWISE_BENCHMARKS/<standard name>)")
    ev.add_argument("--sha256", help="expected sha256 of the data (required for URLs)")
    ev.add_argument("--limit", type=int, help="first N problems (generated sets: how many to generate)")
    ev.add_argument("--seed", type=int, default=0, help="seed of generated benchmarks (default 0)")
    ev.add_argument("--concurrency", type=int, default=4, help="problems in flight at once (default 4)")
    ev.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one configuration per value (repeatable)"
    )
    ev.add_argument("--out", help="results file (default results/<pipeline>-<benchmark>.db)")
    ev.add_argument("--resume", action="store_true", help="continue: skip problems that already have a result")
    ev.add_argument("--max-tokens", type=int, help="cap on all tokens of the whole evaluation")
    ev.add_argument("--max-completion-tokens", type=int, help="cap on generated tokens of the whole evaluation")
    ev.add_argument("--max-calls", type=int, help="cap on engine calls of the whole evaluation")
    ev.add_argument("--wall-clock", type=float, help="seconds the whole evaluation may take")
    ev.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="progress bar (auto: on a tty)")
    ev.add_argument("--no-hash", action="store_true", help="do not hash the model weights for the record")
    ev.add_argument(
        "--traces",
        action="store_true",
        help="keep the YAML's outputs.trace (one JSONL trace per problem); off by default",
    )
    ev.set_defaults(func=_eval)

    rep = subparsers.add_parser("report", help="Markdown + HTML report of results (or a comparison of two)")
    rep.add_argument("results", metavar="RESULTS.db")
    rep.add_argument("other", metavar="OTHER.db", nargs="?", help="a second results file to compare with")
    rep.add_argument("--out", help="output folder (default: next to RESULTS, named <results>-report)")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.set_defaults(func=_report)


def benchmark_overrides(raw: Mapping[str, Any], benchmark: Any) -> dict[str, Any]:
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
    spec: Any, benchmark: Any, sweeps: Sequence[str], *, traces: bool = False
) -> list[tuple[str, dict[str, Any], Any]]:
    """One (label, overrides, spec) per sweep combination, every spec validated before anything runs.

    The pipeline's live progress is turned off (the evaluation has its own), and so are its per-run traces unless
    ``traces`` (an evaluation of 1,000 problems would otherwise write 1,000 trace files).
    """
    from .runner import parse_sweep

    defaults = benchmark_overrides(spec.raw(), benchmark)
    defaults["outputs.progress"] = "off"
    if not traces:
        defaults["outputs.trace"] = None
    out = []
    for combo in parse_sweep(sweeps):
        label = " ".join(f"{k}={v}" for k, v in combo.items()) or (spec.name or "pipeline")
        overrides = {**defaults, **combo}
        out.append((label, combo, spec.with_overrides(overrides)))
    return out


def _engine_key(spec: Any) -> str:
    return json.dumps({"engines": spec.raw().get("engines"), "engine": spec.raw().get("engine"),
                       "runtime": spec.raw().get("runtime")}, sort_keys=True, default=str)  # fmt: skip


def _eval(args: argparse.Namespace) -> int:
    from ..orchestrator.spec import load_spec
    from .datasets import load_benchmark

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    benchmark = load_benchmark(args.benchmark, args.data, args.limit, sha256=args.sha256, seed=args.seed)
    spec = load_spec(args.pipeline)
    configs = pipeline_configs(spec, benchmark, args.sweep, traces=args.traces)
    out = Path(args.out) if args.out else Path("results") / f"{Path(args.pipeline).stem}-{benchmark.name}.db"
    code = asyncio.run(_eval_async(args, benchmark, configs, out))
    print(out)
    return code


async def _eval_async(args: argparse.Namespace, benchmark: Any, configs: list[tuple[str, dict[str, Any], Any]],
                      out: Path) -> int:  # fmt: skip
    from ..orchestrator.budget import Budget
    from ..orchestrator.pipeline import Pipeline, build_engines
    from .metrics import summarize
    from .repro import reproducibility_record
    from .runner import EvalConfig, LineProgress, ProgressSink, RichProgress, make_progress, run_eval
    from .store import ResultsStore

    budget = Budget(
        max_tokens=args.max_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_calls=args.max_calls,
        wall_clock_s=args.wall_clock,
        name="eval",
    )
    progress: ProgressSink
    if args.progress == "on":
        progress = RichProgress()
    elif args.progress == "off":
        progress = LineProgress(every=10)
    else:
        progress = make_progress()
    # Configurations with the same engine section share one engine (built once, closed at the end of the group).
    groups: dict[str, list[tuple[str, dict[str, Any], Any]]] = {}
    for item in configs:
        groups.setdefault(_engine_key(item[2]), []).append(item)
    stopped = False
    with ResultsStore(out) as store:
        for group in groups.values():
            resolved = group[0][2].resolved()
            engines = build_engines(resolved)
            pipelines: list[Pipeline] = []
            try:
                for engine in engines.values():
                    await engine.start()
                eval_configs = []
                for label, combo, cspec in group:
                    pipeline = Pipeline.from_spec(cspec, engines=engines)
                    pipelines.append(pipeline)
                    params = {"spec": cspec.redacted(), "sweep": combo}
                    eval_configs.append(EvalConfig(label, pipeline_solver(pipeline), params))
                repro = reproducibility_record(
                    engines=engines,
                    seeds={"runtime.seed": resolved.runtime.seed, "benchmark.seed": args.seed},
                    settings={
                        "benchmark": benchmark.name,
                        "data": benchmark.source,
                        "data_sha256": benchmark.sha256,
                        "problems": len(benchmark.problems),
                        "concurrency": args.concurrency,
                        "max_num_seqs": resolved.runtime.max_num_seqs,
                        "dtype": resolved.runtime.dtype,
                        "sweep": list(args.sweep),
                        "eval_budget": {k: getattr(budget, k) for k in ("max_tokens", "max_completion_tokens",
                                                                        "max_calls", "wall_clock_s")},
                        "pipeline": str(args.pipeline),
                    },
                    hash_weights=not args.no_hash,
                )  # fmt: skip
                summary = await run_eval(
                    benchmark,
                    eval_configs,
                    store,
                    concurrency=args.concurrency,
                    budget=budget,
                    resume=args.resume,
                    progress=progress,
                    repro=repro,
                    argv=["branchwise", *sys.argv[1:]],
                )
            finally:
                for pipeline in pipelines:
                    await pipeline.aclose()
                for engine in engines.values():
                    await engine.aclose()
            stopped = stopped or summary.stopped_by_budget
            for cs in summary.configs:
                metrics = summarize(store.rows(cs.config_id), curves=False)
                lo, hi = metrics.ci
                sys.stderr.write(
                    f"[eval] {cs.label}: {metrics.correct}/{metrics.n} right ({metrics.accuracy:.1%}, 95% CI "
                    f"{lo:.1%}-{hi:.1%}), {metrics.completion_tokens:,} completion tokens, {cs.errors} failed\n"
                )
            if stopped:
                break
    if stopped:
        sys.stderr.write(f"[eval] the evaluation budget ran out ({budget.exhausted_cap}); --resume continues\n")
        return 1
    return 0


def pipeline_solver(pipeline: Any) -> Any:
    """A runner ``solve`` over a pipeline: the run gets a budget with the pipeline's per-run caps, charged to the
    problem's budget (and so to the evaluation's)."""
    from .datasets import Problem

    caps = {k: v for k, v in pipeline.caps.items() if v is not None}

    async def solve(problem: Problem, budget: Any) -> Any:
        run_budget = budget.child("run", **caps) if caps else budget
        return await pipeline.run(problem.question, budget=run_budget)

    return solve


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    results = Path(args.results)
    out = Path(args.out) if args.out else results.with_name(results.stem + "-report")
    md, page = write_report(results, args.other, out_dir=out, plots=not args.no_plots)
    print(md)
    print(page)
    return 0
