"""python sandbox: normal code works; every limit and forbidden operation fails cleanly, fast, and names itself."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from branchwise.errors import ConfigError, SandboxViolation, ToolError
from branchwise.executors import SandboxLimits, python_tool, run_python

# Generous wall clock: the machine is shared, and CPU seconds can take several wall seconds under load.
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=20, memory_bytes=256 * 1024 * 1024, max_output_bytes=20_000)
QUICK = 10  # seconds within which every refusal must arrive (typically 0.1-1 s)


async def test_normal_code_runs_and_prints() -> None:
    code = "import json, math\nprint(json.dumps({'root': math.sqrt(16)}))\nvalues = [1, 2, 3]\nsum(values) * 2"
    result = await run_python(code, FAST)
    assert result.stdout == '{"root": 4.0}\n12\n'  # the last expression is echoed like a REPL
    assert result.returncode == 0 and result.violation is None


async def test_files_inside_the_working_directory_work_and_the_directory_is_removed() -> None:
    code = (
        "import os, tempfile\n"
        "open('notes.txt', 'w').write('kept')\n"
        "os.mkdir('sub')\n"
        "with tempfile.NamedTemporaryFile() as f: pass\n"
        "open(os.devnull, 'w').write('discarded')\n"
        "print(open('notes.txt').read(), sorted(os.listdir('.'))[:2], os.getcwd())"
    )
    out = (await run_python(code, FAST)).stdout.split()
    assert out[:3] == ["kept", "['notes.txt',", "'sub']"]
    assert Path(out[3]).name.startswith("branchwise-python-")
    assert not await asyncio.to_thread(os.path.exists, out[3])


async def test_environment_is_empty_and_isolated() -> None:
    # TMPDIR is set by the bootstrap; LC_CTYPE by CPython's own C-locale coercion (PEP 538)
    code = "import os, sys\nprint(sorted(set(os.environ) - {'TMPDIR', 'LC_CTYPE'}), sys.flags.isolated)"
    assert (await run_python(code, FAST)).stdout.strip() == "[] 1"


async def _violation(code: str, limits: SandboxLimits = FAST) -> tuple[SandboxViolation, float]:
    started = time.monotonic()
    with pytest.raises(SandboxViolation) as info:
        await run_python(code, limits)
    return info.value, time.monotonic() - started


async def test_infinite_loop_hits_the_cpu_limit() -> None:
    error, elapsed = await _violation("while True:\n    pass")
    assert error.limit == "cpu_time" and error.tool == "python"
    assert elapsed < QUICK


async def test_sleeping_forever_hits_the_wall_clock() -> None:
    error, elapsed = await _violation("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=0.5))
    assert error.limit == "wall_time"
    assert elapsed < 5


async def test_fork_bomb_and_subprocesses_are_refused() -> None:
    error, elapsed = await _violation("import os\nwhile True:\n    os.fork()")
    assert error.limit == "processes" and elapsed < QUICK
    for code in (
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import sys\nsys.modules.pop('_posixsubprocess')\nimport _posixsubprocess",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ):
        error, _ = await _violation(code)
        assert error.limit == "processes", code


async def test_huge_output_is_cut_off() -> None:
    error, elapsed = await _violation("while True:\n    print('x' * 1000)")
    assert error.limit == "output" and elapsed < QUICK
    error, _ = await _violation("import sys\nwhile True:\n    sys.stderr.write('y' * 1000)")
    assert error.limit == "output"


async def test_memory_hog_hits_the_memory_limit() -> None:
    error, elapsed = await _violation("chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))")
    assert error.limit == "memory" and elapsed < QUICK


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("import signal\nsignal.raise_signal(signal.SIGKILL)", "SIGKILL"),
        ("import signal\nsignal.raise_signal(signal.SIGSEGV)", "SIGSEGV"),
        ("import os\nos.abort()", "SIGABRT"),
    ],
)
async def test_code_killing_its_own_interpreter_is_reported_as_that_signal(code: str, name: str) -> None:
    """A signal the code sent itself is no limit: reported as that signal, never as "memory"."""
    result = await run_python(code, FAST, check=False)
    assert result.violation is None and result.returncode < 0
    assert result.detail.startswith(f"killed by signal {name}")
    with pytest.raises(ToolError) as info:
        await run_python(code, FAST)
    assert not isinstance(info.value, SandboxViolation)
    assert f"killed by signal {name}" in str(info.value)


async def test_signalling_itself_with_os_kill_is_refused() -> None:
    error, _ = await _violation("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert error.limit == "processes"


async def test_network_is_refused_and_nothing_connects() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for code in (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}))",
            f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')",
            "import socket\nsocket.gethostbyname('example.com')",
        ):
            error, elapsed = await _violation(code)
            assert error.limit == "network", code
            assert elapsed < QUICK
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever arrived


async def test_files_outside_the_working_directory_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    cases = [
        "print(open('/etc/passwd').read())",
        f"open({str(outside)!r}, 'w').write('x')",
        "import os\nos.symlink('/etc/passwd', 'link')\nprint(open('link').read())",
        "import os\nprint(os.listdir('/'))",
        f"import os\nos.mkdir({str(tmp_path / 'made')!r})",
        "import os\nos.remove('/etc/hostname')",
        "open('../sibling.txt', 'w')",
        "print(open('/proc/self/environ').read())",
    ]
    for code in cases:
        error, elapsed = await _violation(code)
        assert error.limit == "filesystem", code
        assert elapsed < QUICK
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_escape_hatches_are_refused() -> None:
    for code in (
        "import ctypes",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
        "import gc\ngc.get_objects()",
    ):
        error, _ = await _violation(code)
        assert error.limit == "forbidden", code


async def test_file_size_limit() -> None:
    limits = SandboxLimits(max_file_bytes=1024 * 1024)
    error, _ = await _violation("f = open('big', 'wb')\nf.write(b'x' * (2 * 1024 * 1024))\nf.flush()", limits)
    assert error.limit == "file_size"


async def test_errors_in_the_code_are_tool_errors_with_stderr() -> None:
    with pytest.raises(ToolError, match="ZeroDivisionError") as info:
        await run_python("x = 1\nprint(x / 0)", FAST)
    assert not isinstance(info.value, SandboxViolation)
    assert 'File "<code>", line 2' in str(info.value)
    with pytest.raises(ToolError, match="status 3"):
        await run_python("import sys\nsys.exit(3)", FAST)
    result = await run_python("def f(:\n    pass", FAST, check=False)
    assert result.returncode == 1 and "SyntaxError" in result.stderr and result.violation is None


async def test_caught_violations_do_not_fail_the_run() -> None:
    code = "try:\n    open('/etc/passwd')\nexcept PermissionError as e:\n    print('refused')"
    assert (await run_python(code, FAST)).stdout == "refused\n"


async def test_cancellation_kills_the_process_and_removes_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: asyncio.Queue[Any] = asyncio.Queue()
    real = asyncio.create_subprocess_exec

    async def spy(*args: Any, **kwargs: Any) -> Any:
        proc = await real(*args, **kwargs)
        spawned.put_nowait((proc, kwargs["cwd"]))
        return proc

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy)
    task = asyncio.create_task(run_python("import time\ntime.sleep(60)", SandboxLimits(wall_seconds=60)))
    proc, workdir = await spawned.get()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert proc.returncode is not None  # killed and reaped
    assert not await asyncio.to_thread(os.path.exists, workdir)


async def test_python_tool() -> None:
    t = python_tool(FAST)
    assert t.signature() == "python(code: str)" and t.max_concurrency == 2
    assert await t.call({"code": "print(6 * 7)"}) == "42"
    with pytest.raises(SandboxViolation):
        await t.call({"code": "open('/etc/passwd')"})


def test_limits_validation() -> None:
    with pytest.raises(ConfigError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)
    with pytest.raises(ConfigError, match="memory_bytes"):
        SandboxLimits(memory_bytes=1024)
    with pytest.raises(ConfigError, match="max_output_bytes"):
        SandboxLimits(max_output_bytes=-1)
    assert SandboxLimits().wall_seconds == 10 and SandboxLimits().memory_bytes == 512 * 1024 * 1024
    assert tempfile.gettempdir()  # the sandbox directories live under the normal temp dir
