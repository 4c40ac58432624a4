"""Hypothesis profiles shared by every test module (loaded by tests/conftest.py).

- ``short`` (the default, used by ``make test``): a few dozen examples per property, so each fuzz property takes
  a few seconds at most.
- ``long``: thousands of examples per property, for a fuzzing session by hand.

Choose one with ``HYPOTHESIS_PROFILE=long`` or hypothesis' own ``pytest --hypothesis-profile=long``. Tests that
pass ``max_examples`` to ``@settings`` themselves keep their count under either profile; fuzz properties should
leave it to the profile. Deadlines are off: the machines running the tests are shared, and a property that
bounds time per input asserts its own, generous bound instead.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = ("short", "long")

settings.register_profile(
    "short", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)


def load() -> str:
    """Load the profile named by ``HYPOTHESIS_PROFILE`` (default ``short``); returns its name."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "short")
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE must be one of {PROFILES}, got {name!r}")
    settings.load_profile(name)
    return name
