"""The crash-safe results store: one SQLite file in WAL mode, one row per problem x configuration.

Tables:

- ``configs``: one row per configuration (``config_id`` is a hash of its parameters), with its label,
  benchmark and parameters (JSON).
- ``runs``: one row per invocation of the runner (a resume adds one), with the reproducibility record (JSON:
  package versions, engine arguments, model hash, seeds, dtype, concurrency...), the command line, start and end
  time and how it ended.
- ``results``: one row per (config, problem), ``UNIQUE(config_id, problem_id)``: the answer, correctness, all
  candidates (JSON), votes, usage, latency and timestamps.

Crash safety: every result row is written in its own transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) the moment
its problem finishes, with ``synchronous=FULL``. Killing the process at any moment (even ``kill -9``) loses at
most the problems in flight; a row is either entirely there or absent, and the UNIQUE constraint makes a second
row for the same (config, problem) impossible (`add` ignores it and says so). ``--resume`` skips the problems
whose rows exist.

A store may be used from several threads (the runner writes from a worker thread so the event loop never waits
on the disk); calls are serialised by a lock.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..errors import ConfigError

__all__ = ["SCHEMA_VERSION", "ConfigRecord", "ResultRow", "ResultsStore", "RunRecord"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS configs (
    config_id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    benchmark TEXT NOT NULL,
    params TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    argv TEXT NOT NULL,
    repro TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,
    config_id TEXT NOT NULL REFERENCES configs(config_id),
    problem_id TEXT NOT NULL,
    level TEXT,
    gold TEXT NOT NULL,
    answer TEXT,
    correct INTEGER NOT NULL,
    score REAL NOT NULL,
    candidates TEXT NOT NULL,
    votes TEXT NOT NULL,
    usage TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    aborted_tokens INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    budget_exhausted INTEGER NOT NULL,
    error TEXT,
    run_id INTEGER REFERENCES runs(run_id),
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    UNIQUE (config_id, problem_id)
);
CREATE INDEX IF NOT EXISTS results_by_config ON results(config_id);
"""


@dataclass(frozen=True)
class ConfigRecord:
    """One configuration of a run (a pipeline with its sweep overrides).

    Attributes:
        config_id: a stable id derived from the parameters (see `evals.runner.config_id`).
        label: a short human name ("thought.n=4").
        benchmark: the benchmark it runs on.
        params: everything that defines it (spec, overrides, prompt...), JSON-serialisable.
    """

    config_id: str
    label: str
    benchmark: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRecord:
    """One invocation of the runner, with its reproducibility record."""

    run_id: int
    started_at: float
    finished_at: float | None
    status: str
    argv: list[str]
    repro: dict[str, Any]


@dataclass(frozen=True)
class ResultRow:
    """The outcome of one problem under one configuration.

    Attributes:
        config_id: the configuration.
        problem_id: the problem.
        level: its difficulty level, if any.
        gold: accepted answers.
        answer: the answer given (None when there was none).
        correct: whether it was graded right.
        score: the grader's score in [0, 1].
        candidates: every candidate: answer, correct, score, confidence, tokens, cluster (JSON objects).
        votes: weight per answer cluster, as the strategy reported it.
        usage: what the problem cost (a `UsageSnapshot` as a dict).
        latency_s: seconds from start to finish of the problem.
        budget_exhausted: a budget cap of the configuration cut this problem short.
        error: an error message when the problem failed (then ``correct`` is False).
        started_at, finished_at: wall-clock timestamps (seconds since the epoch).
        run_id: the invocation that produced it.
    """

    config_id: str
    problem_id: str
    level: str | None
    gold: tuple[str, ...]
    answer: str | None
    correct: bool
    score: float
    candidates: list[dict[str, Any]]
    votes: dict[str, float]
    usage: dict[str, Any]
    latency_s: float
    budget_exhausted: bool = False
    error: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    run_id: int | None = None

    def usage_int(self, key: str) -> int:
        """An integer usage field (0 when absent)."""
        return int(self.usage.get(key, 0) or 0)


_ROW_COLUMNS = (
    "config_id, problem_id, level, gold, answer, correct, score, candidates, votes, usage, prompt_tokens, "
    "completion_tokens, aborted_tokens, calls, latency_s, budget_exhausted, error, run_id, started_at, finished_at"
)


class ResultsStore:
    """The results file. Open it, `register` configurations, `add` rows as problems finish.

    Args:
        path: the SQLite file (created with its folder when missing, unless ``readonly``).
        readonly: open an existing file for reading only (reports).

    Raises:
        ConfigError: the file is not a branchwise results store, has a newer schema, or (``readonly``) is missing.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly:
            if not self.path.is_file():
                raise ConfigError(f"results file {self.path} does not exist")
            uri = f"file:{self.path.resolve()}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._setup()
        except sqlite3.DatabaseError as err:
            self._db.close()
            raise ConfigError(f"{self.path} is not a usable results store: {err}") from err

    def _setup(self) -> None:
        db = self._db
        if not self.readonly:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(_SCHEMA)  # idempotent (IF NOT EXISTS)
            version = self._meta("schema_version")
            if version is None:
                self._write(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?), (?, ?)",
                    ("schema_version", str(SCHEMA_VERSION), "created_at", repr(time.time())),
                )
                version = str(SCHEMA_VERSION)
        else:
            version = self._meta("schema_version")
        if version is None or int(version) > SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: not a branchwise results store of schema <= {SCHEMA_VERSION}")

    def _meta(self, key: str) -> str | None:
        try:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # no meta table
            return None
        return None if row is None else str(row[0])

    def _write(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement in its own immediate transaction."""
        if self.readonly:
            raise ConfigError(f"{self.path} was opened read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return cursor

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    # -- configurations and runs ------------------------------------------------------------------------------
    def register(self, config: ConfigRecord) -> None:
        """Record a configuration (idempotent; the same id must always carry the same parameters).

        Raises:
            ConfigError: the id is known with different parameters or benchmark.
        """
        params = json.dumps(config.params, sort_keys=True, default=str)
        found = self._read("SELECT benchmark, params FROM configs WHERE config_id = ?", (config.config_id,))
        if found:
            if found[0][0] != config.benchmark or json.loads(found[0][1]) != json.loads(params):
                raise ConfigError(f"{self.path}: configuration {config.config_id} exists with other parameters")
            return
        self._write(
            "INSERT OR IGNORE INTO configs(config_id, label, benchmark, params, created_at) VALUES (?, ?, ?, ?, ?)",
            (config.config_id, config.label, config.benchmark, params, time.time()),
        )

    def configs(self) -> list[ConfigRecord]:
        """Every configuration, in the order they were registered."""
        rows = self._read("SELECT config_id, label, benchmark, params FROM configs ORDER BY created_at, rowid")
        return [ConfigRecord(cid, label, bench, json.loads(params)) for cid, label, bench, params in rows]

    def start_run(self, repro: Mapping[str, Any], argv: Sequence[str] = ()) -> int:
        """Record the start of an invocation with its reproducibility record; returns its run id."""
        cursor = self._write(
            "INSERT INTO runs(started_at, status, argv, repro) VALUES (?, 'running', ?, ?)",
            (time.time(), json.dumps(list(argv)), json.dumps(dict(repro), sort_keys=True, default=str)),
        )
        assert cursor.lastrowid is not None
        return int(cursor.lastrowid)

    def finish_run(self, run_id: int, status: str) -> None:
        """Record how an invocation ended ("finished", "budget", "failed", "interrupted")."""
        self._write("UPDATE runs SET finished_at = ?, status = ? WHERE run_id = ?", (time.time(), status, run_id))

    def runs(self) -> list[RunRecord]:
        """Every invocation, oldest first (a killed one stays "running" with no end time)."""
        rows = self._read("SELECT run_id, started_at, finished_at, status, argv, repro FROM runs ORDER BY run_id")
        return [RunRecord(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in rows]

    # -- results ------------------------------------------------------------------------------------------------
    def done(self, config_id: str) -> set[str]:
        """Problem ids that have a row under ``config_id``."""
        return {r[0] for r in self._read("SELECT problem_id FROM results WHERE config_id = ?", (config_id,))}

    def add(self, row: ResultRow) -> bool:
        """Write one result in its own transaction; returns False (and writes nothing) if the row exists."""
        usage = row.usage
        cursor = self._write(
            f"INSERT INTO results({_ROW_COLUMNS}) VALUES ({', '.join('?' * 20)}) "
            "ON CONFLICT(config_id, problem_id) DO NOTHING",
            (
                row.config_id,
                row.problem_id,
                row.level,
                json.dumps(list(row.gold)),
                row.answer,
                int(row.correct),
                float(row.score),
                json.dumps(row.candidates, default=str),
                json.dumps(row.votes),
                json.dumps(usage, default=str),
                int(usage.get("prompt_tokens", 0) or 0),
                int(usage.get("completion_tokens", 0) or 0),
                int(usage.get("aborted_tokens", 0) or 0),
                int(usage.get("calls", 0) or 0),
                float(row.latency_s),
                int(row.budget_exhausted),
                row.error,
                row.run_id,
                float(row.started_at),
                float(row.finished_at),
            ),
        )
        if cursor.rowcount == 0:
            logger.warning("result of %s under %s already stored; kept the first", row.problem_id, row.config_id)
            return False
        return True

    def rows(self, config_id: str | None = None) -> list[ResultRow]:
        """Stored results (of one configuration, or all), in the order they were written."""
        where, params = ("WHERE config_id = ?", (config_id,)) if config_id is not None else ("", ())
        records = self._read(f"SELECT {_ROW_COLUMNS} FROM results {where} ORDER BY row_id", params)
        return [_row(r) for r in records]

    def discard_errors(self, config_id: str) -> int:
        """Delete the rows of problems that failed (so a resume runs them again); returns how many."""
        return int(self._write("DELETE FROM results WHERE config_id = ? AND error IS NOT NULL", (config_id,)).rowcount)

    def count(self, config_id: str | None = None) -> int:
        """Number of stored results."""
        if config_id is None:
            return int(self._read("SELECT COUNT(*) FROM results")[0][0])
        return int(self._read("SELECT COUNT(*) FROM results WHERE config_id = ?", (config_id,))[0][0])

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict ("ok" when the file is sound)."""
        return str(self._read("PRAGMA integrity_check")[0][0])

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (committed rows are already durable)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"


def _row(r: Iterable[Any]) -> ResultRow:
    (cid, pid, level, gold, answer, correct, score, cands, votes, usage, *_tokens, latency, exhausted, error, run_id,
     started, finished) = r  # fmt: skip
    return ResultRow(
        config_id=cid,
        problem_id=pid,
        level=level,
        gold=tuple(json.loads(gold)),
        answer=answer,
        correct=bool(correct),
        score=float(score),
        candidates=json.loads(cands),
        votes=json.loads(votes),
        usage=json.loads(usage),
        latency_s=float(latency),
        budget_exhausted=bool(exhausted),
        error=error,
        started_at=float(started),
        finished_at=float(finished),
        run_id=run_id,
    )
