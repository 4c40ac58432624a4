"""Ctrl-C while the embedded vLLM engine loads, through the real CLI in a child process."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from branchwise.orchestrator.tracing import read_trace

pytestmark = [pytest.mark.engine, pytest.mark.timeout(300)]


def test_ctrl_c_while_the_model_loads_exits_at_once_and_leaves_no_process(tmp_path: Path) -> None:
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024}\n"
        "thought: {strategy: single, max_tokens: 8}\n"
        "outputs: {progress: off, otel: false}\n"
    )
    trace = tmp_path / "t.jsonl"
    # Ctrl-C as a terminal delivers it, even when this test runs under a shell that ignores SIGINT.
    script = tmp_path / "cli.py"
    script.write_text(
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from branchwise.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", str(spec), "Say hi.", "--trace", str(trace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Interrupt once vLLM's engine core process exists, i.e. in the middle of the load.
        deadline = time.monotonic() + 120
        core: list[psutil.Process] = []
        while not core:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "vLLM never started its engine core"
            with contextlib.suppress(psutil.Error):
                core = [
                    c
                    for c in psutil.Process(proc.pid).children(recursive=True)
                    if not any("resource_tracker" in part for part in c.cmdline())
                ]
            time.sleep(0.1)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - interrupted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    # vLLM's exit handler gives its core 5 s to stop after SIGTERM before killing it.
    assert waited < 15, f"exit took {waited:.1f} s after Ctrl-C"
    assert "interrupted" in err
    assert not trace.exists()  # the run had not begun: engines start before its trace opens
    time.sleep(1)
    assert not [p for p in core if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_mid_generation_in_a_background_job_shuts_the_engine_down(tmp_path: Path) -> None:
    """`kill` on a run started with `&` (SIGINT ignored): cancelled like Ctrl-C, no vLLM process outlives it."""
    spec = tmp_path / "p.yaml"
    spec.write_text(
        "engine: {backend: vllm, model: smollm2-135m-instruct, max_model_len: 1024}\n"
        "thought: {strategy: self_consistency, n: 4, temperature: 1.0, max_tokens: 800}\n"
        "outputs: {progress: off, otel: false}\n"
    )
    trace = tmp_path / "t.jsonl"
    script = tmp_path / "cli.py"
    script.write_text(
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from branchwise.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), "run", str(spec), "Write a long story about a fox.", "--trace", str(trace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (trace.exists() and '"kind":"trace_start"' in trace.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never began generating"
            time.sleep(0.1)
        engine = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if not any("resource_tracker" in part for part in c.cmdline())
        ]
        assert engine, "no engine process to watch"
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert waited < 15, f"exit took {waited:.1f} s after SIGTERM"
    time.sleep(1)
    assert not [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    end = read_trace(trace).run_end
    assert end is not None and end.data["status"] == "cancelled"
