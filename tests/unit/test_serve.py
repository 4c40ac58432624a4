"""`branchwise serve` for real: uvicorn on 127.0.0.1 (a free port) over scripted-engine pipelines, driven by the
official openai client (sync, async, streaming) and by httpx for the error paths, API keys, disconnects, the queue
bound, and SIGTERM on a `branchwise serve` subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from serve_process import serve_process

from branchwise.cli import main
from branchwise.engine.testing import FunctionEngine
from branchwise.errors import ConfigError
from branchwise.orchestrator.tracing import read_trace
from branchwise.serve import PipelineSet, ServerLimits
from branchwise.serve.runner import BranchwiseServer, is_loopback

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

WAIT = 10.0  # upper bound on waiting for something that should happen at once
SC = """\
name: sc
engine: {backend: test, default: ["6 x 7 = 42. The answer is 42.", "The answer is 42.", "The answer is 41."]}
thought: {strategy: self_consistency, n: 3}
"""
SLOW_WORDS = " ".join(f"w{i}" for i in range(2000))
SLOW = f"""\
name: slow
engine: {{backend: test, token_delay: 0.01, default: '{SLOW_WORDS} The answer is 1.'}}
thought: {{strategy: single, max_tokens: 4000}}
"""
Q = [{"role": "user", "content": "What is 6 x 7?"}]


class Running:
    """A server running in a thread of its own (its own event loop), stopped as SIGTERM would stop it."""

    def __init__(self, server: BranchwiseServer) -> None:
        self.server = server
        self.error: BaseException | None = None
        ready = threading.Event()

        def serve() -> None:
            try:
                asyncio.run(server.serve(on_ready=ready.set))
            except BaseException as err:
                self.error = err
                ready.set()

        self.thread = threading.Thread(target=serve, name="branchwise-test-server", daemon=True)
        self.thread.start()
        assert ready.wait(WAIT) and self.error is None, self.error
        self.url = server.url
        self.base_url = f"{self.url}/v1"
        self.headers: dict[str, str] = {}  # sent to /metrics

    def engine(self, pipeline: str) -> FunctionEngine:
        engine = self.server.pipelines.served[pipeline].engines["policy"]
        assert isinstance(engine, FunctionEngine)
        return engine

    def metric(self, line_start: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(WAIT * 3)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(*specs: str, api_keys: tuple[str, ...] = (), **limits: Any) -> Running:
        paths = []
        for i, text in enumerate(specs):
            path = tmp_path / f"p{len(running)}-{i}.yaml"
            path.write_text(text)
            paths.append(path)
        pipelines = PipelineSet.load(paths, ServerLimits(**limits))
        traces = tmp_path / f"traces{len(running)}"
        traces.mkdir()
        server = BranchwiseServer(pipelines, port=0, api_keys=api_keys, trace_dir=traces)
        run = Running(server)
        running.append(run)
        return run

    yield start
    for run in running:
        if run.thread.is_alive():
            run.stop()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll a condition in another thread's server (no event crosses the thread boundary)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]  # type: ignore[no-any-return]


# -- the happy paths -----------------------------------------------------------------------------------------------
def test_the_openai_client_gets_the_answer_usage_and_the_run_record(serve: Callable[..., Running]) -> None:
    server = serve(SC)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="sc", messages=Q)  # type: ignore[arg-type]
    assert reply.object == "chat.completion" and reply.model == "sc"
    assert reply.choices[0].message.content == "42" and reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    section = (reply.model_extra or {})["branchwise"]
    assert section["strategy"] == "self_consistency" and section["pruned"] == 0 and not section["budget_exhausted"]
    assert section["llm_calls"] == 1 and reply.id == f"chatcmpl-{section['trace_id']}"
    trace = httpx.get(f"{server.base_url}/traces/{section['trace_id']}")
    assert trace.status_code == 200 and trace.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in trace.text.splitlines()]
    assert lines[0]["format"] == "branchwise-trace" and lines[0]["run_id"] == section["run_id"]
    assert lines[-1]["kind"] == "run_end" and lines[-1]["data"]["usage"]["completion_tokens"] == (
        reply.usage.completion_tokens
    )
    models = client.models.list()
    assert [m.id for m in models.data] == ["sc"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


async def test_the_async_client_runs_requests_concurrently_with_their_overrides(
    serve: Callable[..., Running],
) -> None:
    server = serve(SC, max_concurrent_runs=8)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="sc",
                messages=[{"role": "system", "content": "Use digits."}, *Q],  # type: ignore[list-item]
                temperature=0.1,
                max_tokens=64,
                extra_body={"branchwise": {"overrides": {"thought.n": n}, "budget": {"max_calls": 2}}},
            )
            for n in (1, 2, 5, 5)
        )
    )
    assert [r.choices[0].message.content for r in replies] == ["42", "42", "42", "42"]
    calls = server.engine("sc").calls
    assert sorted(c.n for c in calls) == [1, 2, 5, 5]
    assert {c.temperature for c in calls} == {0.1} and {c.max_tokens for c in calls} == {64}
    assert all(c.messages is not None and c.messages[0].content == "Use digits." for c in calls)
    assert server.metric('branchwise_runs_total{model="sc",outcome="ok"}') == 4
    await client.close()


def test_a_seeded_request_seeds_every_engine_call_of_its_run(serve: Callable[..., Running]) -> None:
    server = serve(SC)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    for seed in (7, 7, 8):
        client.chat.completions.create(model="sc", messages=Q, seed=seed)  # type: ignore[arg-type]
    client.chat.completions.create(model="sc", messages=Q, extra_body={"branchwise": {"seed": 8}})  # type: ignore[arg-type]
    client.chat.completions.create(model="sc", messages=Q)  # type: ignore[arg-type]
    seeds = [call.seed for call in server.engine("sc").calls]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3] and None not in seeds[:4] and seeds[4] is None


def test_only_the_newest_traces_are_kept(serve: Callable[..., Running]) -> None:
    server = serve(SC, max_traces=2)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    ids = []
    for _ in range(3):
        reply = client.chat.completions.create(model="sc", messages=Q)  # type: ignore[arg-type]
        ids.append((reply.model_extra or {})["branchwise"]["trace_id"])
    folder = server.server.state.trace_dir
    wait_for(lambda: sorted(p.stem for p in folder.iterdir()) == sorted(ids[1:]), "the oldest trace to be deleted")
    assert [httpx.get(f"{server.base_url}/traces/{i}").status_code for i in ids] == [404, 200, 200]


def test_streaming_sends_chunks_then_usage_then_done(serve: Callable[..., Running]) -> None:
    server = serve(SC)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="sc",
            messages=Q,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "42"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert (finish[0].model_extra or {})["branchwise"]["strategy"] == "self_consistency"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json={"model": "sc", "messages": Q,
                                                                            "stream": True}) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_a_stream_can_carry_progress_comments_that_clients_ignore(serve: Callable[..., Running]) -> None:
    server = serve(SLOW.replace(SLOW_WORDS, " ".join(f"w{i}" for i in range(250))))  # 2.5 s of streaming
    body = {"model": "slow", "messages": Q, "stream": True, "branchwise": {"progress": True}}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=WAIT) as response:
        lines, checked = [], False
        for line in response.iter_lines():
            lines += [line] if line else []
            if line.startswith(": progress ") and len(lines) == 2:  # the run is going: its trace so far
                trace_id = json.loads(lines[0].removeprefix("data: "))["id"].removeprefix("chatcmpl-")
                so_far = httpx.get(f"{server.base_url}/traces/{trace_id}", timeout=WAIT)
                kinds = [json.loads(record).get("kind") for record in so_far.text.splitlines()]
                assert so_far.status_code == 200 and "run_start" in kinds and "run_end" not in kinds, kinds
                checked = True
    assert checked
    reports = [json.loads(line.removeprefix(": progress ")) for line in lines if line.startswith(": progress ")]
    assert len(reports) >= 2 and set(reports[0]) == {"seconds", "calls", "prompt_tokens", "completion_tokens"}
    tokens = [r["completion_tokens"] for r in reports]
    assert tokens == sorted(tokens) and tokens[-1] > 0 and reports[-1]["calls"] == 1
    assert lines[-1] == "data: [DONE]" and not any(line.startswith(": keep-alive") for line in lines)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="slow",
        messages=Q,
        stream=True,
        extra_body={"branchwise": {"progress": True}},  # type: ignore[arg-type]
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "1"


def test_a_budget_cap_reached_is_finish_reason_length(serve: Callable[..., Running]) -> None:
    server = serve(SC)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="sc",
        messages=Q,  # type: ignore[arg-type]
        extra_body={"branchwise": {"budget": {"max_completion_tokens": 4}}},
    )
    assert reply.choices[0].finish_reason == "length"
    assert (reply.model_extra or {})["branchwise"]["budget_exhausted"] is True
    assert server.metric('branchwise_budget_exhausted_total{model="sc"}') == 1


# -- refusals ------------------------------------------------------------------------------------------------------
def test_bad_requests_get_openai_errors_naming_the_field(serve: Callable[..., Running]) -> None:
    server = serve(SC, max_tokens=1000, max_body_bytes=10_000, max_query_chars=500)
    url = f"{server.base_url}/chat/completions"
    cases: list[tuple[Any, int, str | None, str | None]] = [
        ({"model": "scc", "messages": Q}, 404, "model", "model_not_found"),
        ({"model": "sc", "messages": Q, "branchwise": {"overrides": {"thought.nn": 8}}},
         400, "branchwise.overrides.thought.nn", "invalid_override"),
        ({"model": "sc", "messages": Q, "branchwise": {"overrides": {"thought.max_tokens": 2000}}},
         400, "branchwise.overrides.thought.max_tokens", "over_limit"),
        ({"model": "sc", "messages": Q, "n": 3}, 400, "n", "unsupported_parameter"),
        ({"model": "sc", "messages": [{"role": "user", "content": "x" * 501}]}, 400, "messages", "query_too_long"),
        ({"model": "sc", "messages": Q, "stop": ["\n"]}, 400, "stop", "unknown_parameter"),
    ]  # fmt: skip
    for body, status, param, code in cases:
        response = httpx.post(url, json=body)
        error = error_of(response)
        assert (response.status_code, error["param"], error["code"]) == (status, param, code), error
    assert "Did you mean 'sc'?" in error_of(httpx.post(url, json=cases[0][0]))["message"]
    assert "Did you mean 'n'?" in error_of(httpx.post(url, json=cases[1][0]))["message"]
    too_big = httpx.post(url, content=b'{"model": "sc", "pad": "' + b"x" * 20_000 + b'"}')
    assert too_big.status_code == 413 and error_of(too_big)["code"] == "too_large"
    assert error_of(httpx.post(url, content=b"{not json"))["code"] == "invalid_json"
    assert httpx.get(f"{server.base_url}/nowhere").status_code == 404
    wrong_method = httpx.get(url)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert error_of(wrong_method)["code"] == "method_not_allowed"
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=Q)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match=r"thought\.nn"):
        client.chat.completions.create(
            model="sc",
            messages=Q,  # type: ignore[arg-type]
            extra_body={"branchwise": {"overrides": {"thought.nn": 8}}},
        )
    # a request max_tokens above the server's limit is clipped, not refused
    client.chat.completions.create(model="sc", messages=Q, max_tokens=50_000)  # type: ignore[arg-type]
    assert server.engine("sc").calls[-1].max_tokens == 1000
    assert server.metric('branchwise_requests_total{model="sc",status="400"}') >= 5
    assert server.metric('branchwise_requests_total{model="(unknown)",status="404"}') >= 2


def test_api_keys_guard_every_route_but_health(serve: Callable[..., Running]) -> None:
    server = serve(SC, api_keys=("key-a", "key-b"))
    base = server.base_url
    for method, path in (("POST", "/chat/completions"), ("GET", "/models"), ("GET", "/traces/" + "0" * 24),
                         ("GET", "/../metrics"), ("GET", "/nowhere")):  # fmt: skip
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-a"}):
            response = httpx.request(method, base + path, headers=headers, json={"model": "sc", "messages": Q})
            assert response.status_code == 401, (method, path, headers)
            assert error_of(response)["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    a = openai.OpenAI(base_url=base, api_key="key-a", max_retries=0)
    reply = a.chat.completions.create(model="sc", messages=Q)  # type: ignore[arg-type]
    trace_id = (reply.model_extra or {})["branchwise"]["trace_id"]
    assert httpx.get(f"{base}/traces/{trace_id}", headers={"Authorization": "Bearer key-a"}).status_code == 200
    other = httpx.get(f"{base}/traces/{trace_id}", headers={"Authorization": "Bearer key-b"})
    assert other.status_code == 404  # a trace is its key's
    server.headers = {"Authorization": "Bearer key-b"}
    assert server.metric('branchwise_requests_total{model="sc",status="200"}') == 1


def test_a_non_loopback_host_needs_an_api_key(tmp_path: Path) -> None:
    (tmp_path / "sc.yaml").write_text(SC)
    pipelines = PipelineSet.load([tmp_path / "sc.yaml"], ServerLimits())
    with pytest.raises(ConfigError, match="without an API key"):
        BranchwiseServer(pipelines, host="0.0.0.0", port=0, trace_dir=tmp_path)
    assert main(["serve", str(tmp_path / "sc.yaml"), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")
    busy = BranchwiseServer(pipelines, port=0, trace_dir=tmp_path)
    busy.socket.listen()  # another server on the port
    port = busy.socket.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        BranchwiseServer(pipelines, port=port, trace_dir=tmp_path)
    busy.socket.close()


# -- cancellation and load -----------------------------------------------------------------------------------------
def test_a_client_leaving_mid_stream_cancels_its_run_and_aborts_the_engine(serve: Callable[..., Running]) -> None:
    server = serve(SLOW)
    engine = server.engine("slow")
    with httpx.stream("POST", f"{server.base_url}/chat/completions",
                      json={"model": "slow", "messages": Q, "stream": True}) as response:  # fmt: skip
        lines = response.iter_lines()  # held: dropping the iterator would close the connection at once
        assert '"role":"assistant"' in next(lines)
        wait_for(lambda: engine.active == 1, "the run to stream from the engine")
        assert engine.aborted == 0
    wait_for(lambda: engine.aborted == 1 and engine.active == 0, "the engine request to be aborted")
    wait_for(lambda: server.metric('branchwise_runs_total{model="slow",outcome="disconnected"}') == 1, "the metric")
    assert server.metric("branchwise_runs_in_flight") == 0


def test_a_client_leaving_a_plain_request_cancels_its_run(serve: Callable[..., Running]) -> None:
    server = serve(SLOW)
    engine = server.engine("slow")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/chat/completions", json={"model": "slow", "messages": Q}, timeout=0.5)
    wait_for(lambda: engine.aborted == 1 and engine.active == 0, "the engine request to be aborted")
    wait_for(lambda: server.metric('branchwise_runs_total{model="slow",outcome="disconnected"}') == 1, "the metric")
    wait_for(lambda: server.metric('branchwise_requests_total{model="slow",status="499"}') == 1, "the 499")


def test_a_full_queue_answers_429_with_retry_after(serve: Callable[..., Running]) -> None:
    server = serve(SLOW, SC, max_concurrent_runs=1, max_queued=1, max_runs_per_key=3)
    url = f"{server.base_url}/chat/completions"
    with httpx.stream("POST", url, json={"model": "slow", "messages": Q, "stream": True}, timeout=WAIT) as running:
        lines = running.iter_lines()
        next(lines)  # admitted: the role chunk
        payload = json.dumps({"model": "sc", "messages": Q}).encode()
        host, port = server.server.socket.getsockname()[:2]
        with socket.create_connection((host, port)) as queued:  # a client that waits in the queue, then leaves
            queued.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            wait_for(lambda: server.metric("branchwise_queue_depth") == 1, "the second request to queue")
            refused = httpx.post(url, json={"model": "sc", "messages": Q})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert error_of(refused)["code"] == "queue_full" and error_of(refused)["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).chat.completions.create(
                    model="sc",
                    messages=Q,  # type: ignore[arg-type]
                )
        wait_for(lambda: server.metric("branchwise_queue_depth") == 0, "the client that left to leave the queue")
        assert server.engine("sc").calls == []  # its run never started
    wait_for(lambda: server.metric("branchwise_runs_in_flight") == 0, "the run to end")
    assert server.metric('branchwise_rejected_total{reason="queue_full"}') == 2
    assert server.metric('branchwise_requests_total{model="sc",status="499"}') == 1
    assert httpx.post(url, json={"model": "sc", "messages": Q}).status_code == 200  # the slots came back


def test_the_per_key_limit(serve: Callable[..., Running]) -> None:
    server = serve(SLOW, SC, api_keys=("a", "b"), max_concurrent_runs=4, max_runs_per_key=1)
    url = f"{server.base_url}/chat/completions"
    auth = {"a": {"Authorization": "Bearer a"}, "b": {"Authorization": "Bearer b"}}
    with httpx.stream("POST", url, json={"model": "slow", "messages": Q, "stream": True}, headers=auth["a"]) as held:
        lines = held.iter_lines()
        next(lines)
        refused = httpx.post(url, json={"model": "sc", "messages": Q}, headers=auth["a"])
        assert refused.status_code == 429 and error_of(refused)["code"] == "key_limit"
        assert httpx.post(url, json={"model": "sc", "messages": Q}, headers=auth["b"]).status_code == 200


# -- stopping ------------------------------------------------------------------------------------------------------
def stream_in_thread(base_url: str, model: str, out: list[list[str]], started: threading.Event) -> threading.Thread:
    def run() -> None:
        lines: list[str] = []
        out.append(lines)
        try:
            with httpx.stream("POST", f"{base_url}/chat/completions", timeout=60,
                              json={"model": model, "messages": Q, "stream": True}) as response:  # fmt: skip
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()
        except httpx.HTTPError as err:
            lines.append(f"error: {err!r}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("deadline", ["finished", "cancelled"])
def test_sigterm_drains_runs_in_flight_then_stops(tmp_path: Path, deadline: str) -> None:
    spec = tmp_path / "slow.yaml"
    words = 40 if deadline == "finished" else 3000  # 0.4 s of streaming, or 30 s: far past a 1 s deadline
    spec.write_text(SLOW.replace(SLOW_WORDS, " ".join(f"w{i}" for i in range(words))))
    trace_dir = tmp_path / "traces"
    drain = "20" if deadline == "finished" else "1"
    with serve_process(spec, "--drain-timeout", drain, "--trace-dir", str(trace_dir)) as served:
        proc, base_url = served.proc, served.base_url
        out: list[list[str]] = []
        threads = []
        for _ in range(2):
            started = threading.Event()
            threads.append(stream_in_thread(base_url, "slow", out, started))
            assert started.wait(WAIT)  # the run is in flight: its role chunk arrived
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(40)
        assert proc.wait(WAIT) == 130, served.stderr()
        err = served.stderr()
    assert "branchwise: interrupted" in err
    for lines in out:
        assert lines[-1] == "data: [DONE]", lines
        if deadline == "finished":
            assert '"content":"1"' in "".join(lines) and '"finish_reason":"stop"' in "".join(lines)
        else:
            assert '"code":"server_shutting_down"' in lines[-2]
    if deadline == "cancelled":
        assert "2 runs cancelled at shutdown" in err
    ends = [read_trace(p).run_end for p in sorted(trace_dir.glob("*.jsonl"))]
    statuses = sorted(e.data["status"] for e in ends if e is not None)
    assert statuses == (["ok", "ok"] if deadline == "finished" else ["cancelled", "cancelled"])
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url.removesuffix("/v1") + "/health")


def test_a_draining_server_refuses_waiting_requests_and_cancels_runs_at_the_deadline(
    serve: Callable[..., Running],
) -> None:
    server = serve(SLOW, SC, max_concurrent_runs=1, drain_timeout_s=1)
    url = f"{server.base_url}/chat/completions"
    engine = server.engine("slow")
    with httpx.stream("POST", url, json={"model": "slow", "messages": Q, "stream": True}, timeout=WAIT) as running:
        lines = running.iter_lines()
        next(lines)
        waiting: list[httpx.Response] = []
        queued = threading.Thread(
            target=lambda: waiting.append(httpx.post(url, json={"model": "sc", "messages": Q})), daemon=True
        )
        queued.start()
        wait_for(lambda: server.metric("branchwise_queue_depth") == 1, "the request to queue")
        server.server.stop()
        queued.join(WAIT)
        assert waiting[0].status_code == 503 and error_of(waiting[0])["code"] == "server_shutting_down"
        rest = [line for line in lines if line]
    assert '"code":"server_shutting_down"' in rest[-2] and rest[-1] == "data: [DONE]"
    server.thread.join(WAIT)
    assert not server.thread.is_alive()
    assert engine.aborted == 1 and engine.active == 0


async def test_health_answers_503_while_draining(tmp_path: Path) -> None:
    (tmp_path / "sc.yaml").write_text(SC)
    server = BranchwiseServer(PipelineSet.load([tmp_path / "sc.yaml"], ServerLimits()), port=0, trace_dir=tmp_path)
    server.socket.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url="http://test") as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        server.state.begin_drain()
        draining = await client.get("/health")
        assert draining.status_code == 503 and draining.json() == {"status": "draining"}
    await server.state.shutdown()
