"""`branchwise serve` as a child process on a free port of 127.0.0.1, for tests of the real command (signals,
exit codes, the real engine)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["ServeProcess", "serve_process"]

_SERVE = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from branchwise.cli import main; sys.exit(main(sys.argv[1:]))"
)


class ServeProcess:
    """A running ``branchwise serve``; its stderr is read all along (a full pipe would block the server)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.base_url = ""
        self._reader = threading.Thread(target=self._read, name="serve-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self.ready.is_set() and line.startswith("branchwise: serving"):
                self.base_url = line.split(" at ", 1)[1].split(" ", 1)[0]
                self.ready.set()
        self.ready.set()  # the process ended (before it was ready, if base_url is empty)

    def stderr(self) -> str:
        """Everything the process wrote on stderr; waits for it to close (call once the process ended)."""
        self._reader.join(30)
        return "".join(self.lines)


@contextlib.contextmanager
def serve_process(
    specs: Path | list[Path], *args: str, env: Mapping[str, str] | None = None, ready_timeout: float = 30.0
) -> Iterator[ServeProcess]:
    """Start ``branchwise serve SPECS --port 0 ARGS`` and wait until it listens; kill it on leaving if still up."""
    paths = [specs] if isinstance(specs, Path) else specs
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE, "serve", *map(str, paths), "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group: the engine's processes go with it
    )
    served = ServeProcess(proc)
    try:
        assert served.ready.wait(ready_timeout) and served.base_url, served.stderr()[-4000:]
        yield served
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str]) -> None:
    """Stop a server that is still up: SIGTERM (it drains, then closes its engines), then SIGKILL to its whole
    process group (a killed server would leave its engine's processes behind)."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
