"""Trace banks: sample N traces per problem once from a live engine, store them compactly, replay them later.

A bank is a folder of SQLite chunk files, ``chunk-0000.db``, ``chunk-0001.db``..., each holding the problems at
positions ``[k * chunk_size, (k + 1) * chunk_size)`` of the benchmark (format: `branchwise.engine.tracebank`;
served by the ``replay`` engine, `branchwise.engine.replay`).

Why chunk files: drawing a bank takes hours here and may be interrupted or moved to another machine. A chunk
file stops changing once its problems are drawn, so committing the bank to git as it grows adds each chunk once
(a single growing file would be stored again at every commit), and a fresh checkout resumes at the first
incomplete chunk. Every file is complete on its own (metadata, reproducibility record, problems, samples).

Crash safety: each problem's request and all its traces are written in one transaction, the moment the problem
finishes, with ``synchronous=FULL`` and a rollback journal (not WAL, so the ``.db`` file alone is always the
committed state: copy or commit it at any time). Killing the process loses at most the problems in flight.
Resuming (running the same command again) skips problems that already have N traces and tops up those with fewer.

Compactness: per-token arrays are packed and zlib-compressed (token ids int32; logprobs float32 when exact, as
vLLM's are; the confidence signal float64, so replayed confidences equal live ones bit for bit).

- `BankWriter`: the store (chunk files, one transaction per problem, resume).
- `draw_bank`: draw the traces of many problems from an engine, several problems in flight.
- `draw_pipeline_bank`: the same with a YAML pipeline's prompt and sampling settings (``branchwise sample``).
- `BankRecorder`: an engine wrapper that banks every trace a live run streams (for fidelity checks: replay the
  bank with ``order="banked"`` and the run's decisions repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.base import CallMeter, Engine
from ..engine.tracebank import (
    FORMAT_VERSION,
    SAMPLE_COLUMNS,
    BankedProblem,
    BankedSample,
    canonical_json,
    connect,
    read_meta,
    sampling_settings,
)
from ..engine.types import Capabilities, Delta, FinishReason, GenerationRequest
from ..errors import BranchwiseError, ConfigError, EngineError, EngineUnavailable
from ..orchestrator.pipeline import Pipeline, build_engines
from ..orchestrator.spec import load_spec
from ..search.base import SearchContext
from ..verifiers.confidence import token_confidence
from .datasets import Benchmark, Problem, load_benchmark
from .pipelines import pipeline_configs
from .repro import reproducibility_record

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BankRecorder",
    "BankWriter",
    "DrawSummary",
    "SampleBuilder",
    "draw_bank",
    "draw_pipeline_bank",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 50
"""Problems per chunk file: ~1-2 MB per chunk at N=16 and ~300 tokens per trace."""

_IDENTITY = ("model", "chunk_size")
"""Metadata every chunk of a bank must agree on: traces of different models must never mix."""


class SampleBuilder:
    """Collects one sample's deltas of a live stream into a `BankedSample`."""

    def __init__(self, index: int, started_at: float) -> None:
        self.index = index
        self.started_at = started_at
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_mean: list[float] = []
        self.top_counts: list[int] = []
        self.token_texts: list[str] = []
        self.delta_tokens: list[int] = []
        self.delta_texts: list[str] = []
        self.with_logprobs = True
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None

    def add(self, delta: Delta, now: float) -> None:
        ids = delta.token_ids
        self.token_ids.extend(ids)
        self.delta_tokens.append(len(ids))
        self.delta_texts.append(delta.text)
        if ids:
            self.first_at = self.first_at if self.first_at is not None else now
            self.last_at = now
            lps = delta.logprobs
            if lps is None or len(lps) != len(ids):
                self.with_logprobs = False
            elif self.with_logprobs:
                for token in lps:
                    self.logprobs.append(token.logprob)
                    self.token_texts.append(token.token)
                    self.top_counts.append(len(token.top))
                    if len(token.top) >= 2:  # exactly what DeepConf's token confidence reads, negated
                        self.top_mean.append(-token_confidence(token))
                    elif token.top:
                        self.top_mean.append(token.top[0][1])
                    else:
                        self.top_mean.append(math.nan)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason

    def build(self, max_tokens: int) -> BankedSample:
        lp = self.with_logprobs and len(self.logprobs) == len(self.token_ids)
        finish: FinishReason = self.finish_reason if self.finish_reason in ("stop", "length") else "abort"
        ttft = None if self.first_at is None else self.first_at - self.started_at
        decode = None if self.first_at is None or self.last_at is None else self.last_at - self.first_at
        return BankedSample(
            index=self.index,
            token_ids=tuple(self.token_ids),
            logprobs=tuple(self.logprobs) if lp else (),
            top_mean=tuple(self.top_mean) if lp else (),
            top_counts=tuple(self.top_counts) if lp else (),
            token_texts=tuple(self.token_texts) if lp else (),
            delta_tokens=tuple(self.delta_tokens),
            delta_texts=tuple(self.delta_texts),
            finish_reason=finish,
            stop_reason=self.stop_reason if finish == "stop" else None,
            max_tokens=max_tokens,
            ttft_s=ttft,
            decode_s=decode,
        )


class BankWriter:
    """A bank folder being written: chunk files created on demand, one transaction per problem.

    Args:
        root: the bank folder (created if missing).
        meta: metadata written into every new chunk (benchmark, model, n, logprobs, settings, spec...); its
            ``model`` must match the bank's existing chunks.
        chunk_size: problems (by benchmark position) per chunk file; must match existing chunks.
        repro: the reproducibility record of this invocation (a ``draws`` row in each chunk it writes).
        argv: the command line of this invocation.

    Raises:
        ConfigError: the folder holds chunks of another model or chunk size, or of an unknown format.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        meta: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        repro: Mapping[str, Any] | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root} exists and is not a folder (a bank is a folder of chunk files)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = {**dict(meta or {}), "chunk_size": chunk_size}
        self.chunk_size = chunk_size
        self.repro = dict(repro or {})
        self.argv = list(argv)
        self._lock = threading.Lock()
        self._conns: dict[int, tuple[sqlite3.Connection, int]] = {}
        for path in sorted(self.root.glob("chunk-*.db")):
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                existing = read_meta(conn)
            except sqlite3.DatabaseError as err:
                raise ConfigError(f"{path} is not a trace bank chunk: {err}") from err
            finally:
                conn.close()
            if existing.get("format") != FORMAT_VERSION:
                raise ConfigError(f"{path}: trace bank format {existing.get('format')!r}, expected {FORMAT_VERSION}")
            for key in _IDENTITY:
                if key in self.meta and key in existing and existing[key] != self.meta[key]:
                    raise ConfigError(
                        f"{path} was drawn with {key}={existing[key]!r}, this draw has {key}={self.meta[key]!r}; "
                        "use another folder"
                    )

    def chunk_of(self, position: int | None) -> int:
        """The chunk index of a benchmark position (chunk 0 when there is none)."""
        return 0 if position is None else position // self.chunk_size

    def chunk_path(self, chunk: int) -> Path:
        return self.root / f"chunk-{chunk:04d}.db"

    def _conn(self, chunk: int) -> tuple[sqlite3.Connection, int]:
        opened = self._conns.get(chunk)
        if opened is not None:
            return opened
        conn = connect(self.chunk_path(chunk))
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not read_meta(conn):
                record = {**self.meta, "format": FORMAT_VERSION, "chunk": chunk, "created_at": now}
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [(k, json.dumps(v, sort_keys=True, default=str)) for k, v in record.items()],
                )
            cur = conn.execute(
                "INSERT INTO draws (started_at, argv, repro) VALUES (?, ?, ?)",
                (now, json.dumps(self.argv), json.dumps(self.repro, sort_keys=True, default=str)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        draw_id = cur.lastrowid
        assert draw_id is not None
        self._conns[chunk] = (conn, draw_id)
        return conn, draw_id

    def _existing(self, chunk: int) -> sqlite3.Connection | None:
        opened = self._conns.get(chunk)
        if opened is not None:
            return opened[0]
        path = self.chunk_path(chunk)
        return connect(path) if path.exists() else None

    def stored(self, problem: BankedProblem) -> int:
        """How many traces of ``problem`` (same id and request) the bank holds."""
        with self._lock:
            conn = self._existing(self.chunk_of(problem.position))
            if conn is None:
                return 0
            try:
                row = conn.execute(
                    "SELECT COUNT(*) FROM samples JOIN problems USING (problem_key) "
                    "WHERE problems.benchmark = ? AND problems.problem_id = ? AND problems.hash = ?",
                    (problem.benchmark, problem.problem_id, problem.hash),
                ).fetchone()
            finally:
                if self.chunk_of(problem.position) not in self._conns:
                    conn.close()
            return int(row[0])

    def add(self, problem: BankedProblem, samples: Sequence[BankedSample], *, start_index: int | None = None) -> None:
        """Store ``samples`` of ``problem`` in one transaction.

        Their indices become ``start_index``, ``start_index + 1``... (default: after those already stored).
        """
        with self._lock:
            conn, draw_id = self._conn(self.chunk_of(problem.position))
            conn.execute("BEGIN IMMEDIATE")
            try:
                digest = problem.hash
                conn.execute(
                    "INSERT OR IGNORE INTO problems (benchmark, problem_id, position, prompt, rendered, settings, "
                    "max_tokens, logprobs, hash, prompt_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (problem.benchmark, problem.problem_id, problem.position, problem.prompt, problem.rendered,
                     canonical_json(problem.settings), problem.max_tokens, problem.logprobs, digest,
                     problem.prompt_tokens),
                )  # fmt: skip
                key, have = conn.execute(
                    "SELECT problem_key, (SELECT COUNT(*) FROM samples s WHERE s.problem_key = p.problem_key) "
                    "FROM problems p WHERE benchmark = ? AND problem_id = ? AND hash = ?",
                    (problem.benchmark, problem.problem_id, digest),
                ).fetchone()
                first = have if start_index is None else start_index
                rows = [dataclasses.replace(s, index=first + i).to_row(key, draw_id) for i, s in enumerate(samples)]
                placeholders = ", ".join("?" * len(SAMPLE_COLUMNS.split(",")))
                conn.executemany(f"INSERT INTO samples ({SAMPLE_COLUMNS}) VALUES ({placeholders})", rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            for conn, _ in self._conns.values():
                conn.close()
            self._conns.clear()

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class DrawSummary:
    """What `draw_bank` did.

    Attributes:
        problems: problems asked for.
        skipped: problems that already had N traces.
        drawn: problems drawn (or topped up) now.
        failed: (problem id, error) of problems whose request failed (not stored; a rerun retries them).
        samples: traces stored now.
        tokens: tokens of those traces.
        seconds: wall time of the draw.
        complete_chunks: chunk files whose requested problems are all complete.
    """

    problems: int = 0
    skipped: int = 0
    drawn: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    complete_chunks: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


Progress = Callable[[str], None]


async def _stream_samples(
    engine: Engine, request: GenerationRequest, usage: dict[int, int]
) -> tuple[list[BankedSample], int]:
    started = time.perf_counter()
    builders = [SampleBuilder(i, started) for i in range(request.n)]
    async with contextlib.aclosing(engine.stream(request)) as deltas:
        async for delta in deltas:
            builders[delta.index].add(delta, time.perf_counter())
    return [b.build(request.max_tokens) for b in builders], usage.pop(id(request), 0)


async def draw_bank(
    engine: Engine,
    problems: Sequence[Problem],
    make_request: Callable[[Problem], GenerationRequest],
    writer: BankWriter,
    *,
    n: int,
    benchmark: str,
    positions: Sequence[int] | None = None,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> DrawSummary:
    """Draw ``n`` traces of every problem from ``engine`` (one request with ``n`` samples each) into ``writer``.

    Args:
        engine: a live engine (it is not closed).
        problems: the problems.
        make_request: the request for a problem (its ``n`` is replaced; ask for logprobs so replay can serve
            confidence-based strategies).
        writer: the bank.
        n: traces per problem; problems with fewer stored get the missing ones, those with ``n`` are skipped.
        benchmark: the benchmark name recorded with each problem.
        positions: each problem's position in the benchmark (chunk assignment); default 0, 1, 2...
        concurrency: problems in flight at once.
        progress: receives one line per finished problem and per completed chunk.

    Raises:
        EngineUnavailable: the engine cannot serve at all (problems finished before it are kept).
    """
    if n < 1 or concurrency < 1:
        raise ConfigError(f"draw_bank: n and concurrency must be >= 1, got n={n}, concurrency={concurrency}")
    positions = list(range(len(problems))) if positions is None else list(positions)
    if len(positions) != len(problems):
        raise ConfigError("draw_bank: one position per problem")
    say = progress or logger.info
    summary = DrawSummary(problems=len(problems))
    started = time.perf_counter()
    prompt_tokens: dict[int, int] = {}

    def hook(request: GenerationRequest, usage: Any) -> None:
        prompt_tokens[id(request)] = usage.prompt_tokens

    remove = engine.add_usage_hook(hook)
    records = await _to_draw(problems, positions, make_request, writer, n=n, benchmark=benchmark)
    summary.skipped = len(problems) - len(records)
    pending_per_chunk: dict[int, int] = {}
    for _, position, _, _, _ in records:
        chunk = writer.chunk_of(position)
        pending_per_chunk[chunk] = pending_per_chunk.get(chunk, 0) + 1
    if summary.skipped:
        say(f"[sample] {summary.skipped} of {len(problems)} problems already have {n} traces")
    gate = asyncio.Semaphore(concurrency)

    async def one(problem: Problem, request: GenerationRequest, record: BankedProblem, have: int) -> None:
        async with gate:
            request = request.replace(n=n - have)
            try:
                samples, prompt = await _stream_samples(engine, request, prompt_tokens)
            except EngineUnavailable:
                raise
            except EngineError as err:
                logger.warning("problem %s failed: %s", problem.id, err)
                summary.failed.append((problem.id, f"{type(err).__name__}: {err}"))
                say(f"[sample] {problem.id}: failed ({type(err).__name__}: {err})")
                return
            rendered = _render(engine, request)
            record = dataclasses.replace(record, prompt_tokens=prompt, rendered=rendered)
            await asyncio.to_thread(writer.add, record, samples)
            tokens = sum(s.num_tokens for s in samples)
            summary.drawn += 1
            summary.samples += len(samples)
            summary.tokens += tokens
            elapsed = time.perf_counter() - started
            done = summary.drawn + len(summary.failed)
            say(
                f"[sample] {problem.id}: {len(samples)} traces, {tokens:,} tokens "
                f"({done}/{len(records)}, {summary.tokens / elapsed:.1f} tok/s overall)"
            )
            chunk = writer.chunk_of(record.position)
            pending_per_chunk[chunk] -= 1
            if pending_per_chunk[chunk] == 0:
                path = writer.chunk_path(chunk)
                summary.complete_chunks.append(str(path))
                say(f"[sample] {path.name} complete")

    try:
        async with asyncio.TaskGroup() as tg:
            for problem, _, request, record, have in records:
                tg.create_task(one(problem, request, record, have))
    except* EngineUnavailable as group:
        raise group.exceptions[0] from None
    finally:
        remove()
        summary.seconds = time.perf_counter() - started
    return summary


_ToDraw = tuple[Problem, int, GenerationRequest, BankedProblem, int]
"""A problem still short of traces: the problem, its position, its request, its bank record, traces stored."""


async def _to_draw(
    problems: Sequence[Problem],
    positions: Sequence[int],
    make_request: Callable[[Problem], GenerationRequest],
    writer: BankWriter,
    *,
    n: int,
    benchmark: str,
) -> list[_ToDraw]:
    """The problems that have fewer than ``n`` traces in the bank, with what is stored of each."""
    out = []
    for problem, position in zip(problems, positions, strict=True):
        request = make_request(problem)
        record = BankedProblem.of(
            request, benchmark=benchmark, problem_id=problem.id, prompt_tokens=0, position=position
        )
        have = await asyncio.to_thread(writer.stored, record)
        if have < n:
            out.append((problem, position, request, record, have))
    return out


def _render(engine: Engine, request: GenerationRequest) -> str | None:
    """The prompt as the engine renders it (chat template applied), when the engine can say."""
    render = getattr(engine, "render", None)
    if not callable(render):
        return None
    try:
        text = render(request)
    except BranchwiseError as err:
        logger.debug("could not render the prompt for the bank: %s", err)
        return None
    return text if isinstance(text, str) else None


def _bank_meta(
    benchmark: Benchmark, pipeline: Pipeline, example: GenerationRequest, *, n: int, logprobs: int
) -> dict[str, Any]:
    """What every chunk of a pipeline's bank records about how it was drawn."""
    engine = pipeline.engine
    return {
        "benchmark": benchmark.name,
        "data": benchmark.source,
        "data_sha256": benchmark.sha256,
        "model": engine.model,
        "backend": engine.backend,
        "n": n,
        "logprobs": logprobs,
        "max_tokens": example.max_tokens,
        "settings": sampling_settings(example),
        "prompt_template": dataclasses.asdict(pipeline.prompt),
        "strategy": getattr(pipeline.strategy, "name", None),
        "spec": pipeline.spec.redacted() if pipeline.spec is not None else None,
    }


async def draw_pipeline_bank(
    spec_path: str | Path,
    benchmark_name: str,
    out: str | Path,
    *,
    n: int,
    data: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    concurrency: int = 4,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logprobs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    hash_weights: bool = True,
    argv: Sequence[str] = (),
    progress: Progress | None = None,
) -> DrawSummary:
    """Draw a bank with a YAML pipeline's engine, prompt template and sampling settings (``branchwise sample``).

    The pipeline is built as ``branchwise eval`` builds it (the benchmark's prompt, grader and extractor for
    whatever the YAML leaves unset); each problem's request is the one its strategy's `SearchContext` sends.

    Args:
        spec_path: the pipeline YAML.
        benchmark_name: the benchmark (see `branchwise.evals.datasets.load_benchmark`).
        out: the bank folder.
        n: traces per problem.
        data: the benchmark file (default: ``$BRANCHWISE_BENCHMARKS``), ignored by generated sets.
        limit: problems to draw (default: all after ``offset``).
        offset: the first problem's position.
        concurrency: problems in flight.
        chunk_size: problems per chunk file.
        logprobs: top-k alternatives per token (default: the strategy's ``top_logprobs``, else 5).
        overrides: dotted-path overrides of the spec.
        seed: seed of generated benchmarks.
        hash_weights: hash the model weights into the reproducibility record.
        argv: the command line, recorded.
        progress: receives progress lines.
    """
    if offset < 0 or (limit is not None and limit < 1):
        raise ConfigError(f"offset must be >= 0 and limit >= 1, got offset={offset}, limit={limit}")
    spec = load_spec(spec_path, overrides=overrides)
    benchmark = load_benchmark(benchmark_name, data, limit, seed=seed, offset=offset)
    problems = benchmark.problems
    config = pipeline_configs(spec, benchmark, [])[0]
    resolved = config.spec.resolved()
    engines = build_engines(resolved)
    pipeline = Pipeline.from_spec(config.spec, engines=engines)
    try:
        engine = pipeline.engine
        await engine.start()
        top = logprobs if logprobs is not None else getattr(pipeline.strategy, "top_logprobs", None) or 5
        s = pipeline.settings
        ctx = SearchContext(
            engine=engine, prompt=pipeline.prompt, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens
        )

        def make_request(problem: Problem) -> GenerationRequest:
            return ctx.request(problem.question, logprobs=top)

        meta = _bank_meta(benchmark, pipeline, make_request(problems[0]), n=n, logprobs=top)
        repro = reproducibility_record(
            engines=engines,
            seeds={"runtime.seed": resolved.runtime.seed, "benchmark.seed": seed},
            settings={"benchmark": benchmark.name, "data": benchmark.source, "data_sha256": benchmark.sha256,
                      "n": n, "concurrency": concurrency, "offset": offset, "limit": limit,
                      "max_num_seqs": resolved.runtime.max_num_seqs, "dtype": resolved.runtime.dtype},
            hash_weights=hash_weights,
        )  # fmt: skip
        with BankWriter(out, meta=meta, chunk_size=chunk_size, repro=repro, argv=argv) as writer:
            return await draw_bank(
                engine,
                problems,
                make_request,
                writer,
                n=n,
                benchmark=benchmark.name,
                positions=range(offset, offset + len(problems)),
                concurrency=concurrency,
                progress=progress,
            )
    finally:
        await pipeline.aclose()
        for built in engines.values():
            await built.aclose()


class BankRecorder(Engine):
    """Wraps a live engine and banks every trace it streams, finished or cut short (for fidelity checks).

    Each call's traces are stored when the call ends, under the request's prompt and settings, with indices
    reserved in the order the calls started; so replaying the bank with ``order="banked"`` hands the same run's
    requests the same traces, and its decisions repeat. Calls are written synchronously (small, fast commits).

    Args:
        engine: the live engine (not closed by `aclose`).
        writer: the bank to write into.
        benchmark: benchmark name recorded with each problem.
        problem_id: names a request's problem (default: the first 16 hex digits of its hash).
    """

    def __init__(
        self,
        engine: Engine,
        writer: BankWriter,
        *,
        benchmark: str = "recorded",
        problem_id: Callable[[GenerationRequest], str] | None = None,
    ) -> None:
        super().__init__(model=engine.model)
        self.engine = engine
        self.backend = engine.backend
        self.writer = writer
        self.benchmark = benchmark
        self._problem_id = problem_id
        self._next_index: dict[str, int] = {}

    @property
    def capabilities(self) -> Capabilities:
        return self.engine.capabilities

    async def start(self) -> None:
        await self.engine.start()

    def _record(self, request: GenerationRequest, prompt_tokens: int) -> BankedProblem:
        record = BankedProblem.of(request, benchmark=self.benchmark, problem_id="", prompt_tokens=prompt_tokens)
        pid = self._problem_id(request) if self._problem_id is not None else record.hash[:16]
        return dataclasses.replace(record, problem_id=pid)

    async def _stream(self, request: GenerationRequest, meter: CallMeter) -> AsyncGenerator[Delta, None]:
        inner, inner_meter = self.engine, CallMeter()
        key = self._record(request, 0)
        start = self._next_index.get(key.hash)
        if start is None:
            start = self.writer.stored(key)
        self._next_index[key.hash] = start + request.n
        started = time.perf_counter()
        builders = [SampleBuilder(i, started) for i in range(request.n)]
        try:
            async with contextlib.aclosing(inner._metered(request, inner_meter)) as deltas:
                async for delta in deltas:
                    meter.prompt_tokens = inner_meter.prompt_tokens
                    builders[delta.index].add(delta, time.perf_counter())
                    yield delta
        except BaseException as err:
            inner._report(request, inner_meter, err)
            raise
        else:
            inner._emit(request, inner_meter.usage(request))
        finally:
            meter.prompt_tokens = inner_meter.prompt_tokens
            samples = [b.build(request.max_tokens) for b in builders]
            self.writer.add(self._record(request, inner_meter.prompt_tokens), samples, start_index=start)

    def __repr__(self) -> str:
        return f"BankRecorder({self.engine!r}, {str(self.writer.root)!r})"
