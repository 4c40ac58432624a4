"""Engine-layer overhead: branchwise engines versus the raw clients they wrap, same workload, same process.

Part 1 (embedded): one vLLM AsyncLLM serves every side. "raw" drives it directly (``AsyncLLM.generate`` with
DELTA outputs); "branchwise" drives it through `VLLMEngine.stream` (request validation, prompt rendering, delta
mapping, usage metering); "budgeted" through the `BudgetedEngine` every strategy really calls (`Budget.bind`:
admission, prompt reservation, per-delta charging and cap checks, a pulling task and buffer per call), one
uncapped budget per round. Part 2 (HTTP): a local ``vllm serve`` on 127.0.0.1; "raw" is a plain httpx streaming
client for ``/v1/completions``; "branchwise" is `OpenAIEngine.stream`, "budgeted" the same under a budget. Every
side gets one untimed warm-up run, then rounds run the sides in alternating order (raw, branchwise, budgeted;
then reversed) so machine noise hits all; the ratios of their throughputs to raw are the figures (target:
>= 0.97), and the client process's CPU per token, which does not depend on how the cores are shared.

Workload: P prompts x n samples x T tokens with ignore_eos, all prompts concurrently.

    python benchmarks/engine_overhead.py [--quick] [--skip-http]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from _paired import alternating
from rich.console import Console
from rich.table import Table

from branchwise.budget import Budget
from branchwise.engine import Engine, GenerationRequest
from branchwise.engine.models import pull
from branchwise.engine.vllm_engine import VLLMEngine

MODEL = "smollm2-135m-instruct"


def prompts(count: int) -> list[str]:
    return [f"Story {i}: once upon a time, in a village by the sea," for i in range(count)]


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    """Tokens, wall seconds and this process's CPU seconds (the client side's own cost) of one run."""
    started, cpu = time.perf_counter(), time.process_time()
    tokens = await run()
    return tokens, time.perf_counter() - started, time.process_time() - cpu


# -- embedded --------------------------------------------------------------------------------------------------
async def raw_vllm(engine: VLLMEngine, texts: list[str], n: int, tokens: int) -> int:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    llm = engine._llm
    assert llm is not None
    params = SamplingParams(
        n=n, max_tokens=tokens, ignore_eos=True, temperature=0.8, output_kind=RequestOutputKind.DELTA
    )

    async def one(text: str) -> int:
        count = 0
        async for out in llm.generate({"prompt": text}, params, uuid.uuid4().hex):
            for c in out.outputs:
                count += len(c.token_ids)
        return count

    return sum(await asyncio.gather(*(one(t) for t in texts)))


async def through(engine: Engine, texts: list[str], n: int, tokens: int) -> int:
    """The workload through a branchwise engine (`VLLMEngine`, `OpenAIEngine`, or either under a budget)."""

    async def one(text: str) -> int:
        request = GenerationRequest(prompt=text, n=n, max_tokens=tokens, ignore_eos=True, temperature=0.8)
        count = 0
        async for delta in engine.stream(request):
            count += len(delta.token_ids)
        return count

    return sum(await asyncio.gather(*(one(t) for t in texts)))


# -- HTTP ------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    path = str(pull(MODEL))
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "1024",
        "--distributed-executor-backend", "uni", "--dtype", "float32",  # float32: no native bf16 on these CPUs
    ]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(base: str, proc: subprocess.Popen[bytes], deadline_s: float = 300) -> None:
    async with httpx.AsyncClient() as client:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}")
            try:
                if (await client.get(f"{base}/models")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError("vllm serve did not become ready")


async def raw_http(client: httpx.AsyncClient, base: str, texts: list[str], n: int, tokens: int) -> int:
    async def one(text: str) -> int:
        body = {
            "model": MODEL, "prompt": text, "n": n, "max_tokens": tokens, "ignore_eos": True, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        count = 0
        async with client.stream("POST", f"{base}/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage")
                if usage:
                    count = int(usage["completion_tokens"])
        return count

    return sum(await asyncio.gather(*(one(t) for t in texts)))


async def alternate(label: str, sides: dict[str, Callable[[], Awaitable[int]]], rounds: int) -> dict[str, Any]:
    """Throughput and client CPU per token of each side (the first is raw), and each one's ratio to raw."""
    for run in sides.values():  # the same untimed warm-up for every side (first-request compilation, connections)
        await run()
    tps: dict[str, list[float]] = {name: [] for name in sides}
    cpu_us: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds):
        for name in alternating(list(sides), i):
            tokens, seconds, cpu = await timed(sides[name])
            tps[name].append(tokens / seconds)
            cpu_us[name].append(cpu / tokens * 1e6)
    medians = {name: statistics.median(values) for name, values in tps.items()}
    raw = medians["raw"]
    return {
        "path": label,
        **{f"{name}_tok_s": round(value, 1) for name, value in medians.items()},
        **{f"{name}_ratio": round(value / raw, 4) for name, value in medians.items() if name != "raw"},
        **{f"{name}_rounds": [round(x, 1) for x in values] for name, values in tps.items()},
        # Client-process CPU per generated token: the overhead itself, much less noisy than throughput here.
        **{f"{name}_client_cpu_us_per_token": round(statistics.median(v), 1) for name, v in cpu_us.items()},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload, 2 rounds")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--skip-http", action="store_true", help="only the embedded comparison")
    parser.add_argument("--skip-embedded", action="store_true", help="only the HTTP comparison")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.n, args.tokens, args.rounds = 4, 4, 32, 2
    texts = prompts(args.prompts)
    results = []

    if not args.skip_embedded:
        engine = VLLMEngine(MODEL, max_model_len=1024)
        await engine.start()
        try:
            results.append(
                await alternate(
                    "embedded: VLLMEngine.stream (and under a budget) vs AsyncLLM.generate",
                    {
                        "raw": lambda: raw_vllm(engine, texts, args.n, args.tokens),
                        "branchwise": lambda: through(engine, texts, args.n, args.tokens),
                        "budgeted": lambda: through(Budget().bind(engine), texts, args.n, args.tokens),
                    },
                    args.rounds,
                )
            )
            print(f"partial: {json.dumps(results[-1])}", flush=True)  # kept even if the HTTP part fails
        finally:
            await engine.aclose()

    if not args.skip_http:
        from branchwise.engine.openai_engine import OpenAIEngine

        port = free_port()
        base = f"http://127.0.0.1:{port}/v1"
        proc = start_server(port)
        try:
            await wait_ready(base, proc)
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client, OpenAIEngine(MODEL, base) as oai:
                results.append(
                    await alternate(
                        "HTTP: OpenAIEngine.stream (and under a budget) vs raw httpx SSE",
                        {
                            "raw": lambda: raw_http(client, base, texts, args.n, args.tokens),
                            "branchwise": lambda: through(oai, texts, args.n, args.tokens),
                            "budgeted": lambda: through(Budget().bind(oai), texts, args.n, args.tokens),
                        },
                        args.rounds,
                    )
                )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    table = Table(
        title=f"engine overhead: {args.prompts} prompts x n={args.n} x {args.tokens} tokens, {args.rounds} rounds"
    )
    for column in ("path", "raw tok/s", "branchwise tok/s", "budgeted tok/s", "ratio branchwise / budgeted",
                   "client CPU us/token raw / branchwise / budgeted"):  # fmt: skip
        table.add_column(column)
    for r in results:
        cpu = " / ".join(str(r[f"{name}_client_cpu_us_per_token"]) for name in ("raw", "branchwise", "budgeted"))
        table.add_row(r["path"], str(r["raw_tok_s"]), str(r["branchwise_tok_s"]), str(r["budgeted_tok_s"]),
                      f"{r['branchwise_ratio']:.3f} / {r['budgeted_ratio']:.3f}", cpu)  # fmt: skip
    Console(width=200).print(table)
    workload = {"prompts": args.prompts, "n": args.n, "tokens": args.tokens, "rounds": args.rounds}
    print(json.dumps({"benchmark": "engine_overhead", "model": MODEL, "workload": workload, "results": results}))


if __name__ == "__main__":
    asyncio.run(main())
