"""Scheduling overhead and makespan of the DAG executor.

Part 1 — overhead: a random 10,000-node DAG (each node depends on up to 3 of the 50 nodes before it) of
zero-latency async tools. Overhead per node is wall time / nodes, for the executor with and without per-node
validation, against a baseline measured in the same run: the bare minimum of an event-per-node implementation
(one task per node awaiting its dependencies' `asyncio.Event` s, no bookkeeping). Target: under 50 us per node.

Part 2 — makespan: layered DAGs of width 1-32 (each node depends on 1-2 nodes of the layer before), simulated
tool latencies drawn uniformly from 10-200 ms. Makespan versus the critical-path lower bound (longest path of
latencies, networkx), for the executor and for a baseline 10 ms polling scheduler (LLMCompiler's loop). Target:
within 5% of the critical path.

    python benchmarks/executor_overhead.py [--quick] [--nodes 10000] [--seed 0]

Prints tables, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
from rich.console import Console
from rich.table import Table

from branchwise.executors.executor import Executor
from branchwise.planners.plan import PlanNode


class _Tool:
    """A tool with the registry's interface whose call takes ``latency[node]`` seconds (0: returns at once)."""

    name = "work"
    description = "simulated work"
    args_model = None

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {"x": args[0] if args else kwargs.get("x")}

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        return dict(arguments)

    def signature(self) -> str:
        return "work(x)"

    def __init__(self, latency: Mapping[int, float] | None = None) -> None:
        self.latency = latency or {}

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        delay = self.latency.get(arguments["x"], 0.0)
        if delay:
            await asyncio.sleep(delay)
        return arguments["x"]


class _Tools:
    def __init__(self, tool: _Tool) -> None:
        self.tool = tool

    def __contains__(self, name: object) -> bool:
        return name == "work"

    def get(self, name: str) -> _Tool:
        return self.tool

    def names(self) -> list[str]:
        return ["work"]


def random_dag(n: int, rng: random.Random, *, window: int = 50, max_deps: int = 3) -> list[list[int]]:
    """deps[i] for nodes 1..n (index 0 unused)."""
    deps: list[list[int]] = [[]]
    for i in range(1, n + 1):
        k = rng.randint(0, min(max_deps, i - 1))
        deps.append(sorted(rng.sample(range(max(1, i - window), i), k)) if k else [])
    return deps


def layered_dag(width: int, layers: int, rng: random.Random) -> list[list[int]]:
    deps: list[list[int]] = [[]]
    for layer in range(layers):
        for _ in range(width):
            if layer == 0:
                deps.append([])
            else:
                prev = list(range((layer - 1) * width + 1, layer * width + 1))
                deps.append(sorted(rng.sample(prev, min(len(prev), rng.randint(1, 2)))))
    return deps


def nodes_of(deps: list[list[int]]) -> list[PlanNode]:
    return [PlanNode(i, tool="work", args=[i], deps=d) for i, d in enumerate(deps) if i]


def critical_path(deps: list[list[int]], latency: Mapping[int, float]) -> float:
    graph: nx.DiGraph[int] = nx.DiGraph()
    for i, d in enumerate(deps):
        if i:
            graph.add_node(i)
            graph.add_edges_from((j, i) for j in d)
    best: dict[int, float] = {}
    for node in nx.topological_sort(graph):
        best[node] = latency[node] + max((best[p] for p in graph.predecessors(node)), default=0.0)
    return max(best.values())


async def run_executor(deps: list[list[int]], latency: Mapping[int, float], *, validate: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one run."""
    ex = Executor(tools=_Tools(_Tool(latency)), concurrency=10_000, validate=validate)
    nodes = nodes_of(deps)
    start, cpu = time.perf_counter(), time.process_time()
    async with ex:
        results = await ex.run(nodes)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(r.ok for r in results.values()), "a node failed"
    return elapsed, cpu


async def run_event_baseline(deps: list[list[int]], latency: Mapping[int, float]) -> tuple[float, float]:
    """Minimal event-per-node scheduler: every node is a task that awaits its dependencies' events."""
    tool = _Tool(latency)
    done = [asyncio.Event() for _ in deps]

    async def node(i: int) -> None:
        for d in deps[i]:
            await done[d].wait()
        await tool.call({"x": i})
        done[i].set()

    start, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for i in range(1, len(deps)):
            group.create_task(node(i))
    return time.perf_counter() - start, time.process_time() - cpu


async def run_polling_baseline(deps: list[list[int]], latency: Mapping[int, float], interval: float = 0.01) -> float:
    """LLMCompiler-style scheduler: every ``interval`` seconds, start the nodes whose dependencies are done."""
    tool = _Tool(latency)
    finished: set[int] = set()
    started: set[int] = set()
    tasks: list[asyncio.Task[Any]] = []

    async def node(i: int) -> None:
        await tool.call({"x": i})
        finished.add(i)

    start = time.perf_counter()
    total = len(deps) - 1
    while len(finished) < total:
        for i in range(1, len(deps)):
            if i not in started and all(d in finished for d in deps[i]):
                started.add(i)
                tasks.append(asyncio.create_task(node(i)))
        await asyncio.sleep(interval)
    await asyncio.gather(*tasks)
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and widths (about 20 s)")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    console = Console(width=140)
    repeats = 3 if args.quick else 5

    # -- part 1: overhead ----------------------------------------------------------------------------------------
    deps = random_dag(args.nodes, rng)
    zero: dict[int, float] = {}
    await run_executor(deps[:1001], zero, validate=True)  # warm-up
    figures: dict[str, list[tuple[float, float]]] = {"executor": [], "executor_no_validation": [], "event_baseline": []}
    for _ in range(repeats):
        figures["executor"].append(await run_executor(deps, zero, validate=True))
        figures["executor_no_validation"].append(await run_executor(deps, zero, validate=False))
        figures["event_baseline"].append(await run_event_baseline(deps, zero))
    # wall time is what a user waits; CPU time is steadier on a shared machine (other processes take the cores)
    per_node = {k: statistics.median(w for w, _ in v) / args.nodes * 1e6 for k, v in figures.items()}
    cpu_per_node = {k: statistics.median(c for _, c in v) / args.nodes * 1e6 for k, v in figures.items()}
    table = Table(title=f"Scheduling overhead, {args.nodes}-node random DAG, zero-latency tools (median of {repeats})")
    for col in ("scheduler", "wall us / node", "CPU us / node", "CPU vs event baseline"):
        table.add_column(col, justify="right" if col != "scheduler" else "left")
    for k, v in per_node.items():
        c = cpu_per_node[k]
        table.add_row(k, f"{v:.1f}", f"{c:.1f}", f"{c / cpu_per_node['event_baseline']:.2f}x")
    console.print(table)

    # -- part 2: makespan ----------------------------------------------------------------------------------------
    widths = [1, 4, 16, 32] if args.quick else [1, 2, 4, 8, 16, 32]
    layers = 4 if args.quick else 6
    rows = []
    for width in widths:
        dag = layered_dag(width, layers, rng)
        latency = {i: rng.uniform(0.010, 0.200) for i in range(1, len(dag))}
        bound = critical_path(dag, latency)
        ours, _ = await run_executor(dag, latency, validate=True)
        polling = await run_polling_baseline(dag, latency)
        rows.append(
            {
                "width": width,
                "nodes": len(dag) - 1,
                "critical_path_s": bound,
                "executor_s": ours,
                "executor_ratio": ours / bound,
                "polling_s": polling,
                "polling_ratio": polling / bound,
            }
        )
    table = Table(title=f"Makespan vs critical path, {layers} layers, latencies U(10, 200) ms")
    for col in ("width", "nodes", "critical path s", "executor s", "executor / CP", "10 ms polling s", "polling / CP"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["width"]),
            str(r["nodes"]),
            f"{r['critical_path_s']:.3f}",
            f"{r['executor_s']:.3f}",
            f"{r['executor_ratio']:.3f}",
            f"{r['polling_s']:.3f}",
            f"{r['polling_ratio']:.3f}",
        )
    console.print(table)
    worst = max(r["executor_ratio"] for r in rows)
    print(
        json.dumps(
            {
                "benchmark": "executor_overhead",
                "nodes": args.nodes,
                "overhead_us_per_node": per_node,
                "overhead_cpu_us_per_node": cpu_per_node,
                "overhead_target_us": 50,
                "overhead_cpu_vs_event_baseline": cpu_per_node["executor"] / cpu_per_node["event_baseline"],
                "makespan": rows,
                "worst_makespan_ratio": worst,
                "makespan_target_ratio": 1.05,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
