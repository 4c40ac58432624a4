"""The evaluation harness: benchmarks, a concurrent resumable runner, a crash-safe results store, metrics, reports.

- `datasets`: the `Problem` / `Benchmark` models, `load_benchmark` for GSM8K, MATH-500, AIME 2024, AMC 2023,
  NQ-open, TriviaQA and StrategyQA (local JSONL or a sha256-verified, cached URL), and the generated sets
  ``arithmetic`` (`arithmetic`) and ``multihop`` (`multihop`).
- `runner`: `run_eval` runs configurations x problems concurrently under one budget; `strategy_solver` adapts a
  search strategy, `pipelines.pipeline_solver` a YAML pipeline.
- `store`: `ResultsStore`, SQLite in WAL mode, one row per (configuration, problem), one transaction per row.
- `metrics`: accuracy with Wilson intervals, pass@k / maj@k / weighted@k from one pool of samples, costs,
  paired comparisons (McNemar).
- `report`: Markdown and self-contained HTML reports with plots; `repro`: the reproducibility record.
- `pipelines`: YAML pipelines evaluated on a benchmark (`evaluate_pipelines`, used by ``branchwise eval``).
"""

from __future__ import annotations

from .datasets import Benchmark, Problem, available_benchmarks, load_benchmark
from .metrics import ConfigMetrics, compare, pass_at_k, summarize, wilson_interval
from .report import build_report, write_report
from .repro import reproducibility_record
from .runner import EvalConfig, EvalSummary, run_eval, strategy_solver
from .store import ResultRow, ResultsStore

__all__ = [
    "Benchmark",
    "ConfigMetrics",
    "EvalConfig",
    "EvalSummary",
    "Problem",
    "ResultRow",
    "ResultsStore",
    "available_benchmarks",
    "build_report",
    "compare",
    "load_benchmark",
    "pass_at_k",
    "reproducibility_record",
    "run_eval",
    "strategy_solver",
    "summarize",
    "wilson_interval",
    "write_report",
]
