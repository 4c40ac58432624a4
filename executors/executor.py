"""The async DAG executor: every node starts the moment its last dependency finishes.

Dispatch is event-driven: each node keeps a count of unfinished dependencies; when a node ends, its dependents'
counts drop and those reaching zero join a ready queue, from which nodes start while fewer than ``concurrency``
are running. There is no polling loop. Nodes may be added while the executor runs (`Executor.add`), which is how
a streaming planner dispatches a task the moment its line is complete.

Structured concurrency: the executor owns every task it starts. Used as ``async with Executor(...) as ex:``, it
never returns with a task still running. Under the ``fail_fast`` policy the first node that fails (after its
retries) cancels every running node and the run raises `NodeFailedError`; under ``continue`` the failure is
recorded, the nodes depending on it are skipped, and the rest of the DAG runs on so a joiner can see the error.
Cancelling the task that awaits `Executor.wait` (or calling `Executor.cancel`) cancels every node, and through
them their engine requests (thought nodes stream through the budgeted engine, whose cancellation aborts the
request in the backend).

Node kinds: a tool node calls ``tool.call(arguments)`` after its references are resolved; a thought node runs
a search/ strategy on its (resolved) question under a child of the run's `Budget`, and its output is the
strategy `Result`'s answer; a join node is not run here (the agent's joiner handles it).

Events (``plan_node``, ``node_start``, ``node_end``, ``node_error``, ``node_retry``) go to the run's event channel
(`branchwise.events.emit`); install a sink with `branchwise.events.use_sink` to receive them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

from ..budget import Budget
from ..engine.base import Engine
from ..errors import (
    ConfigError,
    ExecutionError,
    NodeFailedError,
    NodeTimeoutError,
    PlanError,
    ToolArgumentError,
)
from ..events import emit
from ..planners.plan import Plan, PlanNode, Repair, ToolsLike, check_node
from ..search import SearchContext, Strategy
from .nodes import FailurePolicy, NodeResult, RetryPolicy, ThoughtSpec, resolve_strategy, summarize

__all__ = ["Executor", "NodeResult", "RetryPolicy", "resolve_strategy"]

logger = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("dependents", "has_refs", "node", "result", "task", "waiting")

    def __init__(self, node: PlanNode, result: NodeResult, has_refs: bool) -> None:
        self.node = node
        self.result = result
        self.has_refs = has_refs
        self.waiting = 0
        self.dependents: list[_Entry] = []
        self.task: asyncio.Task[None] | None = None


class Executor:
    """Runs plan nodes as their inputs become available.

    Args:
        tools: the tool registry (tools are looked up by name; ``tool.call(arguments)`` runs one).
        engine: the engine thought nodes sample from (needed only for thought nodes).
        budget: the run's shared `Budget`; each thought node runs under a child of it. A fresh metering budget
            when None.
        thought: the default thought strategy (see `ThoughtSpec`); "single" when None.
        thought_context: extra `SearchContext` fields for thoughts (``max_tokens``, ``temperature``, ``prompt``...).
        concurrency: the most nodes running at once (>= 1).
        timeout_s: per-attempt time limit of a node (None: none); a node's ``timeout_s`` overrides it.
        retry: the retry policy; a node's ``max_attempts`` overrides its attempt count.
        failure: "fail_fast" (the first failure cancels the run and `wait` raises `NodeFailedError`) or
            "continue" (record it, skip its dependents, run the rest).
        validate: check each added node (references, tool, literal arguments) before accepting it.

    Example:
        ```python
        async with Executor(tools=registry, concurrency=8) as ex:
            results = await ex.run(plan)
        ```
    """

    def __init__(
        self,
        *,
        tools: ToolsLike | None = None,
        engine: Engine | None = None,
        budget: Budget | None = None,
        thought: ThoughtSpec = None,
        thought_context: Mapping[str, Any] | None = None,
        concurrency: int = 16,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        failure: FailurePolicy = "fail_fast",
        validate: bool = True,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if failure not in ("fail_fast", "continue"):
            raise ConfigError(f"failure must be 'fail_fast' or 'continue', got {failure!r}")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.tools = tools
        self.engine = engine
        self._budget = budget
        self._thought_spec = thought
        self._strategy: Strategy | None = None
        self.thought_context = dict(thought_context or {})
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.failure: FailurePolicy = failure
        self.validate = validate
        self._entries: dict[int, _Entry] = {}
        self._outputs: dict[int, Any] = {}
        self._ready: deque[_Entry] = deque()
        self._running = 0
        self._unfinished = 0
        self._closed = False
        self._done: asyncio.Event | None = None
        self._fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.peak_running = 0
        """The most nodes that ran at once (for tests and benchmarks)."""

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None or self._tasks:
            await self.cancel()

    @property
    def budget(self) -> Budget:
        """The run's budget (a metering-only one made on first use when none was given)."""
        if self._budget is None:
            self._budget = Budget(name="executor")
        return self._budget

    @property
    def results(self) -> dict[int, NodeResult]:
        """Every added node's result so far, by id, in the order added."""
        return {i: e.result for i, e in self._entries.items()}

    @property
    def outputs(self) -> Mapping[int, Any]:
        """Outputs of the nodes that finished successfully."""
        return self._outputs

    @property
    def running(self) -> int:
        """Nodes running now."""
        return self._running

    # -- adding nodes -------------------------------------------------------------------------------------------
    def add(self, node: PlanNode, *, repairs: Iterable[Repair] = ()) -> NodeResult:
        """Accept ``node``; it starts as soon as its dependencies have finished (at once if they have).

        A join node is recorded but not run. Must be called from the event loop thread.

        Raises:
            PlanError: the node is invalid here (duplicate id, a reference to a node not added before it,
                an unknown tool, literal arguments that do not match the tool).
            ConfigError: nodes were added after `close`.
            NodeFailedError: the run already failed (fail-fast policy).
        """
        if self._fatal is not None:  # the run already failed: the planner feeding it must stop too
            raise self._fatal
        if self._closed:
            raise ConfigError("the executor is closed: no nodes can be added")
        references = node.references()
        if self.validate:
            check_node(node, self._entries, self.tools if node.kind == "tool" else None, references)
        elif node.id in self._entries:
            raise PlanError(f"duplicate node id {node.id}", node=str(node.id), field="id")
        deps = node.dependencies(references)
        for dep_id in deps:
            if dep_id not in self._entries:  # already checked when validating; kept cheap for validate=False
                raise PlanError(f"dependency {dep_id} was not added before this node", node=str(node.id), field="deps")
        name = node.tool if node.kind == "tool" else ("think" if node.kind == "thought" else "join")
        entry = _Entry(node, NodeResult(node.id, node.kind, name or ""), bool(references))
        self._entries[node.id] = entry
        emit(
            "plan_node",
            {"node": node.id, "kind": node.kind, "name": name, "deps": deps, "repairs": [r.to_dict() for r in repairs]},
        )
        if node.kind == "join":
            return entry.result
        self._unfinished += 1
        if self._done is not None and self._done.is_set():
            self._done.clear()
        skipped_by: NodeResult | None = None
        for dep_id in deps:
            dep = self._entries[dep_id]
            status = dep.result.status
            if status == "ok":
                continue
            if status in ("error", "skipped", "cancelled"):
                skipped_by = dep.result
                continue
            entry.waiting += 1
            dep.dependents.append(entry)
        if skipped_by is not None:
            self._skip(entry, skipped_by)
        elif entry.waiting == 0:
            self._ready.append(entry)
            self._pump()
        return entry.result

    def close(self) -> None:
        """No more nodes will be added: `wait` returns once every added node has ended."""
        self._closed = True
        self._check_done()

    # -- running ------------------------------------------------------------------------------------------------
    async def run(self, plan: Plan | Iterable[PlanNode]) -> dict[int, NodeResult]:
        """Add every node of ``plan``, close, and wait for the results (see `wait`)."""
        try:
            for node in plan:
                self.add(node)
            self.close()
        except BaseException:
            await self.cancel()
            raise
        return await self.wait()

    async def wait(self) -> dict[int, NodeResult]:
        """Wait until every added node has ended and `close` was called; returns `results`.

        Cancelling the waiting task cancels every node (and awaits them) before the cancellation propagates.

        Raises:
            NodeFailedError: under "fail_fast", a node failed (its error is the cause); every other node was
                cancelled and awaited first.
        """
        done = self._done_event()
        self._check_done()
        try:
            await done.wait()
        except BaseException:
            await self.cancel()
            raise
        if self._fatal is not None:
            await self._drain()
            raise self._fatal
        return self.results

    async def cancel(self) -> None:
        """Cancel every running node, mark unstarted ones cancelled, and wait until no task is left."""
        self._closed = True
        self._ready.clear()
        for entry in self._entries.values():
            if entry.result.status == "pending" and entry.node.kind != "join":
                entry.result.status = "cancelled"
        for task in list(self._tasks):
            task.cancel()
        await self._drain()
        self._unfinished = 0
        if self._done is not None:
            self._done.set()

    async def _drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        # a task cancelled before its first step never ran its own bookkeeping
        for entry in self._entries.values():
            if entry.result.status == "running":
                entry.result.status = "cancelled"
        self._running = 0

    def _done_event(self) -> asyncio.Event:
        if self._done is None:
            self._done = asyncio.Event()
        return self._done

    def _check_done(self) -> None:
        if self._closed and self._unfinished == 0 and self._running == 0:
            self._done_event().set()

    def _pump(self) -> None:
        while self._ready and self._running < self.concurrency:
            entry = self._ready.popleft()
            self._running += 1
            self.peak_running = max(self.peak_running, self._running)
            entry.result.status = "running"
            task = asyncio.create_task(self._run_node(entry), name=f"branchwise-node-{entry.node.id}")
            entry.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_node(self, entry: _Entry) -> None:
        node, result = entry.node, entry.result
        result.started_at = time.perf_counter()
        emit("node_start", {"node": node.id, "kind": node.kind, "name": result.name})
        error: BaseException | None = None
        try:
            result.output = await self._attempts(entry)
            result.status = "ok"
        except asyncio.CancelledError:
            result.status = "cancelled"
            result.ended_at = time.perf_counter()
            self._running -= 1
            self._unfinished -= 1
            raise
        except Exception as err:
            error = err
            result.status = "error"
            result.error = str(err) or type(err).__name__
            result.error_type = type(err).__name__
        result.ended_at = time.perf_counter()
        self._running -= 1
        self._unfinished -= 1
        if error is None:
            self._outputs[node.id] = result.output
            emit(
                "node_end",
                {
                    "node": node.id,
                    "name": result.name,
                    "duration_s": result.duration_s,
                    "attempts": result.attempts,
                    "output": summarize(result.output),
                },
            )
            for dep in entry.dependents:
                dep.waiting -= 1
                if dep.waiting == 0 and dep.result.status == "pending":
                    self._ready.append(dep)
        else:
            emit(
                "node_error",
                {
                    "node": node.id,
                    "name": result.name,
                    "duration_s": result.duration_s,
                    "attempts": result.attempts,
                    "error": result.error,
                    "error_type": result.error_type,
                },
            )
            if self.failure == "fail_fast":
                self._fail(entry, error)
                return
            for dep in entry.dependents:
                self._skip(dep, result)
        self._pump()
        self._check_done()

    def _skip(self, entry: _Entry, cause: NodeResult) -> None:
        if entry.result.status != "pending":
            return
        entry.result.status = "skipped"
        entry.result.error = f"dependency {cause.id} ({cause.name}) did not succeed: {cause.error}"
        entry.result.error_type = "DependencyFailed"
        self._unfinished -= 1
        emit(
            "node_error",
            {
                "node": entry.node.id,
                "name": entry.result.name,
                "error": entry.result.error,
                "error_type": "DependencyFailed",
                "duration_s": 0.0,
                "attempts": 0,
            },
        )
        for dep in entry.dependents:
            self._skip(dep, cause)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if self._fatal is not None:
            return
        self._fatal = NodeFailedError(entry.node.id, entry.result.name, error)
        self._fatal.__cause__ = error
        self._closed = True
        self._ready.clear()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        for other in self._entries.values():
            if other.result.status == "pending" and other.node.kind != "join":
                other.result.status = "cancelled"
        self._unfinished = 0
        self._done_event().set()

    async def _attempts(self, entry: _Entry) -> Any:
        node, result = entry.node, entry.result
        attempts = node.max_attempts or self.retry.max_attempts
        timeout = node.timeout_s or self.timeout_s
        if entry.has_refs:
            args, kwargs, question = node.resolved(self._outputs)
        else:
            args, kwargs, question = node.args, node.kwargs, node.question
        for attempt in range(1, attempts + 1):
            result.attempts = attempt
            try:
                if timeout is None:
                    return await self._execute(node, args, kwargs, question, result)
                limit = asyncio.timeout(timeout)
                try:
                    async with limit:
                        return await self._execute(node, args, kwargs, question, result)
                except TimeoutError as err:
                    if not limit.expired():  # a timeout raised inside the tool itself
                        raise
                    raise NodeTimeoutError(node.id, result.name, timeout) from err
            except Exception as err:
                if attempt >= attempts or not self.retry.retryable(err):
                    raise
                logger.info("node %s attempt %d failed (%s); retrying", node.id, attempt, err)
                emit("node_retry", {"node": node.id, "attempt": attempt, "error": str(err)})
                delay = self.retry.delay(attempt)
                if delay:
                    await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _execute(
        self, node: PlanNode, args: list[Any], kwargs: dict[str, Any], question: str | None, result: NodeResult
    ) -> Any:
        if node.kind == "tool":
            if self.tools is None:
                raise ConfigError("the executor has no tool registry")
            assert node.tool is not None
            tool = self.tools.get(node.tool)
            try:
                arguments = tool.bind(args, kwargs)
            except (ConfigError, ToolArgumentError) as err:
                raise PlanError(str(err), node=str(node.id), field=getattr(err, "field", None) or "args") from err
            return await tool.call(arguments)
        assert question is not None
        return await self._think(node, question, result)

    async def _think(self, node: PlanNode, question: str, result: NodeResult) -> Any:
        if self.engine is None:
            raise ConfigError(f"thought node {node.id} needs an engine; the executor has none")
        if node.strategy is not None:
            strategy = resolve_strategy(node.strategy)
        else:
            if self._strategy is None:
                self._strategy = resolve_strategy(self._thought_spec)
            strategy = self._strategy
        ctx = SearchContext(engine=self.engine, budget=self.budget.child(f"node{node.id}"), **self.thought_context)
        outcome = await strategy.run(question, ctx)
        result.detail["strategy"] = strategy.name
        result.detail["result"] = outcome
        if outcome.answer is None:
            # the strategy found no extractable answer: pass the first trace's text on rather than nothing
            texts = [c.text for c in outcome.candidates]
            if not texts:
                raise ExecutionError(f"thought node {node.id}: strategy {strategy.name!r} finished no trace")
            return texts[0].strip()
        return outcome.answer
