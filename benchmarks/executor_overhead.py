"""Scheduling overhead and makespan of the DAG executor.

Every scheduler here runs at the executor's default concurrency and calls a real `Tool` through `Tool.call`
(argument validation, the tool's limits), as a real run does; each gets the same warm-up, and the schedulers run
in alternating order (A B C, then C B A).

Part 1 — overhead: a random 10,000-node DAG (each node depends on up to 3 of the 50 nodes before it) of
zero-latency async tools. Overhead per node is wall time / nodes, for the executor with and without per-node
validation, against a baseline measured in the same run: the bare minimum of an event-per-node implementation
(one task per node awaiting its dependencies' `asyncio.Event` s and a semaphore of the same size, no
bookkeeping). Target: under 50 us per node.

Part 2 — makespan (median of the repeats): layered DAGs of width 1-32 (each node depends on 1-2 nodes of the
layer before), simulated tool latencies drawn uniformly from 10-200 ms. Makespan versus its lower bound (the
longest path of latencies, networkx, or the total latency over the concurrency slots, whichever is larger), for
the executor and for a baseline 10 ms polling scheduler (LLMCompiler's loop); and for the executor also versus
"ideal", the makespan of its own policy (first come, first served, at most that many nodes at once) with no
overhead at all, simulated: where a DAG is wider than the concurrency, that is what a perfect implementation
achieves. Target: within 5% of the lower bound.

    python benchmarks/executor_overhead.py [--quick] [--nodes 10000] [--seed 0]

Prints tables, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import networkx as nx
from _paired import alternating
from rich.console import Console
from rich.table import Table

from branchwise.executors.executor import Executor
from branchwise.executors.registry import Tool, ToolRegistry
from branchwise.planners.plan import PlanNode

CONCURRENCY = Executor().concurrency
"""The executor's default concurrency, which every scheduler here runs at."""


def work_tools(latency: Mapping[int, float]) -> ToolRegistry:
    """A registry with one real `Tool`, ``work(x)``, whose call takes ``latency[x]`` seconds (0: returns at once).

    Every call goes through `Tool.call`, as in a real run: argument validation (pydantic) and the tool's limits.
    """

    async def work(x: int) -> int:
        """Simulated work on item x."""
        delay = latency.get(x, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return x

    return ToolRegistry([Tool(work)])


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


def lower_bound(deps: list[list[int]], latency: Mapping[int, float]) -> float:
    """No schedule at ``CONCURRENCY`` slots is shorter: the critical path, or the total work over the slots."""
    return max(critical_path(deps, latency), sum(latency.values()) / CONCURRENCY)


def list_schedule(deps: list[list[int]], latency: Mapping[int, float], slots: int) -> float:
    """Makespan of a zero-overhead scheduler with the executor's policy: at most ``slots`` nodes at once, ready
    nodes started first come, first served (nodes ready at the same moment in id order)."""
    waiting = {i: len(d) for i, d in enumerate(deps) if i}
    children: dict[int, list[int]] = {i: [] for i in waiting}
    for i, d in enumerate(deps):
        for parent in d:
            children[parent].append(i)
    ready = deque(i for i, count in waiting.items() if count == 0)
    running: list[tuple[float, int]] = []
    now = 0.0
    while ready or running:
        while ready and len(running) < slots:
            node = ready.popleft()
            heapq.heappush(running, (now + latency[node], node))
        now, node = heapq.heappop(running)
        finished = [node]
        while running and running[0][0] == now:
            finished.append(heapq.heappop(running)[1])
        for done in sorted(finished):
            for child in children[done]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.append(child)
    return now


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
    """(wall seconds, process CPU seconds) of one run, at the executor's default concurrency."""
    ex = Executor(tools=work_tools(latency), validate=validate)
    nodes = nodes_of(deps)
    start, cpu = time.perf_counter(), time.process_time()
    async with ex:
        results = await ex.run(nodes)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(r.ok for r in results.values()), "a node failed"
    return elapsed, cpu


async def run_event_baseline(deps: list[list[int]], latency: Mapping[int, float]) -> tuple[float, float]:
    """Minimal event-per-node scheduler: every node is a task that awaits its dependencies' events, then runs
    through the same `Tool.call` under the same concurrency limit as the executor."""
    tool = work_tools(latency).get("work")
    done = [asyncio.Event() for _ in deps]
    slots = asyncio.Semaphore(CONCURRENCY)

    async def node(i: int) -> None:
        for d in deps[i]:
            await done[d].wait()
        async with slots:
            await tool.call({"x": i})
        done[i].set()

    start, cpu = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as group:
        for i in range(1, len(deps)):
            group.create_task(node(i))
    return time.perf_counter() - start, time.process_time() - cpu


async def run_polling_baseline(deps: list[list[int]], latency: Mapping[int, float], interval: float = 0.01) -> float:
    """LLMCompiler-style scheduler: every ``interval`` seconds, start the nodes whose dependencies are done (as many
    as the executor's concurrency allows), through the same `Tool.call`."""
    tool = work_tools(latency).get("work")
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
            if len(started) - len(finished) >= CONCURRENCY:
                break
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
    sides: dict[str, Callable[[list[list[int]]], Awaitable[tuple[float, float]]]] = {
        "executor": lambda d: run_executor(d, zero, validate=True),
        "executor_no_validation": lambda d: run_executor(d, zero, validate=False),
        "event_baseline": lambda d: run_event_baseline(d, zero),
    }
    for run in sides.values():  # the same warm-up for every side
        await run(deps[:1001])
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for i in range(repeats):
        for name in alternating(list(sides), i):
            figures[name].append(await sides[name](deps))
    # wall time is what a user waits; CPU time is steadier on a shared machine (other processes take the cores)
    per_node = {k: statistics.median(w for w, _ in v) / args.nodes * 1e6 for k, v in figures.items()}
    cpu_per_node = {k: statistics.median(c for _, c in v) / args.nodes * 1e6 for k, v in figures.items()}
    table = Table(
        title=f"Scheduling overhead, {args.nodes}-node random DAG, zero-latency tools through Tool.call, "
        f"concurrency {CONCURRENCY} (median of {repeats})"
    )
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
    for index, width in enumerate(widths):
        dag = layered_dag(width, layers, rng)
        latency = {i: rng.uniform(0.010, 0.200) for i in range(1, len(dag))}
        bound = lower_bound(dag, latency)
        ideal = list_schedule(dag, latency, CONCURRENCY)
        seconds: dict[str, list[float]] = {"executor": [], "polling": []}
        for i in range(repeats):
            for name in alternating(list(seconds), index + i):
                if name == "executor":
                    seconds[name].append((await run_executor(dag, latency, validate=True))[0])
                else:
                    seconds[name].append(await run_polling_baseline(dag, latency))
        ours, polling = statistics.median(seconds["executor"]), statistics.median(seconds["polling"])
        rows.append(
            {
                "width": width,
                "nodes": len(dag) - 1,
                "lower_bound_s": bound,
                "ideal_s": ideal,
                "executor_s": ours,
                "executor_ratio": ours / bound,
                "polling_s": polling,
                "polling_ratio": polling / bound,
                "executor_vs_ideal": ours / ideal,
            }
        )
    table = Table(
        title=f"Makespan (median of {repeats}) vs its lower bound (critical path, or total work / {CONCURRENCY} "
        f"slots), {layers} layers, latencies U(10, 200) ms"
    )
    for col in ("width", "nodes", "lower bound s", "ideal s", "executor s", "executor / LB", "executor / ideal",
                "10 ms polling s", "polling / LB"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["width"]),
            str(r["nodes"]),
            f"{r['lower_bound_s']:.3f}",
            f"{r['ideal_s']:.3f}",
            f"{r['executor_s']:.3f}",
            f"{r['executor_ratio']:.3f}",
            f"{r['executor_vs_ideal']:.3f}",
            f"{r['polling_s']:.3f}",
            f"{r['polling_ratio']:.3f}",
        )
    console.print(table)
    worst = max(r["executor_ratio"] for r in rows)
    worst_vs_ideal = max(r["executor_vs_ideal"] for r in rows)
    print(
        json.dumps(
            {
                "benchmark": "executor_overhead",
                "nodes": args.nodes,
                "concurrency": CONCURRENCY,
                "overhead_us_per_node": per_node,
                "overhead_cpu_us_per_node": cpu_per_node,
                "overhead_target_us": 50,
                "overhead_cpu_vs_event_baseline": cpu_per_node["executor"] / cpu_per_node["event_baseline"],
                "makespan": rows,
                "worst_makespan_ratio": worst,
                "worst_makespan_vs_ideal": worst_vs_ideal,
                "makespan_target_ratio": 1.05,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
