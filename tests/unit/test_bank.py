"""The trace bank store: exact round trips of the packed arrays, chunk files, resuming, crash safety, compactness,
and drawing a bank with a YAML pipeline's prompt and settings."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sqlite3
import struct
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from branchwise.cli import main
from branchwise.engine.replay import ReplayEngine
from branchwise.engine.testing import FunctionEngine, ScriptedResponse
from branchwise.engine.tracebank import BankedProblem, BankedSample, TraceBank, pack_floats, unpack
from branchwise.engine.types import GenerationRequest
from branchwise.errors import ConfigError, EngineRequestError, EngineUnavailable
from branchwise.evals.bank import BankWriter, draw_bank, draw_pipeline_bank
from branchwise.evals.datasets import Problem, load_benchmark
from branchwise.evals.pipelines import pipeline_configs
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.spec import load_spec
from branchwise.search.base import SearchContext

REQUEST = GenerationRequest(prompt="What is 2 + 2?", temperature=0.7, max_tokens=16, logprobs=5)


def problem(pid: str = "p0", position: int | None = 0, request: GenerationRequest = REQUEST) -> BankedProblem:
    return BankedProblem.of(request, benchmark="toy", problem_id=pid, prompt_tokens=7, position=position)


def odd_sample(index: int = 0) -> BankedSample:
    """Values that catch lossy storage: float64-only logprobs, -inf, NaN, unicode, multi-token and empty deltas."""
    return BankedSample(
        index=index,
        token_ids=(5, 70000, 3, 2**31 - 1),
        logprobs=(-0.1, float("-inf"), -1e-12, -3.3333333333333335),
        top_mean=(-1.2345678901234567, math.nan, -0.5, -99.99999999999999),
        top_counts=(5, 0, 1, 5),
        token_texts=("Ünï", "", " cödé", " 🙂"),
        delta_tokens=(1, 2, 0, 1),
        delta_texts=("Ünï", " cödé", "", " 🙂"),
        finish_reason="stop",
        stop_reason="</s>",
        max_tokens=16,
        ttft_s=0.25,
        decode_s=1.5,
    )


def bits(sample: BankedSample) -> tuple[Any, ...]:
    """Everything of a sample, floats as their exact bit patterns (NaN included)."""
    fields = []
    for name in BankedSample.__dataclass_fields__:
        value = getattr(sample, name)
        if isinstance(value, tuple) and value and isinstance(value[0], float):
            value = tuple(struct.pack("<d", v) for v in value)
        fields.append((name, value))
    return tuple(fields)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    samples = [odd_sample(0), BankedSample(1, (), (), (), (), (), (0,), ("",), "stop", 2, 16)]
    with BankWriter(tmp_path / "bank", meta={"model": "m"}) as writer:
        writer.add(problem(), samples)
    bank = TraceBank(tmp_path / "bank")
    [stored] = bank.find(problem().prompt)
    assert stored == problem()
    loaded = bank.samples(stored)
    assert [bits(s) for s in loaded] == [bits(s) for s in samples]
    assert loaded[1].stop_reason == 2  # a stop token id stays an int
    assert bank.meta["model"] == "m" and bank.meta["format"] == 1 and bank.meta["chunk_size"] == 50


def test_floats_are_packed_as_float32_only_when_exact() -> None:
    single = [struct.unpack("<f", struct.pack("<f", random.uniform(-20, 0)))[0] for _ in range(1000)]
    assert unpack(pack_floats(single)).typecode == "f"  # type: ignore[union-attr]
    assert list(unpack(pack_floats(single))) == single
    double = [*single[:-1], -0.1]
    assert unpack(pack_floats(double)).typecode == "d"  # type: ignore[union-attr]
    assert list(unpack(pack_floats(double))) == double


def test_chunk_files_by_position_each_complete(tmp_path: Path) -> None:
    repro = {"engines": {"policy": {"model": "m"}}}
    with BankWriter(tmp_path, meta={"model": "m", "n": 1}, chunk_size=2, repro=repro, argv=["sample"]) as writer:
        for pos in range(5):
            writer.add(problem(f"p{pos}", pos, REQUEST.replace(prompt=f"Q{pos}")), [odd_sample()])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["chunk-0000.db", "chunk-0001.db", "chunk-0002.db"]  # no journal or WAL files left
    for chunk, name in enumerate(files):
        conn = sqlite3.connect(tmp_path / name)
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        assert meta["chunk"] == chunk and meta["model"] == "m"
        [(argv, record)] = conn.execute("SELECT argv, repro FROM draws").fetchall()
        assert json.loads(argv) == ["sample"] and json.loads(record) == repro
        positions = [r[0] for r in conn.execute("SELECT position FROM problems ORDER BY position")]
        assert positions == [p for p in range(5) if p // 2 == chunk]
        conn.close()
    bank = TraceBank(tmp_path)
    assert bank.problem_count == 5 and bank.stats().files == 3
    with pytest.raises(ConfigError, match="drawn with model='m'"):
        BankWriter(tmp_path, meta={"model": "other"}, chunk_size=2)
    with pytest.raises(ConfigError, match="chunk_size=2"):
        BankWriter(tmp_path, meta={"model": "m"}, chunk_size=3)


def toy_engine(calls: list[GenerationRequest] | None = None, fail: set[str] | None = None) -> FunctionEngine:
    def reply(request: GenerationRequest) -> Any:
        if calls is not None:
            calls.append(request)
        prompt = request.messages[-1].content if request.messages else request.prompt or ""
        if fail and any(f in prompt for f in fail):
            return EngineRequestError("prompt too long")
        return ScriptedResponse(tuple(f"Trace {i} of {prompt} The answer is {i}." for i in range(request.n)))

    return FunctionEngine(reply, model="toy-model")


PROBLEMS = [Problem(f"q{i}", f"Question {i}?", (str(i),), "toy") for i in range(6)]


def make_request(p: Problem) -> GenerationRequest:
    return SearchContext(engine=toy_engine(), max_tokens=32).request(p.question, logprobs=5)


async def test_resume_skips_complete_problems_and_tops_up(tmp_path: Path) -> None:
    calls: list[GenerationRequest] = []
    engine = toy_engine(calls)
    with BankWriter(tmp_path, meta={"model": "toy-model"}, chunk_size=4) as writer:
        first = await draw_bank(engine, PROBLEMS, make_request, writer, n=3, benchmark="toy", concurrency=2)
    assert (first.drawn, first.skipped, first.samples) == (6, 0, 18)
    assert [c.n for c in calls] == [3] * 6
    assert first.complete_chunks == [str(tmp_path / "chunk-0000.db"), str(tmp_path / "chunk-0001.db")]

    calls.clear()
    with BankWriter(tmp_path, meta={"model": "toy-model"}, chunk_size=4) as writer:
        again = await draw_bank(engine, PROBLEMS, make_request, writer, n=3, benchmark="toy")
    assert (again.drawn, again.skipped) == (0, 6) and calls == []

    with BankWriter(tmp_path, meta={"model": "toy-model"}, chunk_size=4) as writer:
        more = await draw_bank(engine, PROBLEMS, make_request, writer, n=5, benchmark="toy")
    assert (more.drawn, more.samples) == (6, 12) and [c.n for c in calls] == [2] * 6
    bank = TraceBank(tmp_path)
    [record] = [p for p in bank.problems() if p.problem_id == "q0"]
    assert [s.index for s in bank.samples(record)] == [0, 1, 2, 3, 4]
    assert record.prompt_tokens > 0


async def test_failed_problems_are_not_stored_and_retried_later(tmp_path: Path) -> None:
    with BankWriter(tmp_path, meta={"model": "toy-model"}) as writer:
        summary = await draw_bank(
            toy_engine(fail={"Question 2?"}), PROBLEMS, make_request, writer, n=2, benchmark="toy"
        )
    assert summary.drawn == 5 and [pid for pid, _ in summary.failed] == ["q2"]
    assert "q2" not in {p.problem_id for p in TraceBank(tmp_path).problems()}
    calls: list[GenerationRequest] = []
    with BankWriter(tmp_path, meta={"model": "toy-model"}) as writer:
        retry = await draw_bank(toy_engine(calls), PROBLEMS, make_request, writer, n=2, benchmark="toy")
    assert (retry.drawn, retry.skipped, len(calls)) == (1, 5, 1)

    dead = FunctionEngine(lambda _r: EngineUnavailable("no server"), model="toy-model")
    with BankWriter(tmp_path / "other", meta={"model": "toy-model"}) as writer, pytest.raises(EngineUnavailable):
        await draw_bank(dead, PROBLEMS, make_request, writer, n=2, benchmark="toy")


async def test_concurrency_bounds_problems_in_flight(tmp_path: Path) -> None:
    engine = FunctionEngine(lambda r: ScriptedResponse(("a b c d e f",) * r.n), model="toy-model", token_delay=0.001)
    peak = 0
    real_stream = engine._stream

    async def watched(request: GenerationRequest, meter: Any) -> Any:
        nonlocal peak
        async for delta in real_stream(request, meter):
            peak = max(peak, engine.active)
            yield delta

    engine._stream = watched  # type: ignore[method-assign]
    with BankWriter(tmp_path, meta={"model": "toy-model"}) as writer:
        await draw_bank(engine, PROBLEMS, make_request, writer, n=2, benchmark="toy", concurrency=2)
    assert peak == 2


def test_a_failed_transaction_leaves_nothing_of_its_problem(tmp_path: Path) -> None:
    bad = BankedSample(1, (2**40,), (), (), (), (), (1,), ("x",), "stop", None, 16)  # packing it fails: int32
    with BankWriter(tmp_path, meta={"model": "m"}) as writer:
        writer.add(problem("good"), [odd_sample()])
        with pytest.raises(OverflowError):
            writer.add(problem("bad", request=REQUEST.replace(prompt="other")), [odd_sample(0), bad])
        assert writer.stored(problem("good")) == 1
    bank = TraceBank(tmp_path)
    assert [p.problem_id for p in bank.problems()] == ["good"]
    conn = sqlite3.connect(tmp_path / "chunk-0000.db")
    assert conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == 1
    conn.close()


CRASHING_DRAW = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from branchwise.engine.testing import FunctionEngine, ScriptedResponse
    from branchwise.evals.bank import BankWriter, draw_bank
    from branchwise.evals.datasets import Problem
    from branchwise.engine.tracebank import BankedSample
    from branchwise.engine.types import GenerationRequest

    to_row = BankedSample.to_row

    def dying_to_row(self, *args):
        if self.text == "trace 2 of Question 4?":
            os.kill(os.getpid(), signal.SIGKILL)  # killed inside problem q4's transaction, 2 rows in
        return to_row(self, *args)

    BankedSample.to_row = dying_to_row

    def reply(request):
        return ScriptedResponse(tuple(f"trace {i} of {request.prompt}" for i in range(request.n)))

    problems = [Problem(f"q{i}", f"Question {i}?", (str(i),), "toy") for i in range(8)]
    engine = FunctionEngine(reply, model="toy-model")
    writer = BankWriter(sys.argv[1], meta={"model": "toy-model"}, chunk_size=3)
    asyncio.run(draw_bank(engine, problems, lambda p: GenerationRequest(prompt=p.question, logprobs=5), writer,
                          n=4, benchmark="toy", concurrency=1))
    """
)


@pytest.mark.slow
async def test_a_killed_draw_loses_nothing_committed_and_resumes(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CRASHING_DRAW, str(tmp_path))
    assert await proc.wait() == -9
    assert (tmp_path / "chunk-0001.db-journal").exists()  # the transaction of q4 was open
    bank = TraceBank(tmp_path)  # what it wrote (nothing reached the .db file itself) is not visible
    done = sorted(p.problem_id for p in bank.problems())
    assert done == ["q0", "q1", "q2", "q3"]  # everything committed before the kill, complete
    assert all(len(bank.samples(p)) == 4 for p in bank.problems())
    bank.close()
    problems = [Problem(f"q{i}", f"Question {i}?", (str(i),), "toy") for i in range(8)]
    calls: list[GenerationRequest] = []

    def reply(request: GenerationRequest) -> ScriptedResponse:
        calls.append(request)
        return ScriptedResponse(tuple(f"trace {i} of {request.prompt}" for i in range(request.n)))

    with BankWriter(tmp_path, meta={"model": "toy-model"}, chunk_size=3) as writer:
        summary = await draw_bank(
            FunctionEngine(reply, model="toy-model"), problems,
            lambda p: GenerationRequest(prompt=p.question, logprobs=5), writer, n=4, benchmark="toy",
        )  # fmt: skip
    assert (summary.skipped, summary.drawn) == (4, 4) and sorted(c.prompt or "" for c in calls)[0] == "Question 4?"
    assert TraceBank(tmp_path).problem_count == 8
    assert sorted(os.listdir(tmp_path)) == ["chunk-0000.db", "chunk-0001.db", "chunk-0002.db"]


def test_compact_bank(tmp_path: Path) -> None:
    """Realistic per-token values (float32 logprobs, varied token ids and texts): well under 10 MB / 100k tokens."""
    rng = random.Random(0)
    words = [f" w{rng.randrange(5000)}" for _ in range(3000)]
    with BankWriter(tmp_path, meta={"model": "m"}) as writer:
        for p in range(20):
            samples = []
            for i in range(16):
                n = 300
                lps = [struct.unpack("<f", struct.pack("<f", -rng.expovariate(3)))[0] for _ in range(n)]
                texts = [rng.choice(words) for _ in range(n)]
                samples.append(
                    BankedSample(
                        i, tuple(rng.randrange(150_000) for _ in range(n)), tuple(lps),
                        tuple(-abs(rng.gauss(2, 1)) for _ in range(n)), (5,) * n, tuple(texts), (1,) * n,
                        tuple(texts), "stop", None, 384, 0.1, 10.0,
                    )
                )  # fmt: skip
            writer.add(problem(f"p{p}", p, REQUEST.replace(prompt=f"Q{p}")), samples)
    stats = TraceBank(tmp_path).stats()
    assert stats.tokens == 20 * 16 * 300
    assert stats.bytes_per_100k_tokens < 3_000_000, stats
    assert stats.decode_rate == pytest.approx(299 / 10.0) and stats.mean_ttft_s == pytest.approx(0.1)


PIPELINE = """
name: toy-sc
engine:
  backend: test
  default: ["I add them. The answer is 4.", "Hmm, The answer is 5.", "So The answer is 4."]
thought: {strategy: self_consistency, n: 2, max_tokens: 32, temperature: 0.6}
"""


async def test_draw_with_a_pipeline_then_run_that_pipeline_on_replay(tmp_path: Path) -> None:
    spec_path = tmp_path / "sc.yaml"
    spec_path.write_text(PIPELINE)
    lines: list[str] = []
    summary = await draw_pipeline_bank(
        spec_path, "arithmetic", tmp_path / "bank", n=4, limit=3, offset=2, concurrency=2, chunk_size=2,
        hash_weights=False, argv=["branchwise", "sample"], progress=lines.append,
    )  # fmt: skip
    assert (summary.drawn, summary.samples) == (3, 12)
    assert any("chunk-0001.db complete" in line for line in lines)
    bank = TraceBank(tmp_path / "bank")
    assert sorted(p.position or 0 for p in bank.problems()) == [2, 3, 4]
    assert bank.meta["n"] == 4 and bank.meta["logprobs"] == 5 and bank.meta["benchmark"] == "arithmetic"
    assert bank.meta["settings"]["temperature"] == 0.6 and bank.meta["max_tokens"] == 32

    # The pipeline's own strategy, run on replay, finds every request it sends in the bank.
    benchmark = load_benchmark("arithmetic", limit=5)
    config = pipeline_configs(load_spec(spec_path), benchmark, [])[0]
    replay = ReplayEngine(tmp_path / "bank", rate=0)
    pipeline = Pipeline.from_spec(config.spec, engines={"policy": replay})
    for p in benchmark.problems[2:5]:
        result = await pipeline.run(p.question)
        assert result.answer in ("4", "5")
        assert (
            replay.remaining(
                SearchContext(engine=replay)
                .request(p.question)
                .replace(messages=pipeline.prompt.messages(p.question), temperature=0.6, max_tokens=32)
            )
            == 2
        )
    await pipeline.aclose()


def test_sample_rows_never_change_after_commit(tmp_path: Path) -> None:
    """A bank chunk is immutable once drawn: reading it (replay) does not write to it."""
    with BankWriter(tmp_path, meta={"model": "m"}) as writer:
        writer.add(problem(), [odd_sample()])
    path = tmp_path / "chunk-0000.db"
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    bank = TraceBank(tmp_path)
    bank.samples(bank.find(problem().prompt)[0])
    bank.stats()
    bank.close()
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before


def test_sample_command_draws_then_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "sc.yaml"
    spec_path.write_text(PIPELINE)
    out = tmp_path / "bank"
    argv = ["sample", str(spec_path), "--benchmark", "arithmetic", "--n", "3", "--limit", "2", "--out", str(out)]
    assert main([*argv, "--no-hash", "--chunk-size", "1"]) == 0
    err = capsys.readouterr().err
    assert "chunk-0001.db complete" in err and "MB per 100k tokens" in err
    assert TraceBank(out).stats().samples == 6
    assert main([*argv, "--no-hash", "--chunk-size", "1"]) == 0
    assert "2 of 2 problems already have 3 traces" in capsys.readouterr().err
    assert main([*argv, "--chunk-size", "2"]) == 2  # a usage error: the bank's chunks hold 1 problem each
    assert "chunk_size=1" in capsys.readouterr().err
