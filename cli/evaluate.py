"""``branchwise eval`` and ``branchwise report``: the evaluation harness on the command line.

```
branchwise eval PIPELINE.yaml [MORE.yaml ...] --benchmark gsm8k [--data PATH|URL --sha256 HEX] [--limit N]
                [--offset K] [--seed S] [--concurrency K] [--sweep thought.n=1,2,4 ...] [--out results.db] [--resume]
                [--max-tokens T --max-completion-tokens T --max-calls C --wall-clock S] [--progress auto|on|off]
                [--ray [ADDRESS] --replicas K [--replica-cpus C] [--replica-gpus G] [--max-tries T]]
branchwise report RESULTS.db [OTHER.db] [--out DIR] [--no-plots] [--json [--baseline LABEL]]
```

``eval`` builds one pipeline per configuration (the YAML with each ``--sweep`` combination applied as dotted-path
overrides; several ``--sweep`` flags make the cartesian product). Unless the YAML sets them, the benchmark's
prompt (``thought.prompt.user``), grader (``verifiers.grader``) and extraction rules (``verifiers.extractor``)
are applied. Configurations whose engines are the same share one engine, built once. The YAML's ``budget``
caps each problem; the ``--max-*`` flags cap the whole evaluation. With several pipelines, each one's
configurations are labelled with its ``name`` (or file name); pipelines on one ``replay`` bank then compare their
strategies on identical samples (the bank starts over for every configuration).

With ``--ray`` the problems are solved on Ray actors (`branchwise.distributed`), one per engine replica, each
building the pipeline's engines on its node and running ``--concurrency`` problems at a time; this process
commits every row as it arrives (the store's only writer), so ``--resume`` and ``report`` work as usual. GPUs per
replica come from ``--replica-gpus``, else from the spec's vLLM ``tensor_parallel_size`` x
``pipeline_parallel_size``; CPUs from ``--replica-cpus``, else from the vLLM engines' ``cpu_cores``, else 1.
The evaluation-wide ``--max-*`` caps are not available with ``--ray`` (the YAML's per-problem ``budget`` is).

``report --json`` prints one JSON object instead (`branchwise.evals.report.summary_json`): every configuration's
figures and, in ``paired``, each other configuration against ``--baseline`` (default: the first stored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..budget import Budget
from ..distributed import RayDispatcher, ReplicaOptions, connect, replica_cpus, replica_gpus, require_ray
from ..distributed.pool import MAX_REPLICAS
from ..errors import ConfigError
from ..evals.datasets import Benchmark, load_benchmark
from ..evals.metrics import ConfigMetrics, summarize
from ..evals.pipelines import EvalSettings, PipelineConfig, evaluate_pipelines, pipeline_configs
from ..evals.report import summary_json, write_report
from ..evals.runner import LineProgress, ProgressSink, RichProgress, make_progress
from ..evals.store import ResultsStore
from ..orchestrator.spec import PipelineSpec, load_spec_file
from ..search.registry import MAX_CONCURRENCY
from .args import bounded_int, existing_file

__all__ = ["MAX_CONFIGURATIONS", "MAX_PROBLEMS", "add_commands", "summary_table"]

MAX_PROBLEMS = 1_000_000
"""Upper bound of ``--limit``."""
MAX_CONFIGURATIONS = 256
"""Upper bound of the configurations the ``--sweep`` flags make together (the product of their value counts)."""


def add_commands(subparsers: Any) -> None:
    """Register ``eval`` and ``report`` on the ``branchwise`` command's subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate a pipeline on a benchmark (resumable results store)")
    ev.add_argument("pipelines", metavar="PIPELINE.yaml", type=Path, nargs="+", help="one or more pipeline specs")
    ev.add_argument("--benchmark", required=True, help="benchmark name (gsm8k, math500, ..., arithmetic, multihop)")
    ev.add_argument("--data", help="benchmark file or http(s) URL (default: $BRANCHWISE_BENCHMARKS/<standard name>)")
    ev.add_argument("--sha256", help="expected sha256 of the data (required for URLs)")
    ev.add_argument(
        "--limit", type=bounded_int(1, MAX_PROBLEMS), help="N problems from --offset on (generated sets: how many)"
    )
    ev.add_argument(
        "--offset", type=bounded_int(0, MAX_PROBLEMS), default=0, help="position of the first problem (default 0)"
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of generated benchmarks (default 0)")
    ev.add_argument(
        "--concurrency",
        type=bounded_int(1, MAX_CONCURRENCY),
        default=4,
        help="problems in flight at once (with --ray: on each replica; default 4)",
    )
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
    dist = ev.add_argument_group("distributed (Ray; pip install 'branchwise[distributed]')")
    dist.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="solve problems on Ray actors, one per engine replica (ADDRESS: a cluster's HEAD_IP:6379, or auto: the "
        "one this node belongs to; none: this machine's, started if there is none)",
    )
    dist.add_argument(
        "--replicas", type=bounded_int(1, MAX_REPLICAS), default=2, help="--ray: engine replicas (default 2)"
    )
    dist.add_argument(
        "--replica-cpus", type=float, help="--ray: CPUs per replica (default: the spec's vLLM cpu_cores, else 1)"
    )
    dist.add_argument("--replica-gpus", type=float, help="--ray: GPUs per replica (default: from the spec, else 0)")
    dist.add_argument(
        "--max-tries",
        type=bounded_int(1, 100),
        default=3,
        help="--ray: a problem in flight on this many replicas that died is recorded as failed (default 3)",
    )
    ev.set_defaults(func=_eval)

    rep = subparsers.add_parser("report", help="Markdown + HTML report of results (or a comparison of two)")
    rep.add_argument("results", metavar="RESULTS.db", type=Path)
    rep.add_argument("other", metavar="OTHER.db", nargs="?", type=Path, help="a second results file to compare with")
    rep.add_argument("--out", help="output folder (default: next to RESULTS, named <results>-report)")
    rep.add_argument("--no-plots", action="store_true", help="tables only")
    rep.add_argument("--json", action="store_true", help="print the summary and paired comparisons as one JSON object")
    rep.add_argument("--baseline", metavar="LABEL", help="--json: the configuration the others are compared with")
    rep.set_defaults(func=_report)


def _check_sweep_size(sweeps: list[str]) -> None:
    size = 1
    for sweep in sweeps:
        _, _, values = sweep.partition("=")
        size *= max(1, len(dict.fromkeys(v.strip() for v in values.split(","))))
        if size > MAX_CONFIGURATIONS:
            raise ConfigError(f"--sweep makes more than {MAX_CONFIGURATIONS} configurations; sweep fewer values")


def _eval(args: argparse.Namespace) -> int:
    _check_sweep_size(args.sweep)
    specs = [load_spec_file(path) for path in args.pipelines]
    benchmark = load_benchmark(
        args.benchmark, args.data, args.limit, sha256=args.sha256, seed=args.seed, offset=args.offset
    )
    configs: list[PipelineConfig] = []
    for path, spec in zip(args.pipelines, specs, strict=True):
        prefix = (spec.name or path.stem) if len(specs) > 1 else None
        configs.extend(pipeline_configs(spec, benchmark, args.sweep, traces=args.traces, prefix=prefix))
    stem = "-".join(path.stem for path in args.pipelines[:3])
    out = Path(args.out) if args.out else Path("results") / f"{stem}-{benchmark.name}.db"
    if args.ray is None:
        code = asyncio.run(_eval_async(args, benchmark, configs, out, None))
    else:
        dispatcher = _ray_dispatcher(args, specs)
        connected = connect(args.ray or None)  # blocking: before the event loop starts
        try:
            code = asyncio.run(_eval_async(args, benchmark, configs, out, dispatcher))
        finally:
            if connected:
                require_ray().shutdown()
    print(out)
    return code


def _ray_dispatcher(args: argparse.Namespace, specs: Sequence[PipelineSpec]) -> RayDispatcher:
    require_ray()
    caps = [flag for flag in ("max_tokens", "max_completion_tokens", "max_calls", "wall_clock") if getattr(args, flag)]
    if caps:
        flags = ", ".join("--" + flag.replace("_", "-") for flag in caps)
        raise ConfigError(f"{flags}: evaluation-wide caps are not available with --ray (the YAML's budget is)")
    gpus = args.replica_gpus if args.replica_gpus is not None else max(replica_gpus(spec) for spec in specs)
    cpus = args.replica_cpus if args.replica_cpus is not None else max(replica_cpus(spec) for spec in specs)
    options = ReplicaOptions(
        replicas=args.replicas,
        num_cpus=cpus,
        num_gpus=gpus,
        concurrency=args.concurrency,
        max_tries=args.max_tries,
    )
    return RayDispatcher(options)


def _progress(choice: str) -> ProgressSink:
    if choice == "on":
        return RichProgress()
    if choice == "off":
        return LineProgress(every=10)
    return make_progress()


async def _eval_async(
    args: argparse.Namespace,
    benchmark: Benchmark,
    configs: list[PipelineConfig],
    out: Path,
    dispatcher: RayDispatcher | None,
) -> int:
    budget = Budget(
        max_tokens=args.max_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_calls=args.max_calls,
        wall_clock_s=args.wall_clock,
        name="eval",
    )
    settings = EvalSettings(
        concurrency=args.concurrency,
        resume=args.resume,
        progress=_progress(args.progress),
        hash_weights=not args.no_hash,
        seed=args.seed,
        record={"sweep": list(args.sweep), "pipelines": [str(p) for p in args.pipelines], **_ray_record(args)},
        argv=["branchwise", *sys.argv[1:]],
        dispatcher=dispatcher,
    )
    with ResultsStore(out) as store:
        summaries = await evaluate_pipelines(benchmark, configs, store, budget, settings)
        rows = [
            (cs.label, summarize(store.rows(cs.config_id), curves=False), cs.errors)
            for summary in summaries
            for cs in summary.configs
        ]
    sys.stderr.write(summary_table(rows))
    if any(summary.stopped_by_budget for summary in summaries):
        sys.stderr.write(f"[eval] the evaluation budget ran out ({budget.exhausted_cap}); --resume continues\n")
        return 1
    return 0


def _ray_record(args: argparse.Namespace) -> dict[str, Any]:
    if args.ray is None:
        return {}
    return {"ray": {"address": args.ray or None, "replicas": args.replicas, "max_tries": args.max_tries}}


def summary_table(rows: Sequence[tuple[str, ConfigMetrics, int]]) -> str:
    """The table ``eval`` prints at the end: per configuration (label, metrics, failed problems) its accuracy with
    the 95% interval, prompt, completion and total tokens, total tokens relative to the first configuration, and
    the wall time its problems took."""
    head = ("configuration", "right", "accuracy (95% CI)", "prompt tok", "completion tok", "total tok", "vs first",
            "wall time", "failed")  # fmt: skip
    first = rows[0][1].prompt_tokens + rows[0][1].completion_tokens if rows else 0
    table = []
    for label, m, failed in rows:
        total = m.prompt_tokens + m.completion_tokens
        lo, hi = m.ci
        table.append((
            label, f"{m.correct}/{m.n}", f"{m.accuracy:.1%} ({lo:.1%}-{hi:.1%})", f"{m.prompt_tokens:,}",
            f"{m.completion_tokens:,}", f"{total:,}", f"{total / first:.2f}x" if first else "-",
            f"{m.wall_time_s:.1f} s", str(failed),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in (head, *table)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in (head, *table)]  # fmt: skip
    return "".join(f"[eval] {line.rstrip()}\n" for line in lines)


def _report(args: argparse.Namespace) -> int:
    results: Path = args.results
    for path in (results, args.other):
        if path is not None:
            existing_file(path, "results file")
    if args.json:
        print(json.dumps(summary_json(results, baseline=args.baseline)))
        return 0
    out = Path(args.out) if args.out else results.with_name(results.stem + "-report")
    md, page = write_report(results, args.other, out_dir=out, plots=not args.no_plots)
    print(md)
    print(page)
    return 0
