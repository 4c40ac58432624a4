"""executors: the async DAG executor, the agent loops, the tool registry and the built-in tools.

Built-in tools: ``calculator`` (safe AST arithmetic), ``python`` (sandboxed subprocess), ``retrieve`` (BM25 over
a local corpus) and ``http_get`` (off unless enabled). bm25s is imported only when ``retrieve`` first runs.
"""

# `tools` first: it imports the built-in tool modules, one of which (sandbox) still imports `Tool` through it.
from .tools import Tool, ToolRegistry, default_tools, tool

# isort: split
from .agent import AgentResult, run_agent
from .calculator import calculate, calculator, calculator_tool
from .executor import Executor
from .http_tool import http_get_tool
from .nodes import NodeResult, RetryPolicy
from .react import run_react
from .retrieval import BM25Retriever, Document, load_documents, retrieve_tool
from .sandbox import SandboxLimits, SandboxResult, python_tool, run_python

__all__ = [
    "AgentResult",
    "BM25Retriever",
    "Document",
    "Executor",
    "NodeResult",
    "RetryPolicy",
    "SandboxLimits",
    "SandboxResult",
    "Tool",
    "ToolRegistry",
    "calculate",
    "calculator",
    "calculator_tool",
    "default_tools",
    "http_get_tool",
    "load_documents",
    "python_tool",
    "retrieve_tool",
    "run_agent",
    "run_python",
    "run_react",
    "tool",
]
