"""VLLMEngine's parts that need no running engine: options as they reach vLLM's engine arguments, and the daemon
thread the engine loads in, and how a failed request maps to our errors."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from branchwise.engine.vllm_engine import VLLMEngine, _in_daemon_thread


def test_compact_json_option_reaches_the_engine_config() -> None:
    assert "structured_outputs_config" not in VLLMEngine().engine_args  # vLLM's own default
    compact = VLLMEngine(compact_json=True).engine_args["structured_outputs_config"]
    assert compact == {"backend": "guidance", "disable_any_whitespace": True, "disable_additional_properties": True}
    own = {"structured_outputs_config": {"backend": "xgrammar"}}
    assert VLLMEngine(compact_json=True, engine_args=own).engine_args["structured_outputs_config"] == {
        **compact,
        "backend": "xgrammar",
    }
    assert VLLMEngine(engine_args=own).engine_args["structured_outputs_config"] == {"backend": "xgrammar"}


async def test_daemon_thread_result_and_error_reach_the_awaiting_task() -> None:
    ran: list[str] = []
    await _in_daemon_thread(lambda: ran.append(threading.current_thread().name), name="bw-test-ok")
    assert ran == ["bw-test-ok"]

    def fail() -> None:
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        await _in_daemon_thread(fail, name="bw-test-fail")


async def test_cancelling_the_future_leaves_the_work_running() -> None:
    release, finished = threading.Event(), threading.Event()

    def work() -> None:
        release.wait(10)
        finished.set()

    future = _in_daemon_thread(work, name="bw-test-cancel")
    future.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await future
    (thread,) = [t for t in threading.enumerate() if t.name == "bw-test-cancel"]
    assert thread.daemon and thread.is_alive() and not finished.is_set()
    release.set()  # the work ends on its own; settling a cancelled future is skipped without error
    await asyncio.to_thread(thread.join, 10)
    assert finished.is_set()


def test_asyncio_run_does_not_wait_for_a_cancelled_load() -> None:
    release = threading.Event()

    async def main() -> None:
        future = _in_daemon_thread(lambda: release.wait(30), name="bw-test-exit")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, 0.1)

    started = time.perf_counter()
    asyncio.run(main())  # to_thread's default executor would be joined here, for the full 30 s
    assert time.perf_counter() - started < 5
    release.set()


@pytest.mark.parametrize(("level", "bar"), [(None, True), ("INFO", True), ("debug", True), ("ERROR", False)])
def test_the_loading_progress_bar_follows_vllms_log_level(
    monkeypatch: pytest.MonkeyPatch, level: str | None, bar: bool
) -> None:
    if level is None:
        monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    else:
        monkeypatch.setenv("VLLM_LOGGING_LEVEL", level)
    assert VLLMEngine().engine_args["use_tqdm_on_load"] is bar
    assert VLLMEngine(engine_args={"use_tqdm_on_load": True}).engine_args["use_tqdm_on_load"] is True


@pytest.mark.parametrize("preset", [None, "120"])
def test_on_cpu_an_engine_step_may_take_an_hour_unless_the_user_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, preset: str | None
) -> None:
    from branchwise.engine import vllm_engine

    monkeypatch.setattr(vllm_engine, "_on_cpu", lambda: True)
    monkeypatch.setattr(vllm_engine, "resolve_model", lambda name: f"/models/{name}")
    monkeypatch.setattr(vllm_engine, "_cpu_has_fast_bf16", lambda: True)
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "")  # so that the value before the test comes back
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
    if preset is not None:
        monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", preset)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # restored after the test: the engine writes it
    assert VLLMEngine()._prepare_options() is True
    expected = preset or str(vllm_engine.CPU_STEP_TIMEOUT_S)
    assert vllm_engine.os.environ["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == expected


class _FailingAsyncLLM:
    """Stands in for vLLM's AsyncLLM: every request fails with `error`; `errored` says whether the core is dead."""

    def __init__(self, error: Exception, *, errored: bool) -> None:
        self.error, self.errored, self.aborted = error, errored, []

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise self.error
        yield  # pragma: no cover - makes this an async generator like vLLM's

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.mark.parametrize("dead", [True, False])
async def test_a_dead_engine_core_makes_the_engine_unavailable_so_callers_stop(dead: bool) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    from branchwise.engine.types import GenerationRequest
    from branchwise.errors import EngineError, EngineUnavailable

    engine = VLLMEngine()
    error: Exception = EngineDeadError() if dead else RuntimeError("one request broke")
    fake = _FailingAsyncLLM(error, errored=dead)
    engine._llm = fake  # type: ignore[assignment]
    with pytest.raises(EngineError) as info:
        await engine.generate(GenerationRequest(prompt="2+2=", max_tokens=4))
    # Unavailable stops `sample` and `eval` at once; a one-off failure only fails its problem.
    assert isinstance(info.value, EngineUnavailable) is dead
    assert "died" in str(info.value) if dead else "one request broke" in str(info.value)
    assert len(fake.aborted) == (0 if dead else 1)  # a dead core cannot abort (it would raise again)
    engine._llm = None
