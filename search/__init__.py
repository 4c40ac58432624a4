"""Test-time-scaling strategies over the `Engine` interface, one algorithm a module, resolved by name."""

from __future__ import annotations

from typing import Any

from ..errors import UnknownNameError
from .adaptive import Adaptive
from .base import Candidate, PromptTemplate, Result, SearchContext, Strategy, TraceNode, TraceTree
from .beam import Beam
from .best_of_n import BestOfN
from .deepconf import DeepConf
from .dvts import DVTS
from .pdr import PDR
from .prune import Prune
from .refine import Refine
from .self_consistency import SelfConsistency
from .single import Single

__all__ = [
    "DVTS",
    "PDR",
    "Adaptive",
    "Beam",
    "BestOfN",
    "Candidate",
    "DeepConf",
    "PromptTemplate",
    "Prune",
    "Refine",
    "Result",
    "SearchContext",
    "SelfConsistency",
    "Single",
    "Strategy",
    "TraceNode",
    "TraceTree",
    "available_strategies",
    "get_strategy",
]

_STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Single, SelfConsistency, BestOfN, DeepConf, Prune, Adaptive, Refine, PDR, Beam, DVTS)
}


def available_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_strategy(name: str, **params: Any) -> Strategy:
    """Build a strategy by name, e.g. ``get_strategy("self_consistency", n=16)``."""
    try:
        cls = _STRATEGIES[name]
    except KeyError:
        raise UnknownNameError("strategy", name, list(_STRATEGIES)) from None
    return cls(**params)
