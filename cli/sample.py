"""``branchwise sample``: draw a trace bank (N traces per problem) with a pipeline's prompt and sampling settings.

```
branchwise sample PIPELINE.yaml --benchmark gsm8k --n 16 --out banks/gsm8k-qwen0.5b
                  [--data PATH] [--limit N] [--offset K] [--concurrency C] [--chunk-size P] [--logprobs K]
```

The bank is a folder of chunk files (``chunk-0000.db`` ...: problems ``[k * P, (k + 1) * P)`` of the benchmark),
each committed problem by problem; running the same command again resumes (problems with N traces are skipped).
A chunk reported complete never changes again and can be committed to git. The ``replay`` engine serves the bank
(see `branchwise.engine.replay`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from ..engine.tracebank import TraceBank
from ..evals.bank import DEFAULT_CHUNK_SIZE, draw_pipeline_bank
from ..search.registry import MAX_CONCURRENCY, MAX_SAMPLES, MAX_TOP_LOGPROBS
from .args import bounded_int, existing_file
from .evaluate import MAX_PROBLEMS

__all__ = ["add_commands"]


def add_commands(subparsers: Any) -> None:
    """Register ``sample`` on the ``branchwise`` command's subparsers."""
    sp = subparsers.add_parser("sample", help="draw a trace bank: N traces per problem, stored for replay")
    sp.add_argument("pipeline", metavar="PIPELINE.yaml", type=Path)
    sp.add_argument("--benchmark", required=True, help="benchmark name (gsm8k, math500, ..., arithmetic, multihop)")
    sp.add_argument("--n", type=bounded_int(1, MAX_SAMPLES), required=True, help="traces per problem")
    sp.add_argument("--out", required=True, metavar="BANK", help="bank folder (chunk files; resumed if it exists)")
    sp.add_argument("--data", help="benchmark file or http(s) URL (default: $BRANCHWISE_BENCHMARKS/<standard name>)")
    sp.add_argument("--limit", type=bounded_int(1, MAX_PROBLEMS), help="problems to draw (default: all after --offset)")
    sp.add_argument("--offset", type=bounded_int(0), default=0, help="position of the first problem (default 0)")
    sp.add_argument("--seed", type=int, default=0, help="seed of generated benchmarks (default 0)")
    sp.add_argument(
        "--concurrency", type=bounded_int(1, MAX_CONCURRENCY), default=4, help="problems in flight at once (default 4)"
    )
    sp.add_argument(
        "--chunk-size",
        type=bounded_int(1, MAX_PROBLEMS),
        default=DEFAULT_CHUNK_SIZE,
        help=f"problems per chunk file ({DEFAULT_CHUNK_SIZE})",
    )
    sp.add_argument(
        "--logprobs",
        type=bounded_int(0, MAX_TOP_LOGPROBS),
        help="top-k alternatives per token (default: the strategy's, else 5)",
    )
    sp.add_argument("--no-hash", action="store_true", help="do not hash the model weights for the record")
    sp.set_defaults(func=_sample)


def _sample(args: argparse.Namespace) -> int:
    existing_file(args.pipeline, "pipeline spec")

    def say(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    summary = asyncio.run(
        draw_pipeline_bank(
            args.pipeline, args.benchmark, args.out, n=args.n, data=args.data, limit=args.limit,
            offset=args.offset, concurrency=args.concurrency, chunk_size=args.chunk_size, logprobs=args.logprobs,
            seed=args.seed, hash_weights=not args.no_hash, argv=["branchwise", *sys.argv[1:]], progress=say,
        )
    )  # fmt: skip
    bank = TraceBank(args.out)
    stats = bank.stats()
    bank.close()
    say(
        f"[sample] drew {summary.drawn} problems ({summary.samples} traces, {summary.tokens:,} tokens, "
        f"{summary.tokens_per_s:.1f} tok/s) in {summary.seconds:.0f} s; {summary.skipped} already done, "
        f"{len(summary.failed)} failed"
    )
    say(
        f"[sample] bank: {stats.problems} problems, {stats.samples} traces, {stats.tokens:,} tokens, "
        f"{stats.bytes / 1e6:.2f} MB ({stats.bytes_per_100k_tokens / 1e6:.2f} MB per 100k tokens)"
    )
    print(args.out)
    return 1 if summary.failed else 0
