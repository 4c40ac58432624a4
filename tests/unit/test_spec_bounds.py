"""Hostile specs (issue 12 #1-#4): every spec under 1 MB is refused or accepted in bounded time and memory, files
that are not UTF-8 or not there are named as such, and every count a user sets has a documented upper bound."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from branchwise.budget import Budget
from branchwise.cli import main
from branchwise.engine.testing import ScriptedEngine
from branchwise.errors import ConfigError, SpecError
from branchwise.orchestrator.pipeline import Pipeline
from branchwise.orchestrator.spec import load_spec, load_spec_file
from branchwise.orchestrator.spec_schema import pipeline_json_schema
from branchwise.orchestrator.spec_yaml import MAX_ALIASES, MAX_NESTING, MAX_NODES, MAX_SPEC_BYTES
from branchwise.search import SelfConsistency
from branchwise.search.registry import MAX_SAMPLES

BASE = "engine: {backend: test, default: 'The answer is 4.'}\n"


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """9 levels of anchors, each a list of 9 aliases to the previous: 9**9 (387 million) leaves once expanded."""
    text = BASE + 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for level in range(1, levels):
        text += f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]\n"
    return text


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``fn()``'s result (or the exception it raised), the seconds of CPU it took, and its peak of Python
    allocations in bytes (from a second call under tracemalloc, which slows allocation down several times).

    CPU time rather than wall time: the shared test machines also run other processes."""

    def call() -> Any:
        try:
            return fn()
        except Exception as err:
            return err

    started = time.process_time()
    outcome = call()
    seconds = time.process_time() - started
    tracemalloc.start()
    try:
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, seconds, peak


# -- #1: the alias bomb and other blow-ups ----------------------------------------------------------------------
def test_a_billion_laughs_is_refused_in_milliseconds_and_little_memory() -> None:
    outcome, seconds, peak = measured(lambda: load_spec(billion_laughs()))
    assert isinstance(outcome, SpecError), outcome
    assert f"more than {MAX_ALIASES} aliases" in str(outcome) or f"more than {MAX_NODES:,} values" in str(outcome)
    assert seconds < 2.0 and peak < 20_000_000


def test_aliases_that_expand_past_the_value_limit_are_refused_even_when_few() -> None:
    # 4 levels of 8 aliases: 32 aliases in all, 8**4 x 600 values once expanded
    text = BASE + "l0: &l0 [" + ", ".join(["x"] * 600) + "]\n"
    for level in range(1, 5):
        text += f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 8) + "]\n"
    outcome, seconds, peak = measured(lambda: load_spec(text))
    assert isinstance(outcome, SpecError) and f"more than {MAX_NODES:,} values" in str(outcome)
    assert seconds < 2.0 and peak < 20_000_000


def test_the_cli_refuses_the_bomb_within_two_seconds_and_200_mb(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    # the peak resident size of this process image (VmHWM): getrusage's ru_maxrss would carry the forking
    # parent's peak over exec, and pytest's process is large
    code = (
        "import re, sys, time\n"
        "from branchwise.cli import main\n"
        "start = time.perf_counter()\n"
        "status = main(['validate', sys.argv[1]])\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
        "print(status, time.perf_counter() - start, peak)\n"
    )
    command = [sys.executable, "-c", code, str(bomb)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    status, seconds, max_rss_kib = done.stdout.split()
    assert status == "2" and "alias" in done.stderr
    assert float(seconds) < 2.0
    assert int(max_rss_kib) < 200 * 1024  # the whole process, interpreter and imports included


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(SpecError, match="inside its own anchor"):
        load_spec(BASE + "name: &a [*a]\n")


@pytest.mark.parametrize(
    "body",
    [
        "name: " + "[" * 5000 + "]" * 5000 + "\n",  # flow style
        "name:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(MAX_NESTING + 1)) + "  " * 40 + "end: 1\n",
    ],
    ids=["flow", "block"],
)
def test_deep_nesting_is_refused_without_a_recursion_error(body: str) -> None:
    outcome, seconds, _ = measured(lambda: load_spec(BASE + body))
    assert isinstance(outcome, SpecError) and "nesting" in str(outcome), outcome
    assert seconds < 2.0


@pytest.mark.parametrize(
    "body",
    [
        "name: [" + ", ".join(["1"] * 200_000) + "]\n",  # ~600 KB of values
        "name: '" + "x" * (MAX_SPEC_BYTES - 200) + "'\n",  # one long string
        "# " + "comment " * 120_000 + "\n",  # ~960 KB of comment
        "".join(f"k{i}: &a{i} {i}\n" for i in range(30_000)),  # many anchors, no alias
        "name: [" + ", ".join(["1"] * (MAX_NODES - 100)) + "]\n",  # just under the value limit: built, then refused
        "".join(f"k{i}: {i}\n" for i in range(MAX_NODES // 2 - 50)),  # as many keys as the limit allows
    ],
    ids=["values", "string", "comment", "anchors", "values-under-limit", "keys-under-limit"],
)
def test_any_spec_under_1_mb_is_accepted_or_refused_quickly(body: str) -> None:
    text = BASE + body
    assert len(text.encode()) < MAX_SPEC_BYTES
    outcome, seconds, peak = measured(lambda: load_spec(text))
    assert isinstance(outcome, (SpecError, type(load_spec(BASE)))), outcome
    assert seconds < 2.0 and peak < 150_000_000


def test_a_file_over_1_mb_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(BASE + "# " + "x" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(SpecError, match="larger than 1,000,000 bytes"):
        load_spec(path)
    with pytest.raises(SpecError, match="longer than"):
        load_spec(path.read_text())


def test_a_key_given_twice_is_refused_with_its_line() -> None:
    with pytest.raises(SpecError, match="duplicate key 'thought'") as info:
        load_spec(BASE + "thought: {strategy: single}\nthought: {strategy: deepconf}\n")
    assert info.value.line == 3


# -- #2: not UTF-8 ----------------------------------------------------------------------------------------------
def test_a_spec_file_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    data = BASE.encode() + b"name: caf\xe9\n"
    path.write_bytes(data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    offset = data.index(b"\xe9")
    assert f"byte 0xe9 at byte offset {offset}" in str(info.value)
    random_bytes = tmp_path / "random.yaml"
    random_bytes.write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(SpecError, match="at byte offset 0"):
        load_spec(random_bytes)


def test_the_cli_reports_a_binary_spec_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\x00\xff\xfe" * 100)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not UTF-8" in err and "Traceback" not in err


# -- #3: a path that does not exist ------------------------------------------------------------------------------
def test_a_missing_path_is_reported_missing_whatever_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for command in (["validate", "no-such-file"], ["run", "no-such-file", "q?"], ["trace", "show", "no-such-file"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "'no-such-file' does not exist" in err, err
        assert "mapping" not in err  # never read as YAML text
    with pytest.raises(SpecError, match="does not exist"):
        load_spec_file("no-such-file")
    with pytest.raises(SpecError, match="'no-such-file' is not a spec: no such file"):
        load_spec("no-such-file")  # the library door takes text too: a one-line string is named as both
    assert main(["validate", str(tmp_path)]) == 2
    assert "is not a file" in capsys.readouterr().err


# -- #4: upper bounds on every count ----------------------------------------------------------------------------
def test_a_huge_sample_count_fails_validation_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(BASE + "thought: {strategy: self_consistency, n: 100000000}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2:" in err and "'thought.n'" in err and f"at most {MAX_SAMPLES}" in err


def test_a_huge_override_fails_fast_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + "thought: {strategy: self_consistency, n: 4}\noutputs: {otel: false}\n")
    started = time.perf_counter()
    assert main(["run", str(path), "q?", "--set", "thought.n=100000000"]) == 2
    assert time.perf_counter() - started < 2.0
    assert f"at most {MAX_SAMPLES}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "bound"),
    [
        ("thought: {max_tokens: 200000}", "less than or equal to 131072"),
        ("thought: {strategy: deepconf, n: 16, concurrency: 100000}", "at most 256"),
        ("thought: {strategy: beam, beam_width: 1000}", "at most 64"),
        ("thought: {strategy: beam, max_depth: 100000}", "at most 256"),
        ("thought: {strategy: refine, rounds: 1000}", "at most 32"),
        ("thought: {strategy: pdr, m: [8, 100000]}", "at most 1024"),
        ("thought: {strategy: adaptive, stages: [8, 100000]}", "at most 1024"),
        ("thought: {strategy: deepconf, n: 16, warmup: 5000}", "at most 1024"),
        ("runtime: {concurrency: 100000}", "less than or equal to 256"),
        ("runtime: {max_num_seqs: 100000}", "less than or equal to 1024"),
        ("planner: {kind: structured, max_replans: 1000}", "less than or equal to 16"),
        ("planner: {kind: structured, max_steps: 100000000}", "at most 131072"),
        ("verifiers: {verifier: {k: 1000}}", "less than or equal to 64"),
    ],
)
def test_every_count_has_an_upper_bound(section: str, bound: str) -> None:
    with pytest.raises(SpecError, match=bound):
        load_spec(BASE + section + "\n")


def test_every_integer_in_the_schema_has_a_maximum() -> None:
    schema = pipeline_json_schema()
    unbounded: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer" and "maximum" not in node and not path.startswith(_UNBOUNDED_OK):
                unbounded.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema["$defs"]["ThoughtSpec"], "thought")
    for name in ("RuntimeSpec", "PlannerSpec", "VerifierSpec", "StepScorerSpec"):
        walk({k: v for k, v in schema["$defs"][name]["properties"].items() if k != "seed"}, name)
    assert not unbounded, unbounded


# planner options other than the declared fields are a planner's constructor arguments, bounded when loaded
_UNBOUNDED_OK = ("PlannerSpec/max_steps", "PlannerSpec/max_tokens", "PlannerSpec/max_independent",
                 "PlannerSpec/max_dependent", "PlannerSpec/max_string", "PlannerSpec/max_answer_chars")  # fmt: skip


def test_a_fan_out_that_cannot_fit_the_budget_is_refused_up_front() -> None:
    with pytest.raises(SpecError, match="starts 64 traces") as info:
        load_spec(BASE + "thought: {strategy: self_consistency, n: 64}\nbudget: {max_completion_tokens: 32}\n")
    assert info.value.path == "thought"
    load_spec(BASE + "thought: {strategy: self_consistency, n: 64}\nbudget: {max_completion_tokens: 64}\n")
    engine = ScriptedEngine(default="The answer is 1.")
    with pytest.raises(ConfigError, match="cannot fit the budget"):
        Pipeline(engine, SelfConsistency(n=64), budget=Budget(max_tokens=10))
    with pytest.raises(ConfigError, match=f"at most {MAX_SAMPLES}"):
        Pipeline(engine, SelfConsistency(n=100_000_000))


def test_eval_arguments_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE)
    assert main(["eval", str(path), "--benchmark", "arithmetic", "--concurrency", "100000"]) == 2
    assert "1..256" in capsys.readouterr().err
    assert main(["eval", str(path), "--benchmark", "arithmetic", "--limit", "0"]) == 2
    sweeps = [f"--sweep=thought.k{i}=1,2,3,4" for i in range(5)]  # 4**5 = 1024 configurations
    assert main(["eval", str(path), "--benchmark", "arithmetic", *sweeps]) == 2
    assert "more than 256 configurations" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not Path("results", "p-arithmetic.db").exists()
