"""Starting child processes from library code without a ``__main__`` guard in the user's script.

multiprocessing's ``spawn`` and ``forkserver`` start methods re-import the parent's main module in every child,
so a script that starts processes at import time (no ``if __name__ == "__main__":`` guard) would run again in
each child. Library children (vLLM's engine core, grading workers) only need library code, so while they start
we hide the main module's identity from multiprocessing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["main_hidden_from_spawn"]

# The main module is process-global; serialise our temporary edits of it.
_LOCK = threading.RLock()


@contextlib.contextmanager
def main_hidden_from_spawn() -> Iterator[None]:
    """Within this block, processes started with spawn/forkserver do not re-import ``__main__``."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _LOCK:
        had_file = hasattr(main, "__file__")
        saved_file = getattr(main, "__file__", None)
        saved_spec = getattr(main, "__spec__", None)
        main.__spec__ = None
        if had_file:
            del main.__file__
        try:
            yield
        finally:
            main.__spec__ = saved_spec
            if had_file:
                main.__file__ = saved_file
