"""The SQLite results store: WAL mode, one row per (config, problem), round trips, run records, read-only use."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from branchwise.errors import ConfigError
from branchwise.evals.store import ConfigRecord, ResultRow, ResultsStore


def make_row(pid: str, *, config: str = "c1", correct: bool = True, error: str | None = None) -> ResultRow:
    return ResultRow(
        config_id=config,
        problem_id=pid,
        level="2",
        gold=("12", "twelve"),
        answer="12" if correct else "13",
        correct=correct,
        score=1.0 if correct else 0.0,
        candidates=[{"answer": "12", "correct": True, "cluster": 0, "confidence": -0.3, "tokens": 7}],
        votes={"12": 1.0},
        usage={"prompt_tokens": 20, "completion_tokens": 7, "aborted_tokens": 1, "calls": 1, "wall_time_s": 0.5},
        latency_s=0.25,
        budget_exhausted=False,
        error=error,
        started_at=100.0,
        finished_at=100.25,
        run_id=None,
    )


@pytest.fixture
def store(tmp_path: Path) -> ResultsStore:
    s = ResultsStore(tmp_path / "sub" / "results.db")
    s.register(ConfigRecord("c1", "first", "gsm8k", {"n": 4}))
    return s


def test_wal_mode_and_schema(store: ResultsStore) -> None:
    other = sqlite3.connect(store.path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = {row[1] for row in other.execute("PRAGMA table_info(results)")}
    assert {"config_id", "problem_id", "answer", "correct", "candidates", "usage", "latency_s"} <= columns
    indexes = [r for r in other.execute("PRAGMA index_list(results)") if r[2]]  # unique ones
    unique_cols = {tuple(c[2] for c in other.execute(f"PRAGMA index_info({r[1]!r})")) for r in indexes}
    assert ("config_id", "problem_id") in unique_cols
    other.close()
    assert store.integrity_check() == "ok"


def test_row_round_trip_and_no_duplicates(store: ResultsStore) -> None:
    row = make_row("p1")
    assert store.add(row) is True
    assert store.add(make_row("p1", correct=False)) is False  # the first one is kept
    assert store.count("c1") == 1 and store.count() == 1
    (back,) = store.rows("c1")
    assert back == row
    assert back.usage_int("completion_tokens") == 7 and back.usage_int("missing") == 0
    # the constraint holds at the SQL level too
    raw = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        raw.execute(
            "INSERT INTO results(config_id, problem_id, gold, correct, score, candidates, votes, usage, "
            "prompt_tokens, completion_tokens, aborted_tokens, calls, latency_s, budget_exhausted, started_at, "
            "finished_at) VALUES ('c1', 'p1', '[]', 0, 0, '[]', '{}', '{}', 0, 0, 0, 0, 0, 0, 0, 0)"
        )
    raw.close()


def test_rows_are_visible_to_other_connections_at_once(store: ResultsStore) -> None:
    store.add(make_row("p1"))
    reader = ResultsStore(store.path, readonly=True)
    assert [r.problem_id for r in reader.rows()] == ["p1"]
    store.add(make_row("p2"))
    assert reader.done("c1") == {"p1", "p2"}
    with pytest.raises(ConfigError, match="read-only"):
        reader.add(make_row("p3"))
    reader.close()


def test_configs_and_runs(store: ResultsStore) -> None:
    store.register(ConfigRecord("c1", "first", "gsm8k", {"n": 4}))  # idempotent
    with pytest.raises(ConfigError, match="other parameters"):
        store.register(ConfigRecord("c1", "first", "gsm8k", {"n": 8}))
    store.register(ConfigRecord("c2", "second", "gsm8k", {"n": 8, "nested": {"a": [1, 2]}}))
    assert [(c.config_id, c.label, c.params) for c in store.configs()] == [
        ("c1", "first", {"n": 4}),
        ("c2", "second", {"n": 8, "nested": {"a": [1, 2]}}),
    ]
    run = store.start_run({"packages": {"vllm": "0.32.0"}, "seed": 0}, ["branchwise", "eval", "x.yaml"])
    (record,) = store.runs()
    assert record.status == "running" and record.finished_at is None
    assert record.repro["packages"]["vllm"] == "0.32.0" and record.argv[1] == "eval"
    store.finish_run(run, "finished")
    assert store.runs()[0].status == "finished" and store.runs()[0].finished_at is not None


def test_done_and_discard_errors(store: ResultsStore) -> None:
    store.add(make_row("p1"))
    store.add(make_row("p2", error="EngineTimeout: slow"))
    store.register(ConfigRecord("c2", "second", "gsm8k"))
    store.add(make_row("p3", config="c2"))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):  # rows belong to a registered config
        store.add(make_row("p4", config="unknown"))
    assert store.done("c1") == {"p1", "p2"}
    assert store.discard_errors("c1") == 1
    assert store.done("c1") == {"p1"} and store.done("c2") == {"p3"}


def test_concurrent_writers_from_threads(store: ResultsStore) -> None:
    threads = [
        threading.Thread(target=lambda i=i: [store.add(make_row(f"t{i}-{j}")) for j in range(10)]) for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count("c1") == 60
    assert store.integrity_check() == "ok"


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ResultsStore(tmp_path / "missing.db", readonly=True)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ConfigError, match="not a usable results store"):
        ResultsStore(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(ConfigError, match="not a branchwise results store"):
        ResultsStore(other, readonly=True)


def test_context_manager_closes(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.db") as s:
        s.register(ConfigRecord("c", "c", "b"))
    with pytest.raises(sqlite3.ProgrammingError):
        s.configs()


def test_package_exports_resolve_lazily() -> None:
    import importlib
    import sys

    evals = importlib.import_module("branchwise.evals")
    for name in evals.__all__:
        assert getattr(evals, name) is not None, name
    assert "branchwise.evals.runner" in sys.modules
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        evals.nope  # noqa: B018
