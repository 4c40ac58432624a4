"""Test-time-scaling strategies over the `Engine` interface, one algorithm a module, each registered by name.

A strategy module registers its class with `register_strategy`, declaring the bounds of its counts and its
object parameters; importing this package imports every built-in strategy module. See `branchwise.search.registry`.
"""

from __future__ import annotations

from .adaptive import Adaptive
from .base import Candidate, PromptTemplate, Result, SearchContext, Strategy, TraceNode, TraceTree
from .beam import Beam
from .best_of_n import BestOfN
from .consensus import Consensus
from .deepconf import DeepConf
from .dvts import DVTS
from .pdr import PDR
from .prune import Prune
from .refine import Refine
from .registry import (
    Component,
    NestedStrategy,
    StrategyInfo,
    available_strategies,
    get_strategy,
    register_strategy,
    strategy_info,
)
from .self_consistency import SelfConsistency
from .single import Single
from .spec_reason import SpecReason

__all__ = [
    "DVTS",
    "PDR",
    "Adaptive",
    "Beam",
    "BestOfN",
    "Candidate",
    "Component",
    "Consensus",
    "DeepConf",
    "NestedStrategy",
    "PromptTemplate",
    "Prune",
    "Refine",
    "Result",
    "SearchContext",
    "SelfConsistency",
    "Single",
    "SpecReason",
    "Strategy",
    "StrategyInfo",
    "TraceNode",
    "TraceTree",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "strategy_info",
]
