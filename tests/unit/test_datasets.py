"""Benchmark loaders: the shared JSONL files, malformed rows, the registry, and URL downloads with sha256 checks
against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from branchwise.errors import ConfigError, DatasetError, UnknownNameError
from branchwise.evals.datasets import (
    BENCHMARKS_ENV,
    Problem,
    available_benchmarks,
    datasets_cache,
    fetch,
    load_benchmark,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared benchmark data at {SHARED}")

EXPECTED = {
    "gsm8k": (1319, "numeric", "gsm8k_test.jsonl"),
    "math500": (500, "math", "math500.jsonl"),
    "aime24": (30, "math", "aime24.jsonl"),
    "amc23": (40, "math", "amc23.jsonl"),
    "nq_open": (3610, "qa", "nq_open_dev.jsonl"),
    "triviaqa": (3000, "qa", "triviaqa_sub.jsonl"),
    "strategyqa": (2289, "yesno", "strategyqa.jsonl"),
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BRANCHWISE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@needs_shared
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_files_load_with_their_grader(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    count, grader, filename = EXPECTED[name]
    monkeypatch.setenv(BENCHMARKS_ENV, str(SHARED))
    bench = load_benchmark(name)
    assert len(bench) == count
    assert bench.grader == grader and bench.make_grader().name == grader
    assert len({p.id for p in bench.problems}) == count
    assert all(p.question.strip() and p.gold and p.benchmark == name for p in bench.problems)
    assert bench.sha256 == hashlib.sha256((SHARED / filename).read_bytes()).hexdigest()
    # the same file by explicit path, limited
    first = load_benchmark(name, SHARED / filename, limit=5)
    assert first.problems == bench.problems[:5]


@needs_shared
def test_fields_are_read_the_standard_way() -> None:
    gsm = load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl", limit=1).problems[0]
    assert gsm.gold == ("18",) and gsm.question.startswith("Janet")
    math = load_benchmark("math500", SHARED / "math500.jsonl", limit=1).problems[0]
    assert math.id == "test/precalculus/807.json" and math.level == "2"
    assert math.gold == ("\\left( 3, \\frac{\\pi}{2} \\right)",)
    assert math.metadata["subject"] == "Precalculus"
    assert load_benchmark("math500", SHARED / "math500.jsonl").levels == ["1", "2", "3", "4", "5"]
    amc = load_benchmark("amc23", SHARED / "amc23.jsonl", limit=1).problems[0]
    assert amc.gold == ("27",)  # 27.0 in the file
    aime = load_benchmark("aime24", SHARED / "aime24.jsonl", limit=1).problems[0]
    assert aime.id == "aime24-60" and aime.gold == ("204",)
    trivia = load_benchmark("triviaqa", SHARED / "triviaqa_sub.jsonl", limit=1).problems[0]
    assert trivia.question == "Brunswick, Lancastrian and Pearl Pickler are types of which vegetable?"
    assert trivia.gold[0] == "Onion" and "Allium cepa" in trivia.gold and len(set(trivia.gold)) == len(trivia.gold)
    strategy = load_benchmark("strategyqa", SHARED / "strategyqa.jsonl", limit=1).problems[0]
    assert strategy.question == "Was the Louisiana Purchase made with bitcoin?" and strategy.gold == ("No",)
    nq = load_benchmark("nq_open", SHARED / "nq_open_dev.jsonl", limit=1).problems[0]
    assert nq.gold == ("14 December 1972 UTC", "December 1972")


def test_generated_arithmetic_is_seeded_with_levels() -> None:
    a = load_benchmark("arithmetic", limit=12, seed=3)
    b = load_benchmark("arithmetic", limit=12, seed=3)
    assert a.problems == b.problems and len(a) == 12
    assert a.levels == ["1", "2", "3", "4", "5"]
    assert a.problems != load_benchmark("arithmetic", limit=12, seed=4).problems
    assert a.source == "generated:arithmetic(seed=3)"


def test_registry_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"gsm8k", "math500", "aime24", "amc23", "nq_open", "triviaqa", "strategyqa", "arithmetic"} <= set(
        available_benchmarks()
    )
    with pytest.raises(UnknownNameError, match="Did you mean 'gsm8k'") as info:
        load_benchmark("gsm8")
    assert "gsm8k" in info.value.suggestions
    monkeypatch.delenv(BENCHMARKS_ENV, raising=False)
    with pytest.raises(DatasetError, match=BENCHMARKS_ENV):
        load_benchmark("gsm8k")
    with pytest.raises(ConfigError, match="limit"):
        load_benchmark("arithmetic", limit=0)


def test_env_folder_and_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BENCHMARKS_ENV, str(tmp_path))
    with pytest.raises(DatasetError, match=r"gsm8k_test\.jsonl.*not found"):
        load_benchmark("gsm8k")
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    assert load_benchmark("gsm8k").problems[0].gold == ("2",)


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        ("gsm8k", ['{"question": "q", "answer": "#### 1"}', "", "{not json"], r"bad.jsonl:3: invalid JSON"),
        ("gsm8k", ['{"question": "q", "answer": "#### 1"}', "[1, 2]"], r"bad.jsonl:2: expected a JSON object"),
        ("gsm8k", ['{"question": "q", "answer": "no marker"}'], r"bad.jsonl:1: bad gsm8k row: .*'####'"),
        ("gsm8k", ['{"answer": "#### 3"}'], r"bad.jsonl:1: bad gsm8k row: missing field 'question'"),
        ("math500", ['{"problem": "p", "answer": ["x"]}'], r"bad.jsonl:1: .*'answer' must be str or int or float"),
        ("nq_open", ['{"question": "q", "answer": []}'], r"bad.jsonl:1: .*non-empty"),
        ("strategyqa", ['{"query": "Q: x\\nA:", "choices": ["Yes", "No"], "gold": 5}'], r"bad.jsonl:1: .*gold index"),
        ("triviaqa", ['{"context": "Question: x\\nAnswer:"}'], r"bad.jsonl:1: .*missing field 'answer'"),
        ("aime24", ['{"id": 1, "problem": "p", "answer": "1"}', '{"id": 1, "problem": "p", "answer": "2"}'],
         r"bad.jsonl:2: duplicate problem id"),
        ("gsm8k", [""], r"no problems"),
    ],
)  # fmt: skip
def test_malformed_rows_name_file_and_line(tmp_path: Path, name: str, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        load_benchmark(name, path)
    assert info.value.source == str(path)


def test_local_file_checksum(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_benchmark("gsm8k", path, sha256=digest).sha256 == digest
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        load_benchmark("gsm8k", path, sha256="0" * 64)


def test_problem_validation() -> None:
    with pytest.raises(ConfigError):
        Problem("x", "q", "gold", "b")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Problem("", "q", ("1",), "b")


def test_extraction_rules_per_kind() -> None:
    qa = load_benchmark("arithmetic", limit=1)  # numeric rules
    assert qa.extractor().extract("so 3 + 4 = 7. The answer is 7.") == "7"
    from branchwise.evals.datasets import QA_RULES, YESNO_RULES
    from branchwise.verifiers.extraction import AnswerExtractor

    assert AnswerExtractor(QA_RULES).extract("It was built long ago.\nThe answer is the Eiffel Tower.") == (
        "the Eiffel Tower"
    )
    assert AnswerExtractor(QA_RULES).extract("Thinking...\nAnswer: Paris") == "Paris"
    # QA answers keep their units and currency (the math rule would reduce them to the number)
    assert AnswerExtractor(QA_RULES).extract("The answer is **54 Mbit/s**. Done") == "54 Mbit/s"
    assert AnswerExtractor(QA_RULES).extract("The answer is $60 abroad.") == "$60 abroad"
    assert AnswerExtractor(QA_RULES).extract("No marker here\nLondon") == "London"
    assert AnswerExtractor(YESNO_RULES).extract("Bitcoin did not exist then. The answer is no.") == "no"
    assert AnswerExtractor(YESNO_RULES).extract("Hmm, yes, I think so") == "yes"


# ---------------------------------------------------------------------------------------------------------
# URL downloads against a real server


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, http.server.ThreadingHTTPServer]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.server
def test_url_download_verified_cached_and_offline(
    server: tuple[str, Path, http.server.ThreadingHTTPServer], cache: Path
) -> None:
    base, root, httpd = server
    rows = [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(5)]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (root / "gsm8k_test.jsonl").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    url = f"{base}/gsm8k_test.jsonl"

    # a wrong hash: clear error, nothing cached (not even a partial file)
    with pytest.raises(DatasetError, match=r"sha256 mismatch.*nothing was cached"):
        load_benchmark("gsm8k", url, sha256="f" * 64)
    assert not datasets_cache().exists() or not any(datasets_cache().iterdir())
    # a URL needs a hash
    with pytest.raises(ConfigError, match="sha256"):
        load_benchmark("gsm8k", url)
    # missing file: the HTTP status is named
    with pytest.raises(DatasetError, match="HTTP 404"):
        fetch(f"{base}/nope.jsonl", digest)

    bench = load_benchmark("gsm8k", url, sha256=digest.upper(), limit=3)
    assert [p.gold for p in bench.problems] == [("1",), ("2",), ("3",)]
    assert bench.source == url and bench.sha256 == digest
    cached = list(datasets_cache().iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == data

    # the server goes away: the cache still serves the file
    httpd.shutdown()
    httpd.server_close()
    again = load_benchmark("gsm8k", url, sha256=digest)
    assert len(again) == 5
    # a corrupted cache entry is detected and re-downloaded (fails here: the server is gone)
    cached[0].write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match="download failed"):
        fetch(url, digest)
    assert not any(p.is_file() and p.read_bytes() == b"corrupt" for p in datasets_cache().iterdir())


def test_fetch_rejects_bad_hash_strings(cache: Path) -> None:
    with pytest.raises(ConfigError, match="64 hex"):
        fetch("http://127.0.0.1:9/x.jsonl", "abc")


def test_generated_multihop_with_hops_as_levels() -> None:
    pytest.importorskip("branchwise.evals.multihop")
    bench = load_benchmark("multihop", limit=8, seed=2)
    assert len(bench) == 8 and bench.grader == "qa"
    assert bench.problems == load_benchmark("multihop", limit=8, seed=2).problems
    assert all(p.level is not None and 2 <= int(p.level) <= 8 for p in bench.problems)
    assert all(p.metadata["entities"] and p.gold[0] for p in bench.problems)


def test_offset_takes_a_window_that_keeps_positions() -> None:
    whole = load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl")
    tail = load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl", limit=3, offset=len(whole) - 5)
    assert tail.problems == whole.problems[-5:-2]  # same ids, questions and gold as in the whole file
    assert load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl", offset=len(whole) - 2).problems == whole.problems[-2:]
    generated = load_benchmark("arithmetic", limit=4, offset=2, seed=3)
    assert generated.problems == load_benchmark("arithmetic", limit=6, seed=3).problems[2:]
    with pytest.raises(DatasetError, match=f"no problems at offset {len(whole)}"):
        load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl", offset=len(whole))
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match="offset must be"):
            load_benchmark("gsm8k", SHARED / "gsm8k_test.jsonl", offset=bad)  # type: ignore[arg-type]
