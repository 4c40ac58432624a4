"""Orchestration: the compute budget and usage accounting, and the ``branchwise`` command line."""

from __future__ import annotations

from .budget import (
    DEFAULT_MEMORY_WEIGHT,
    Budget,
    BudgetedEngine,
    CostEstimate,
    CostModel,
    Remaining,
    Usage,
    UsageSnapshot,
)

__all__ = [
    "DEFAULT_MEMORY_WEIGHT",
    "Budget",
    "BudgetedEngine",
    "CostEstimate",
    "CostModel",
    "Remaining",
    "Usage",
    "UsageSnapshot",
]
