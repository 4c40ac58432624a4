"""branchwise: agentic reasoning and test-time scaling.

A planner turns a query into a DAG of tool calls and reasoning threads; an async executor runs each node as soon
as its inputs exist; reasoning threads are test-time-scaling strategies whose traces stream out of an embedded
vLLM engine, are scored while they grow, and are aborted inside the engine when they stop paying, all under one
compute budget.

``import branchwise`` is light: public names are loaded on first use, and vllm/torch only when an engine starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Engine": "branchwise.engine",
    "GenerationRequest": "branchwise.engine",
    "Generation": "branchwise.engine",
    "Completion": "branchwise.engine",
    "Delta": "branchwise.engine",
    "ChatMessage": "branchwise.engine",
    "StructuredOutput": "branchwise.engine",
    "TokenLogprob": "branchwise.engine",
    "CallUsage": "branchwise.engine",
    "Capabilities": "branchwise.engine",
    "create_engine": "branchwise.engine",
    "register_backend": "branchwise.engine",
    "available_backends": "branchwise.engine",
    "VLLMEngine": "branchwise.engine.vllm_engine",
    "OpenAIEngine": "branchwise.engine.openai_engine",
    "ScriptedEngine": "branchwise.engine.testing",
    "ScriptedResponse": "branchwise.engine.testing",
    "FunctionEngine": "branchwise.engine.testing",
    "MODELS": "branchwise.engine.models",
    "pull_model": "branchwise.engine.models",
    "resolve_model": "branchwise.engine.models",
    "arithmetic_problems": "branchwise.evals.arithmetic",
    "Budget": "branchwise.budget",
    "BudgetedEngine": "branchwise.budget",
    "CostModel": "branchwise.budget",
    "Usage": "branchwise.budget",
    "Pipeline": "branchwise.orchestrator.pipeline",
    "RunResult": "branchwise.orchestrator.pipeline",
    "run": "branchwise.orchestrator.pipeline",
    "run_sync": "branchwise.orchestrator.pipeline",
    "load_spec": "branchwise.orchestrator.spec",
    "read_trace": "branchwise.orchestrator.tracing",
    "SpecError": "branchwise.orchestrator.spec",
    "Plan": "branchwise.planners",
    "get_planner": "branchwise.planners",
    "Executor": "branchwise.executors",
    "run_agent": "branchwise.executors",
    "run_react": "branchwise.executors",
    "AgentResult": "branchwise.executors",
    "Tool": "branchwise.executors",
    "ToolRegistry": "branchwise.executors",
    "tool": "branchwise.executors",
    "default_tools": "branchwise.executors",
    "get_strategy": "branchwise.search",
    "Result": "branchwise.search",
    "SearchContext": "branchwise.search",
}
# Sub-packages reachable as attributes (``bw.search.DeepConf``) without importing them up front.
_SUBPACKAGES = ("budget", "engine", "evals", "executors", "orchestrator", "planners", "search", "verifiers")
_RENAMES = {"pull_model": "pull"}
_ERRORS = (
    "BranchwiseError",
    "BudgetExhausted",
    "ConfigError",
    "EngineError",
    "EngineRequestError",
    "EngineTimeout",
    "EngineUnavailable",
    "MissingDependencyError",
    "GraderPoolError",
    "ModelProvisionError",
    "PlanError",
    "RateLimited",
    "RequestValidationError",
    "ToolError",
    "ToolArgumentError",
    "ToolTimeout",
    "SandboxViolation",
    "ExecutionError",
    "NodeFailedError",
    "NodeTimeoutError",
    "DatasetError",
    "UnknownNameError",
    "WorkerCrashError",
)
_EXPORTS.update(dict.fromkeys(_ERRORS, "branchwise.errors"))

__all__ = [
    "MODELS",
    "AgentResult",
    "BranchwiseError",
    "Budget",
    "BudgetExhausted",
    "BudgetedEngine",
    "CallUsage",
    "Capabilities",
    "ChatMessage",
    "Completion",
    "ConfigError",
    "CostModel",
    "DatasetError",
    "Delta",
    "Engine",
    "EngineError",
    "EngineRequestError",
    "EngineTimeout",
    "EngineUnavailable",
    "ExecutionError",
    "Executor",
    "FunctionEngine",
    "Generation",
    "GenerationRequest",
    "GraderPoolError",
    "MissingDependencyError",
    "ModelProvisionError",
    "NodeFailedError",
    "NodeTimeoutError",
    "OpenAIEngine",
    "Pipeline",
    "Plan",
    "PlanError",
    "RateLimited",
    "RequestValidationError",
    "Result",
    "RunResult",
    "SandboxViolation",
    "ScriptedEngine",
    "ScriptedResponse",
    "SearchContext",
    "SpecError",
    "StructuredOutput",
    "TokenLogprob",
    "Tool",
    "ToolArgumentError",
    "ToolError",
    "ToolRegistry",
    "ToolTimeout",
    "UnknownNameError",
    "Usage",
    "VLLMEngine",
    "WorkerCrashError",
    "__version__",
    "arithmetic_problems",
    "available_backends",
    "create_engine",
    "default_tools",
    "get_planner",
    "get_strategy",
    "load_spec",
    "pull_model",
    "read_trace",
    "register_backend",
    "resolve_model",
    "run",
    "run_agent",
    "run_react",
    "run_sync",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"branchwise.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'branchwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)


if TYPE_CHECKING:
    from .budget import Budget, BudgetedEngine, CostModel, Usage
    from .engine import (
        CallUsage,
        Capabilities,
        ChatMessage,
        Completion,
        Delta,
        Engine,
        Generation,
        GenerationRequest,
        StructuredOutput,
        TokenLogprob,
        available_backends,
        create_engine,
        register_backend,
    )
    from .engine.models import MODELS, resolve_model
    from .engine.models import pull as pull_model
    from .engine.openai_engine import OpenAIEngine
    from .engine.testing import FunctionEngine, ScriptedEngine, ScriptedResponse
    from .engine.vllm_engine import VLLMEngine
    from .errors import (
        BranchwiseError,
        BudgetExhausted,
        ConfigError,
        DatasetError,
        EngineError,
        EngineRequestError,
        EngineTimeout,
        EngineUnavailable,
        ExecutionError,
        GraderPoolError,
        MissingDependencyError,
        ModelProvisionError,
        NodeFailedError,
        NodeTimeoutError,
        PlanError,
        RateLimited,
        RequestValidationError,
        SandboxViolation,
        ToolArgumentError,
        ToolError,
        ToolTimeout,
        UnknownNameError,
        WorkerCrashError,
    )
    from .evals.arithmetic import arithmetic_problems
    from .executors import AgentResult, Executor, Tool, ToolRegistry, default_tools, run_agent, run_react, tool
    from .orchestrator.pipeline import Pipeline, RunResult, run, run_sync
    from .orchestrator.spec import SpecError, load_spec
    from .orchestrator.tracing import read_trace
    from .planners import Plan, get_planner
    from .search import Result, SearchContext, get_strategy
