"""The ``python`` tool: run untrusted code in a limited subprocess.

Each call starts a fresh interpreter (the one running branchwise) in isolated mode (``-I -B -X utf8``: no
``PYTHON*`` variables, no user site, no bytecode writes) with an empty environment, in a new temporary working
directory that is deleted afterwards, in its own session (process group). The code arrives on stdin; a small
bootstrap then, before running it:

- sets resource limits: CPU time (``RLIMIT_CPU``), address space (``RLIMIT_AS``), file size (``RLIMIT_FSIZE``),
  open files, no core dumps, and, for non-root users, a process/thread count (``RLIMIT_NPROC``) backstop;
- installs an audit hook (`sys.addaudithook`, which cannot be removed) that refuses: socket creation other than
  local ``AF_UNIX`` pairs, and every connect/bind/send/DNS lookup (``network``); opening, listing or changing
  files outside the working directory, except reading the interpreter's own stdlib and site-packages
  (``filesystem``); fork/exec/spawn/subprocess/kill (``processes``); ``ctypes``, changing resource limits and
  walking the garbage collector's object graph, which could reach the hook (``forbidden``).

The parent reads stdout and stderr concurrently without blocking the event loop, kills the process group when
stdout or stderr exceeds the output cap or the wall clock runs out, and maps how the child ended onto a
`SandboxViolation` naming the limit (``cpu_time``, ``wall_time``, ``memory``, ``output``, ``file_size``,
``network``, ``filesystem``, ``processes``, ``forbidden``). ``memory`` is reported only when the child shows it
ran out of memory (``MemoryError``); a death by a signal no limit sent (the code signalling itself, the system's
OOM killer) is reported as that signal. Other non-zero exits raise `ToolError` with the tail of stderr.

Like every in-process audit-hook sandbox this is defence in depth, not a security boundary against a determined
attacker with native code (CPython documents audit hooks as such): it stops accidents and ordinary escapes
(reading ``/etc/passwd``, network calls, fork bombs, runaway loops and allocations) cleanly and fast. Run
hostile workloads inside a container or VM as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError, SandboxViolation, ToolError
from .registry import Tool

__all__ = ["SandboxLimits", "SandboxResult", "python_tool", "run_python"]

logger = logging.getLogger(__name__)

_TOOL = "python"
_MARK_RE = re.compile(r"branchwise-sandbox\[(\w+)\]: ([^\n]*)")
_STDERR_TAIL = 4000


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    Attributes:
        cpu_seconds: CPU time (``RLIMIT_CPU``, rounded up to whole seconds; the process gets SIGXCPU, then
            SIGKILL one second later).
        wall_seconds: wall-clock time; the whole process group is killed when it runs out.
        memory_bytes: address-space size (``RLIMIT_AS``); allocations beyond it raise ``MemoryError``.
        max_output_bytes: cap on stdout, and separately on stderr; the process is killed when one exceeds it.
        max_file_bytes: largest file the code may write (``RLIMIT_FSIZE``).
        max_open_files: ``RLIMIT_NOFILE``.
        max_processes: extra processes/threads the code may create (``RLIMIT_NPROC`` above the user's current
            count; not enforced by the kernel for root, where the audit hook's fork/exec ban is what holds).
    """

    cpu_seconds: float = 5.0
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 1024 * 1024
    max_output_bytes: int = 64 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 64
    max_processes: int = 32

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        for name in ("memory_bytes", "max_output_bytes", "max_file_bytes", "max_open_files", "max_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"SandboxLimits.{name} must be a positive integer, got {value!r}")
        if self.memory_bytes < 64 * 1024 * 1024:
            raise ConfigError(
                f"SandboxLimits.memory_bytes must be at least 64 MiB (the interpreter needs it), "
                f"got {self.memory_bytes}"
            )
        if self.max_open_files < 16:
            raise ConfigError(f"SandboxLimits.max_open_files must be at least 16, got {self.max_open_files}")


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended (returned by `run_python` with ``check=False``).

    Attributes:
        stdout: captured standard output (decoded as UTF-8, invalid bytes replaced).
        stderr: the tail of standard error.
        returncode: exit status (negative: killed by that signal).
        violation: the limit that was hit, or ``None``.
        detail: a short explanation of the violation, or of a death by a signal that was no limit's doing
            (``"killed by signal SIGKILL (9)"``); empty otherwise.
        wall_seconds: elapsed time.
    """

    stdout: str
    stderr: str
    returncode: int
    violation: str | None
    detail: str
    wall_seconds: float


# Runs in the child before the user's code. Kept free of names the user's code could use to undo it: the hook
# is only referenced from the interpreter's hook list, and gc traversal is refused.
_BOOTSTRAP = r"""
import sys
def _branchwise_setup():
    import ast, builtins, json, linecache, os, resource
    cfg = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", "replace")
    cwd = os.path.realpath(os.getcwd())
    os.environ["TMPDIR"] = cwd
    def setlim(which, soft, hard=None):
        try:
            resource.setrlimit(which, (soft, soft if hard is None else hard))
        except (ValueError, OSError):
            pass
    setlim(resource.RLIMIT_CPU, cfg["cpu"], cfg["cpu"] + 1)
    setlim(resource.RLIMIT_AS, cfg["mem"])
    setlim(resource.RLIMIT_FSIZE, cfg["fsize"])
    setlim(resource.RLIMIT_NOFILE, cfg["nofile"])
    setlim(resource.RLIMIT_CORE, 0)
    if os.getuid() != 0:
        uid, tasks = os.getuid(), 0
        try:
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        if entry.stat().st_uid == uid:
                            tasks += len(os.listdir(entry.path + "/task"))
                    except OSError:
                        pass
        except OSError:
            pass
        setlim(resource.RLIMIT_NPROC, tasks + cfg["nproc"])
    roots = []
    for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path]:
        if p and os.path.isdir(p):
            r = os.path.realpath(p)
            if r != "/" and r not in roots:
                roots.append(r)
    read_roots = tuple(roots)
    sep = os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    process_events = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                                "subprocess.Popen", "os.kill", "os.killpg", "pty.spawn", "os.pidfd_open"})
    net_events = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                            "socket.getnameinfo", "socket.sethostname", "http.client.connect",
                            "urllib.Request", "webbrowser.open"})
    mutate_events = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                     "os.truncate": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1, "os.setxattr": 1,
                     "os.removexattr": 1, "os.rename": 2, "os.link": 2, "os.symlink": -1, "os.mkfifo": 1,
                     "os.mknod": 1}
    list_events = frozenset({"os.listdir", "os.scandir", "os.listxattr", "os.getxattr", "glob.glob"})
    forbidden_events = frozenset({"resource.setrlimit", "resource.prlimit", "gc.get_objects",
                                  "gc.get_referrers", "gc.get_referents"})
    blocked_imports = {"_posixsubprocess": "processes", "_ctypes": "forbidden", "ctypes": "forbidden"}

    def deny(limit, what):
        raise PermissionError("branchwise-sandbox[%s]: %s" % (limit, what))

    def inside(path, bases):
        return any(path == b or path.startswith(b + sep) for b in bases)

    def resolve(path):
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(os.fspath(path))

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writing = bool((flags or 0) & write_flags) or any(c in (mode or "") for c in "wax+")
            real = resolve(path)
            if inside(real, (cwd,)) or real == "/dev/null":
                return
            if not writing and (inside(real, read_roots) or real in ("/dev/urandom", "/dev/random")):
                return
            deny("filesystem", "%s %r is outside the sandbox directory" % ("writing" if writing else "reading",
                                                                            os.fsdecode(path)))
        elif event in net_events:
            deny("network", "network access is disabled (%s)" % event)
        elif event == "socket.__new__":
            family = args[1]
            if family != 1:  # AF_UNIX: socketpair() for asyncio's self-pipe; connect/bind stay refused
                deny("network", "network access is disabled (socket family %s)" % family)
        elif event in process_events:
            deny("processes", "creating or signalling processes is disabled (%s)" % event)
        elif event in list_events:
            path = args[0] if args else None
            if path is None or isinstance(path, int):
                return
            real = resolve(path)
            if not inside(real, (cwd,)) and not inside(real, read_roots):
                deny("filesystem", "listing %r is outside the sandbox directory" % os.fsdecode(path))
        elif event in mutate_events:
            n = mutate_events[event]
            paths = args[1:2] if n == -1 else args[:n]
            for path in paths:
                if path is None or isinstance(path, int):
                    continue
                real = resolve(path)
                if not inside(real, (cwd,)):
                    deny("filesystem", "%s on %r is outside the sandbox directory" % (event, os.fsdecode(path)))
        elif event == "import":
            limit = blocked_imports.get(args[0])
            if limit is not None:
                deny(limit, "importing %s is disabled" % args[0])
        elif event in forbidden_events or event.startswith("ctypes."):
            deny("forbidden", "%s is disabled in the sandbox" % event)

    for name in ("subprocess", "_posixsubprocess", "multiprocessing", "ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    # _posixsubprocess.fork_exec raises no audit event: a stub stands in for it (so `import subprocess` and
    # asyncio still work) and loading the real module is refused below.
    import types
    stub = types.ModuleType("_posixsubprocess")
    def fork_exec(*args, **kwargs):
        deny("processes", "creating processes is disabled (fork_exec)")
    stub.fork_exec = fork_exec
    sys.modules["_posixsubprocess"] = stub
    sys.addaudithook(hook)
    linecache.cache["<code>"] = (len(code), None, code.splitlines(True), "<code>")
    return code, ast, builtins

def _branchwise_run(code, ast, builtins):
    tree = ast.parse(code, "<code>", "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(tree, "<code>", "exec"), namespace)
    if last is not None:
        value = eval(compile(last, "<code>", "eval"), namespace)
        if value is not None:
            print(repr(value))

_args = _branchwise_setup()
del _branchwise_setup
_branchwise_run(*_args)
"""


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


async def run_python(code: str, limits: SandboxLimits | None = None, *, check: bool = True) -> SandboxResult:
    """Run ``code`` in the sandbox and return how it ended.

    If the code's last statement is an expression, its ``repr`` is printed (like an interactive prompt) unless
    it is ``None``.

    Args:
        code: Python source.
        limits: the limits (defaults: `SandboxLimits()`).
        check: raise on a violation or a non-zero exit (default); with ``False`` return the result instead.

    Raises:
        SandboxViolation: (when ``check``) a limit was hit; ``limit`` names it.
        ToolError: (when ``check``) the code exited with a non-zero status or was killed by a signal no limit
            sent (the message names the signal and ends with stderr's tail).
    """
    if not isinstance(code, str):
        raise ToolError(_TOOL, f"code must be a string, got {type(code).__name__}")
    limits = limits or SandboxLimits()
    started = time.monotonic()
    run = await _run_child(code, limits)
    elapsed = time.monotonic() - started
    out_text = run.stdout.decode("utf-8", "replace")
    err_text = run.stderr.decode("utf-8", "replace")[-_STDERR_TAIL:]
    violation, detail = _classify(
        limits, run.returncode, err_text, overflow=run.overflow, timed_out=run.timed_out, elapsed=elapsed
    )
    result = SandboxResult(out_text, err_text, run.returncode, violation, detail, elapsed)
    logger.debug("python sandbox: rc=%s violation=%s in %.2fs", run.returncode, violation, elapsed)
    if check:
        if violation is not None:
            raise SandboxViolation(_TOOL, violation, detail)
        if run.returncode != 0:
            tail = err_text.strip()[-1500:] or "(no stderr)"
            how = f"was {detail}" if run.returncode < 0 else f"exited with status {run.returncode}"
            raise ToolError(_TOOL, f"the code {how}:\n{tail}")
    return result


@dataclass
class _ChildRun:
    """What the parent saw of one sandboxed interpreter."""

    returncode: int = 0
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    overflow: list[str] = field(default_factory=list)  # the streams that exceeded the output cap
    timed_out: bool = False


async def _run_child(code: str, limits: SandboxLimits) -> _ChildRun:
    """Start the interpreter on ``code`` in a fresh directory, collect its output, and reap it, however it ends."""
    config = json.dumps(
        {
            "cpu": max(1, math.ceil(limits.cpu_seconds)),
            "mem": limits.memory_bytes,
            "fsize": limits.max_file_bytes,
            "nofile": limits.max_open_files,
            "nproc": limits.max_processes,
        }
    )
    workdir = tempfile.mkdtemp(prefix="branchwise-python-")
    run = _ChildRun()
    proc: asyncio.subprocess.Process | None = None
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                "-B",
                "-X",
                "utf8",
                "-c",
                _BOOTSTRAP,
                config,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=workdir,
                env={},
                start_new_session=True,
            )
        except OSError as err:
            raise ToolError(_TOOL, f"could not start the sandbox interpreter {sys.executable}: {err}") from err
        try:
            async with asyncio.timeout(limits.wall_seconds):
                await asyncio.gather(
                    _feed(proc, code),
                    _pump(proc, proc.stdout, run, "stdout", limits.max_output_bytes),
                    _pump(proc, proc.stderr, run, "stderr", limits.max_output_bytes),
                )
                await proc.wait()
        except TimeoutError:
            run.timed_out = True
            _kill_group(proc)
            await proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.shield(proc.wait())
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, workdir, True))
    assert proc.returncode is not None
    run.returncode = proc.returncode
    return run


async def _feed(proc: asyncio.subprocess.Process, code: str) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(code.encode("utf-8", "surrogatepass"))
        await proc.stdin.drain()
    proc.stdin.close()


async def _pump(
    proc: asyncio.subprocess.Process, stream: asyncio.StreamReader | None, run: _ChildRun, name: str, cap: int
) -> None:
    """Collect one output stream; kill the process group once it exceeds ``cap`` bytes (stderr keeps its tail)."""
    assert stream is not None
    buffer = run.stdout if name == "stdout" else run.stderr
    total = 0
    while chunk := await stream.read(65536):
        total += len(chunk)
        if total > cap:
            run.overflow.append(name)
            _kill_group(proc)
            return
        buffer.extend(chunk)
        if name == "stderr" and len(buffer) > 4 * _STDERR_TAIL:
            del buffer[: len(buffer) - _STDERR_TAIL]


def _classify(
    limits: SandboxLimits, returncode: int, stderr: str, *, overflow: list[str], timed_out: bool, elapsed: float
) -> tuple[str | None, str]:
    """The limit that ended the run (or None) and a short explanation, from how the child ended."""
    if overflow:
        return "output", f"{overflow[0]} exceeded {limits.max_output_bytes} bytes; the process was killed"
    if timed_out:
        return "wall_time", f"still running after {limits.wall_seconds:g} s; the process group was killed"
    # RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one (a second later, reached only when
    # SIGXCPU is ignored), so a SIGKILL counts as the CPU limit only once that much time can have been used.
    cpu_hard = max(1, math.ceil(limits.cpu_seconds)) + 1
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and elapsed >= cpu_hard):
        return "cpu_time", f"used more than {limits.cpu_seconds:g} s of CPU time"
    if returncode == -signal.SIGXFSZ:
        return "file_size", f"wrote a file larger than {limits.max_file_bytes} bytes"
    if returncode == 0:
        return None, ""
    marks = _MARK_RE.findall(stderr)
    if marks:
        limit, what = marks[-1]
        return limit, what
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if f"[Errno {errno.EFBIG}]" in last_line:
        return "file_size", f"wrote a file larger than {limits.max_file_bytes} bytes"
    # RLIMIT_AS makes allocations fail, which Python reports as MemoryError (a traceback, or a fatal error when
    # the interpreter itself could not allocate); a signal alone is no evidence of the memory limit.
    if last_line.startswith("MemoryError") or (returncode < 0 and _OUT_OF_MEMORY_RE.search(stderr)):
        return "memory", f"exceeded the {limits.memory_bytes // (1024 * 1024)} MiB memory limit"
    if returncode < 0:
        return None, f"killed by signal {_signal_name(-returncode)}"
    return None, ""


_OUT_OF_MEMORY_RE = re.compile(r"MemoryError|Cannot allocate memory|out of memory", re.IGNORECASE)


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def python_tool(limits: SandboxLimits | None = None, *, max_concurrency: int | None = 2) -> Tool:
    """A `Tool` named ``python`` that runs code in the sandbox with ``limits``.

    Args:
        limits: sandbox limits (defaults: `SandboxLimits()`).
        max_concurrency: concurrent sandboxes at most (each is a process; default 2).
    """
    limits = limits or SandboxLimits()
    summary = ", ".join(f"{k}={v}" for k, v in asdict(limits).items())

    async def python(code: str) -> str:
        """Run Python code in a sandbox and return what it printed (stdout). Use print() to output results.

        Args:
            code: Python source (standard library; no network, no files outside its working directory).
        """
        return (await run_python(code, limits)).stdout.rstrip("\n")

    logger.debug("python tool limits: %s", summary)
    return Tool(python, max_concurrency=max_concurrency)
