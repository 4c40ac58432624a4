"""What `branchwise serve` adds over calling the pipeline in Python: latency under 200 clients, throughput on a model.

Part 1 (scripted engine, no model): a ``branchwise serve`` process on 127.0.0.1 runs a self-consistency pipeline
over the scripted engine (every token a fixed delay, so a run takes a set time of pure waiting: 0.75 s and
3.75 s, `RUN_SECONDS`). C clients
(closed loops, their starts spread over one run's time) each send R requests one after another. A request's
added latency is what its client waited minus the run's own time as the server measured it (the response's
``branchwise.seconds``): HTTP, JSON, admission, the server's and the client's event loops. Target: p50 < 2 ms.
The same closed loops also call ``Pipeline.run`` directly in this process (sides alternate per round); their
latencies and added latency (the call's time minus the run's own) are shown beside the served ones.

Part 0 (scripted engine, runs that take no time): one client's added latency (the server's cost for a request,
without load) and the requests per second 50 clients get through (where the server saturates).

Part 2 (the real model): N clients send N seeded requests to a server of a real pipeline; the same N runs, with
the same seeds and so the same tokens, are made directly in this process on an engine of its own. Sides alternate
per round; the figure is the served throughput (completion tokens per second of wall time) over the direct one.
Target >= 0.95. Memory: peak resident set of the server (its process and its children, the engine core) and of
this process after the direct side loaded its engine.

    python benchmarks/serve_load.py [--quick] [--clients 200] [--model smollm2-135m-instruct] [--runs 8]
                                    [--skip-model]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from _paired import alternating
from rich.console import Console
from rich.table import Table

from branchwise.serve import PipelineSet, ServerLimits

SCRIPTED = """\
name: sc
engine: {{backend: test, token_delay: {delay}, default: ["Six sevens make forty-two, so the answer is 42.",
  "Seven times six is 42. The answer is 42.", "I think the answer is 41."]}}
thought: {{strategy: self_consistency, n: 4}}
"""
REAL = """\
name: sc
engine: {{backend: vllm, model: {model}, max_model_len: 2048, engine_args: {{enable_chunked_prefill: false}}}}
thought: {{strategy: self_consistency, n: 4, temperature: 0.8, max_tokens: {tokens}}}
"""
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A train travels 60 km in one hour. How far does it travel in 3 hours?",
    "Sara reads 12 pages a day. How many pages does she read in a week?",
    "A box holds 6 eggs. How many eggs are in 7 boxes?",
]
TOKENS = 9
"""Tokens of the longest scripted answer: a run takes about TOKENS x the token delay (its samples stream together)."""
RUN_SECONDS = (0.75, 3.75)
"""Scripted run lengths of the full part 1: a stress (200 clients make ~270 requests/s) and a calmer load (~53/s);
real test-time-scaling runs take longer still."""
_SERVE = "import sys; from branchwise.cli import main; sys.exit(main(sys.argv[1:]))"


# -- the server process --------------------------------------------------------------------------------------------
class Server:
    """A ``branchwise serve`` child process; its stderr is drained all along."""

    def __init__(self, spec: Path, clients: int) -> None:
        admit = str(max(clients, 4))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, "serve", str(spec), "--port", "0", "--max-concurrent-runs", admit,
             "--max-runs-per-key", admit, "--max-queued", admit, "--max-samples", "64"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group, so the engine's processes can be stopped with it
        )  # fmt: skip
        self.url = ""
        self.ready = threading.Event()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("branchwise: serving"):
                self.url = line.split(" at ", 1)[1].split(" ", 1)[0]
                self.ready.set()
        self.ready.set()

    def wait_ready(self, timeout: float) -> str:
        if not self.ready.wait(timeout) or not self.url:
            raise RuntimeError("the server did not start:\n" + "".join(self.log[-40:]))
        return self.url

    def peak_rss_mb(self) -> float:
        """Peak resident set of the server and its children (the engine core and worker), in MB."""
        return tree_peak_rss_mb(psutil.Process(self.proc.pid))

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user and system)."""
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        """SIGTERM (the server drains and closes its engines), then SIGKILL to whatever is left of its group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(120)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@contextlib.contextmanager
def serving(text: str, clients: int, timeout: float) -> Iterator[tuple[Server, str, Path]]:
    with tempfile.TemporaryDirectory(prefix="serve-load-") as folder:
        spec = Path(folder) / "sc.yaml"
        spec.write_text(text)
        server = Server(spec, clients)
        try:
            yield server, server.wait_ready(timeout), spec
        finally:
            server.stop()


def tree_peak_rss_mb(root: psutil.Process, *, skip: int | None = None) -> float:
    """Summed peak resident sets of ``root`` and its descendants, leaving out the subtree of process ``skip``."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            if skip is not None and (proc.pid == skip or skip in {p.pid for p in proc.parents()}):
                continue
            total += _peak_rss(proc)
    return total / 2**20


def _peak_rss(proc: psutil.Process) -> int:
    with open(f"/proc/{proc.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(proc.memory_info().rss)


# -- one side of a round -------------------------------------------------------------------------------------------
Call = tuple[float, float, int]
"""One request: the client's latency, the run's own seconds, its completion tokens."""


async def closed_loops(one: Any, clients: int, per_client: int, stagger: float) -> tuple[list[Call], float]:
    """``clients`` loops, started ``stagger`` seconds apart in all, each making ``per_client`` calls of ``one(i)``
    one after another (a closed loop: a client sends its next request when its answer arrived)."""

    async def loop(client: int) -> list[Call]:
        await asyncio.sleep(stagger * client / clients)
        return [await one(client * per_client + k) for k in range(per_client)]

    started = time.perf_counter()
    calls = [c for cs in await asyncio.gather(*(loop(c) for c in range(clients))) for c in cs]
    return calls, time.perf_counter() - started


async def served_round(url: str, clients: int, per_client: int, *, stagger: float, seeded: bool) -> dict[str, Any]:
    """Requests to the server from ``clients`` closed-loop clients (aiohttp: at 200 connections httpx's own pool
    costs ~13 ms of client CPU a request here and becomes what is measured; aiohttp's costs 0.4 ms)."""
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/", connector=connector) as session:

        async def one(i: int) -> Call:
            body: dict[str, Any] = {"model": "sc", "messages": [{"role": "user", "content": QUESTIONS[i % 4]}]}
            if seeded:
                body["seed"] = i
            started = time.perf_counter()
            async with session.post("chat/completions", json=body) as response:
                response.raise_for_status()
                reply = await response.json()
            waited = time.perf_counter() - started
            return waited, reply["branchwise"]["seconds"], reply["usage"]["completion_tokens"]

        calls, wall = await closed_loops(one, clients, per_client, stagger)
    return summary(calls, wall)


async def direct_round(
    pipelines: PipelineSet, clients: int, per_client: int, *, stagger: float, seeded: bool
) -> dict[str, Any]:
    """The same runs, made directly on the pipeline in this process by the same closed loops."""
    pipeline = pipelines.get("sc").pipeline

    async def one(i: int) -> Call:
        started = time.perf_counter()
        result = await pipeline.run(QUESTIONS[i % 4], seed=i if seeded else None)
        return time.perf_counter() - started, result.seconds, result.usage.completion_tokens

    calls, wall = await closed_loops(one, clients, per_client, stagger)
    return summary(calls, wall)


def summary(calls: list[Call], wall: float) -> dict[str, Any]:
    return {
        "latency": [c[0] for c in calls],
        "added": [c[0] - c[1] for c in calls],
        "tokens": sum(c[2] for c in calls),
        "wall": wall,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- the parts -----------------------------------------------------------------------------------------------------
async def scripted_part(clients: int, per_client: int, rounds: int, run_s: float) -> dict[str, Any]:
    with serving(SCRIPTED.format(delay=run_s / TOKENS), clients, 60) as (server, url, spec):
        pipelines = PipelineSet.load([spec], ServerLimits(max_samples=64))
        await pipelines.start()
        try:
            warm = min(clients, 20)
            await served_round(url, warm, 1, stagger=0.0, seeded=False)  # warm-up, untimed
            await direct_round(pipelines, warm, 1, stagger=0.0, seeded=False)
            sides: dict[str, dict[str, list[float]]] = {s: {"latency": [], "added": []} for s in ("served", "direct")}
            cpu = {"served": 0.0, "direct": 0.0}
            for index in range(rounds):
                for side in alternating(["served", "direct"], index):
                    before = server.cpu_seconds(), time.process_time()
                    if side == "served":
                        got = await served_round(url, clients, per_client, stagger=run_s, seeded=False)
                        cpu[side] += server.cpu_seconds() - before[0]
                    else:
                        got = await direct_round(pipelines, clients, per_client, stagger=run_s, seeded=False)
                        cpu[side] += time.process_time() - before[1]
                    sides[side]["latency"] += got["latency"]
                    sides[side]["added"] += got["added"]
        finally:
            await pipelines.aclose()
        peak = server.peak_rss_mb()
    served, direct = sides["served"], sides["direct"]
    return {
        "run_s": run_s,
        "clients": clients,
        "requests_per_client": per_client,
        "rounds": rounds,
        "added_p50_ms": 1000 * statistics.median(served["added"]),
        "added_p99_ms": 1000 * pct(served["added"], 0.99),
        "direct_added_p50_ms": 1000 * statistics.median(direct["added"]),
        "direct_added_p99_ms": 1000 * pct(direct["added"], 0.99),
        "served_p50_ms": 1000 * statistics.median(served["latency"]),
        "served_p99_ms": 1000 * pct(served["latency"], 0.99),
        "direct_p50_ms": 1000 * statistics.median(direct["latency"]),
        "direct_p99_ms": 1000 * pct(direct["latency"], 0.99),
        "server_cpu_ms_per_request": 1000 * cpu["served"] / len(served["added"]),
        "direct_cpu_ms_per_run": 1000 * cpu["direct"] / len(direct["added"]),
        "server_peak_rss_mb": peak,
    }


async def capacity_part(requests: int) -> dict[str, Any]:
    """The server alone, on runs that take no time: one client's added latency, and the requests per second 50
    clients get through (the most the server's event loop handles)."""
    with serving(SCRIPTED.format(delay=0.0), 64, 60) as (_server, url, _spec):
        await served_round(url, 1, 20, stagger=0.0, seeded=False)  # warm-up
        one = await served_round(url, 1, requests, stagger=0.0, seeded=False)
        many = await served_round(url, 50, max(1, requests // 25), stagger=0.0, seeded=False)
    return {
        "single_added_p50_ms": 1000 * statistics.median(one["added"]),
        "single_added_p99_ms": 1000 * pct(one["added"], 0.99),
        "requests_per_s": len(many["added"]) / many["wall"],
    }


async def model_part(model: str, runs: int, rounds: int, tokens: int) -> dict[str, Any]:
    text = REAL.format(model=model, tokens=tokens)
    with serving(text, runs, 900) as (server, url, spec):
        pipelines = PipelineSet.load([spec], ServerLimits(max_samples=64))
        await pipelines.start()
        try:
            await served_round(url, runs, 1, stagger=0.0, seeded=True)  # warm-up: both engines compile and cache
            await direct_round(pipelines, runs, 1, stagger=0.0, seeded=True)
            sides: dict[str, dict[str, float]] = {s: {"tokens": 0, "wall": 0.0} for s in ("served", "direct")}
            for index in range(rounds):
                for side in alternating(["served", "direct"], index):
                    if side == "served":
                        got = await served_round(url, runs, 1, stagger=0.0, seeded=True)
                    else:
                        got = await direct_round(pipelines, runs, 1, stagger=0.0, seeded=True)
                    sides[side]["tokens"] += got["tokens"]
                    sides[side]["wall"] += got["wall"]
            direct_rss = tree_peak_rss_mb(psutil.Process(), skip=server.proc.pid)
        finally:
            await pipelines.aclose()
        server_rss = server.peak_rss_mb()
    rate = {s: v["tokens"] / v["wall"] for s, v in sides.items()}
    return {
        "model": model,
        "runs": runs,
        "rounds": rounds,
        "max_tokens": tokens,
        "served_tokens": sides["served"]["tokens"],
        "direct_tokens": sides["direct"]["tokens"],
        "served_tok_s": rate["served"],
        "direct_tok_s": rate["direct"],
        "throughput_ratio": rate["served"] / rate["direct"],
        "server_peak_rss_mb": server_rss,
        "direct_peak_rss_mb": direct_rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="50 clients x 3 requests; 4 model runs, 1 round")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients of part 1 (200)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model of part 2")
    parser.add_argument("--runs", type=int, default=8, help="concurrent runs of part 2 (8)")
    parser.add_argument("--skip-model", action="store_true", help="part 1 only")
    args = parser.parse_args()
    clients, per_client, rounds = (50, 3, 1) if args.quick else (args.clients, 5, 2)
    runs, model_rounds, tokens = (4, 1, 64) if args.quick else (args.runs, 3, 192)
    lengths = RUN_SECONDS[:1] if args.quick else RUN_SECONDS

    capacity = asyncio.run(capacity_part(100 if args.quick else 500))
    scripted = [asyncio.run(scripted_part(clients, per_client, rounds, run_s)) for run_s in lengths]
    model = None if args.skip_model else asyncio.run(model_part(args.model, runs, model_rounds, tokens))

    console = Console()
    title = f"part 1: {clients} closed-loop clients x {per_client} requests x {rounds} rounds (scripted engine)"
    table = Table(title=title)
    columns = ("run", "side", "latency p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "CPU ms / request")
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "side") else "right")
    for part in scripted:
        for side in ("served", "direct"):
            served = side == "served"
            table.add_row(
                f"{part['run_s']:g} s",
                "served (HTTP)" if served else "direct Pipeline.run",
                f"{part[f'{side}_p50_ms']:.1f}",
                f"{part[f'{side}_p99_ms']:.1f}",
                f"{part['added_p50_ms' if served else 'direct_added_p50_ms']:.2f}",
                f"{part['added_p99_ms' if served else 'direct_added_p99_ms']:.2f}",
                f"{part['server_cpu_ms_per_request' if served else 'direct_cpu_ms_per_run']:.2f}",
            )
    console.print(table)
    console.print("CPU: the server's whole process per request; direct: this process per run (the run alone)")
    console.print(
        f"runs that take no time: one client's added latency p50 {capacity['single_added_p50_ms']:.2f} ms, "
        f"p99 {capacity['single_added_p99_ms']:.2f} ms; 50 clients get {capacity['requests_per_s']:.0f} requests/s"
    )
    if model is not None:
        table = Table(title=f"part 2: {model['runs']} seeded runs x {model['rounds']} rounds on {model['model']}")
        for column in ("side", "completion tokens", "tok/s", "peak RSS MB"):
            table.add_column(column, justify="right" if column != "side" else "left")
        table.add_row("served", str(int(model["served_tokens"])), f"{model['served_tok_s']:.1f}",
                      f"{model['server_peak_rss_mb']:.0f}")  # fmt: skip
        table.add_row("direct", str(int(model["direct_tokens"])), f"{model['direct_tok_s']:.1f}",
                      f"{model['direct_peak_rss_mb']:.0f}")  # fmt: skip
        console.print(table)
        console.print(f"served / direct throughput: {model['throughput_ratio']:.3f} (target >= 0.95)")
    for part in scripted:
        console.print(f"added latency p50 {part['added_p50_ms']:.2f} ms at {part['run_s']:g} s runs (target < 2 ms)")
    figures = {"capacity": capacity, "scripted": scripted, "model": model}
    print(json.dumps({"benchmark": "serve_load", "quick": args.quick, **figures}))


if __name__ == "__main__":
    main()
