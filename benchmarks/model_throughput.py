"""Decode throughput of an offline model in the embedded engine: sequences in flight x precision.

For each precision (float32, bfloat16) one `VLLMEngine` is started; for each batch size B it generates B samples
of T tokens (one request with n=B, ``ignore_eos`` so every sample has exactly T tokens) after a warm-up request
of the same shape. Figures per cell: total tokens/s, tokens/s per sequence, time to first token, and the engine
process tree's resident memory after the run. The ratio float32/bfloat16 is reported per batch size.

    python benchmarks/model_throughput.py [--quick] [--model qwen2.5-coder-1.5b-instruct] [--batches 1,8,32]
        [--tokens 64] [--dtypes float32,bfloat16]

``--quick``: SmolLM2-135M, batches 1 and 8, 16 tokens, float32 only. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from branchwise.engine import GenerationRequest
from branchwise.engine.vllm_engine import VLLMEngine

PROMPT = "Write a long, detailed story about a lighthouse keeper and the ships that pass in the night."


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        stack.extend(int(c) for c in children)
    return total / 1024


async def one_batch(engine: VLLMEngine, batch: int, tokens: int) -> dict[str, float]:
    request = GenerationRequest(prompt=PROMPT, n=batch, max_tokens=tokens, ignore_eos=True, temperature=0.8)
    started = time.perf_counter()
    first: float | None = None
    count = 0
    async for delta in engine.stream(request):
        if first is None and delta.token_ids:
            first = time.perf_counter() - started
        count += len(delta.token_ids)
    seconds = time.perf_counter() - started
    return {"tokens": count, "seconds": seconds, "ttft_s": first or seconds}


async def measure(model: str, dtype: str, batches: list[int], tokens: int) -> list[dict[str, Any]]:
    rows = []
    async with VLLMEngine(model, dtype=dtype, max_model_len=1024, max_num_seqs=max(batches)) as engine:
        for batch in batches:
            await one_batch(engine, batch, min(tokens, 8))  # warm-up: same batch shape, short
            run = await one_batch(engine, batch, tokens)
            decode_s = max(run["seconds"] - run["ttft_s"], 1e-9)
            rows.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "tokens": run["tokens"],
                    "tok_s": run["tokens"] / run["seconds"],
                    "tok_s_per_seq": (run["tokens"] - batch) / decode_s / batch,
                    "ttft_s": run["ttft_s"],
                    "rss_mb": tree_rss_mb(os.getpid()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2, batches 1 and 8, 16 tokens, float32")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if args.quick:
        args.model, args.batches, args.tokens, args.dtypes = "smollm2-135m-instruct", "1,8", 16, "float32"
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes.split(","):
        rows.extend(asyncio.run(measure(args.model, dtype, batches, args.tokens)))
    table = Table(title=f"{args.model}: decode throughput ({args.tokens} tokens per sample)")
    for column in ("dtype", "sequences", "tok/s total", "tok/s per seq", "TTFT s", "RSS MB"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["dtype"], str(r["batch"]), f"{r['tok_s']:.1f}", f"{r['tok_s_per_seq']:.2f}", f"{r['ttft_s']:.2f}",
            f"{r['rss_mb']:.0f}",
        )  # fmt: skip
    Console().print(table)
    by = {(r["dtype"], r["batch"]): r["tok_s"] for r in rows}
    ratios = {
        str(b): round(by[("float32", b)] / by[("bfloat16", b)], 3)
        for b in batches
        if ("float32", b) in by and ("bfloat16", b) in by
    }
    figures = [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(json.dumps({"benchmark": "model_throughput", "model": args.model, "tokens": args.tokens,
                      "results": figures, "float32_over_bfloat16": ratios}))  # fmt: skip


if __name__ == "__main__":
    main()
