"""Tool registry: argument models from type hints, binding, validation errors, schemas and prompt text,
concurrency and rate limits, thread offloading, error wrapping, cancellation, default tools, http_get."""

from __future__ import annotations

import asyncio
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import pydantic
import pytest

from branchwise.errors import ConfigError, ToolArgumentError, ToolError, ToolTimeout, UnknownNameError
from branchwise.executors import Document, Tool, ToolRegistry, default_tools, tool
from branchwise.executors.http_tool import http_get_tool


def search(query: str, k: int = 3, *, exact: bool = False) -> list[str]:
    """Search something.

    Second paragraph is not part of the description.

    Args:
        query: the words to look for.
        k: how many results
            (continued on a second line).
        exact: only exact matches.
    """
    return [query] * k


def test_tool_from_function_describes_itself() -> None:
    t = Tool(search)
    assert t.name == "search"
    assert t.description == "Search something."
    assert t.param_names == ("query", "k", "exact")
    assert t.signature() == "search(query: str, k: int = 3, exact: bool = False)"
    schema = t.parameters_schema()
    assert schema["required"] == ["query"]
    assert schema["properties"]["k"]["default"] == 3
    assert schema["properties"]["k"]["description"] == "how many results (continued on a second line)."
    assert schema["additionalProperties"] is False
    assert t("x", 2) == ["x", "x"]  # the Tool still calls the function directly


def test_bind_maps_positional_and_keyword_arguments() -> None:
    t = Tool(search)
    assert t.bind(["q"], {"k": 5}) == {"query": "q", "k": 5}
    assert t.bind(kwargs={"query": "q"}) == {"query": "q"}
    with pytest.raises(ToolArgumentError, match="at most 2 positional"):
        t.bind(["q", 1, True])  # `exact` is keyword-only
    with pytest.raises(ToolArgumentError) as info:
        t.bind(["q"], {"kk": 1})
    assert info.value.field == "kk" and info.value.tool == "search"
    with pytest.raises(ToolArgumentError) as info:
        t.bind(["q"], {"query": "again"})
    assert info.value.field == "query"


def test_validate_coerces_fills_defaults_and_names_the_bad_field() -> None:
    t = Tool(search)
    assert t.validate({"query": "q", "k": "4"}) == {"query": "q", "k": 4, "exact": False}
    assert t.validate({"query": 1743})["query"] == "1743"  # earlier numeric results feed string arguments
    with pytest.raises(ToolArgumentError) as info:
        t.validate({"k": 2})
    assert info.value.field == "query" and "search(query: str" in str(info.value)
    with pytest.raises(ToolArgumentError) as info:
        t.validate({"query": "q", "k": "many"})
    assert info.value.field == "k"
    assert str(info.value).startswith("tool 'search' failed: argument 'k': Input should be a valid integer")
    with pytest.raises(ToolArgumentError, match="query: Field required; k: Input should be") as info:
        t.validate({"k": "many"})
    assert info.value.field == "query"
    assert not isinstance(info.value.__cause__, pydantic.ValidationError)  # no pydantic error leaks out
    with pytest.raises(ToolArgumentError) as info:
        t.validate({"query": "q", "bogus": 1})
    assert info.value.field == "bogus"
    with pytest.raises(ToolArgumentError, match="mapping"):
        t.validate(["q"])  # type: ignore[arg-type]


def test_annotated_constraints_and_names_that_clash_with_basemodel() -> None:
    def fetch(
        json: str, schema: int = 1, model_id: str = "m", n: Annotated[int, pydantic.Field(ge=1, le=5)] = 2
    ) -> str:
        """Fetch."""
        return f"{json}-{schema}-{model_id}-{n}"

    t = Tool(fetch)
    assert t.validate({"json": "a"}) == {"json": "a", "schema": 1, "model_id": "m", "n": 2}
    assert set(t.parameters_schema()["properties"]) == {"json", "schema", "model_id", "n"}
    with pytest.raises(ToolArgumentError) as info:
        t.validate({"json": "a", "n": 9})
    assert info.value.field == "n"
    assert asyncio.run(t.call({"json": "a", "n": 5})) == "a-1-m-5"


def test_invalid_tool_definitions_are_config_errors() -> None:
    def variadic(*args: int) -> None: ...

    with pytest.raises(ConfigError, match="variadic"):
        Tool(variadic)
    with pytest.raises(ConfigError, match="identifier"):
        Tool(search, name="two words")
    with pytest.raises(ConfigError, match="max_concurrency"):
        Tool(search, max_concurrency=0)
    with pytest.raises(ConfigError, match="rate_limit"):
        Tool(search, rate_limit=(0, 1.0))
    with pytest.raises(ConfigError, match="rate_limit"):
        Tool(search, rate_limit=(1, -1.0))


async def test_sync_tools_run_in_a_worker_thread_and_async_tools_on_the_loop() -> None:
    loop_thread = threading.get_ident()

    def where_sync() -> int:
        return threading.get_ident()

    async def where_async() -> int:
        return threading.get_ident()

    assert await Tool(where_sync).call({}) != loop_thread
    assert await Tool(where_async).call({}) == loop_thread


async def test_exceptions_become_tool_errors_but_branchwise_errors_pass_through() -> None:
    def broken(x: int) -> int:
        raise KeyError(x)

    def refuses(x: int) -> int:
        raise ToolTimeout("other", "too slow")

    with pytest.raises(ToolError) as info:
        await Tool(broken).call({"x": 1})
    assert info.value.tool == "broken" and isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ToolTimeout):
        await Tool(refuses).call({"x": 1})
    with pytest.raises(ToolArgumentError):  # validation happens before the function runs
        await Tool(broken).call({"x": "not a number"})


async def test_cancellation_propagates_into_async_tools() -> None:
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def waits() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.create_task(Tool(waits).call({}))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def test_max_concurrency_caps_calls_in_flight() -> None:
    gate = asyncio.Event()
    inside = 0
    peak = 0
    two_inside = asyncio.Event()

    async def slow(i: int) -> int:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        if inside == 2:
            two_inside.set()
        await gate.wait()
        inside -= 1
        return i

    t = Tool(slow, max_concurrency=2)
    tasks = [asyncio.create_task(t.call({"i": i})) for i in range(6)]
    await two_inside.wait()
    # Every task ran up to the limit before this one resumed: without it all six would be inside by now.
    assert inside == 2
    gate.set()
    assert await asyncio.gather(*tasks) == list(range(6))
    assert peak == 2


def test_a_limited_tool_works_across_event_loops() -> None:
    async def quick() -> int:
        await asyncio.sleep(0)
        return 1

    t = Tool(quick, max_concurrency=1)

    async def burst() -> list[int]:
        return list(await asyncio.gather(*(t.call({}) for _ in range(3))))

    assert asyncio.run(burst()) == [1, 1, 1]
    assert asyncio.run(burst()) == [1, 1, 1]  # a semaphore bound to the first loop would raise here


async def test_rate_limit_spaces_call_starts() -> None:
    starts: list[float] = []

    async def stamp() -> None:
        starts.append(time.monotonic())

    t = Tool(stamp, rate_limit=(2, 0.25))
    await asyncio.gather(*(t.call({}) for _ in range(4)))
    starts.sort()
    assert starts[1] - starts[0] < 0.2  # two calls may start at once
    assert starts[2] - starts[0] >= 0.24  # the third waits for the period
    assert starts[3] - starts[1] >= 0.24


def test_registry_registration_lookup_and_rendering() -> None:
    registry = ToolRegistry()

    @registry.register
    def add(a: int, b: int = 1) -> int:
        """Add two integers."""
        return a + b

    registry.register(search, max_concurrency=3)
    assert isinstance(add, Tool)
    assert registry.names() == ["add", "search"]
    assert "add" in registry and "nope" not in registry
    assert [t.name for t in registry] == ["add", "search"]
    assert registry.get("search").max_concurrency == 3
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(add)
    with pytest.raises(UnknownNameError) as info:
        registry.get("serch")
    assert info.value.suggestions == ["search"]
    assert "Did you mean 'search'" in str(info.value)
    renamed = registry.register(add, name="plus", description="Add.")
    assert renamed is not add and renamed.name == "plus" and add.name == "add"
    text = registry.prompt_description()
    assert text.splitlines()[0] == "1. add(a: int, b: int = 1)"
    assert "   Add two integers." in text
    assert "2. search(query: str, k: int = 3, exact: bool = False)" in text
    assert "   - query: the words to look for." in text
    schemas = registry.schemas()
    assert schemas[0]["type"] == "function"
    assert schemas[0]["function"]["name"] == "add"
    assert schemas[0]["function"]["parameters"]["properties"]["a"]["type"] == "integer"


def test_tool_decorator_both_forms() -> None:
    @tool
    def one(x: int) -> int:
        """One."""
        return x

    @tool(name="two", max_concurrency=1, rate_limit=(5, 1))
    async def second(x: int) -> int:
        return x

    assert isinstance(one, Tool) and one.name == "one" and one(3) == 3
    assert second.name == "two" and second.max_concurrency == 1 and second.rate_limit == (5, 1.0)
    assert asyncio.run(second.call({"x": "4"})) == 4


def test_default_tools(tmp_path: Any) -> None:
    assert default_tools().names() == ["calculator", "python"]
    docs = [Document("a", "Alpha", "alpha text"), Document("b", "Beta", "beta text")]
    registry = default_tools(corpus=docs, enable_http=True)
    assert registry.names() == ["calculator", "python", "retrieve", "http_get"]
    assert registry.get("retrieve").signature() == "retrieve(query: str, k: int = 3)"
    with pytest.raises(ConfigError, match="does not exist"):
        default_tools(corpus=tmp_path / "missing")


# --- http_get against a real local server -----------------------------------------------------------------


@pytest.fixture
def local_server() -> Iterator[tuple[str, threading.Event]]:
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/slow":
                release.wait(10)
            if self.path == "/missing":
                self.send_response(404)
                body = b"not here"
            elif self.path == "/big":
                self.send_response(200)
                body = b"x" * 50_000
            else:
                self.send_response(200)
                body = "héllo from the test server".encode()
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", release
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.server
async def test_http_get_against_a_local_server(local_server: tuple[str, threading.Event]) -> None:
    base, release = local_server
    t = http_get_tool(timeout=0.5)
    result = await t.call({"url": f"{base}/hello"})
    assert result["status"] == 200 and result["text"] == "héllo from the test server"
    assert result["truncated"] is False and result["content_type"].startswith("text/plain")
    capped = await t.call({"url": f"{base}/big", "max_bytes": 1000})
    assert len(capped["text"]) == 1000 and capped["truncated"] is True
    with pytest.raises(ToolError, match="HTTP 404"):
        await t.call({"url": f"{base}/missing"})
    with pytest.raises(ToolArgumentError) as info:
        await t.call({"url": "file:///etc/passwd"})
    assert info.value.field == "url"
    with pytest.raises(ToolArgumentError):
        await t.call({"url": f"{base}/hello", "max_bytes": 10**9})  # above the tool's cap
    with pytest.raises(ToolTimeout):
        await t.call({"url": f"{base}/slow"})
    release.set()


async def test_http_get_connection_refused_is_a_tool_error() -> None:
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ToolError, match="failed"):
        await http_get_tool(timeout=2).call({"url": f"http://127.0.0.1:{port}/"})
