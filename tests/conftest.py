"""Setup shared by all tests: the hypothesis profiles and the fault-injecting OpenAI-compatible server.

tests/ has no ``__init__.py`` (pytest runs with ``--import-mode=importlib``), so shared helper modules that live
here are made importable by putting this folder on ``sys.path``; test modules then ``import fault_server``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import _hypothesis_profiles  # noqa: E402 - needs the path above
from fault_server import fault_server, fault_server_b  # noqa: E402 - fixtures, registered by being imported here

__all__ = ["fault_server", "fault_server_b"]

_hypothesis_profiles.load()
