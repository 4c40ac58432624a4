"""The branchwise exception tree.

Two families, so callers can tell "you asked for something wrong" from "something failed while running":

```
BranchwiseError
├── ConfigError                 usage errors: bad arguments, specs, names (fail before any work starts)
│   ├── RequestValidationError  an invalid GenerationRequest field
│   ├── UnknownNameError        a registry lookup with no match (carries "did you mean" suggestions)
│   ├── MissingDependencyError  an optional dependency is not installed (carries the install command)
│   ├── PlanError               an invalid plan (names the node and field)
│   ├── SpecError               an invalid pipeline spec (names the file, the YAML path and line)
│   ├── TraceFormatError        a file is not a readable branchwise trace (names the file and line)
│   └── DatasetError            a benchmark file is missing, malformed or fails its checksum (names file/line)
├── ModelProvisionError         a model could not be downloaded, verified or converted
├── EngineError                 runtime failures of an engine backend
│   ├── EngineUnavailable       the backend cannot be reached or started
│   ├── EngineTimeout           a request exceeded its hard time limit
│   ├── RateLimited             the backend kept answering 429 after all retries
│   ├── EngineStreamBroken      a stream broke after part of its output was delivered (not retried)
│   └── EngineRequestError      the backend rejected the request (HTTP 4xx, invalid output, ...)
│       └── ReplayMiss          the replay engine's trace bank cannot serve the request (never resampled)
├── GraderPoolError             the grading worker pool cannot run items
│   └── WorkerCrashError        one item killed its worker every time it ran
├── BudgetExhausted             a Budget cap was reached
├── ToolError                   a tool call failed
│   ├── ToolArgumentError       the arguments do not match the tool's signature or schema (names the field)
│   ├── ToolTimeout             a tool exceeded its time limit
│   └── SandboxViolation        sandboxed code hit a limit or a forbidden operation (names the limit)
└── ExecutionError              a plan run failed while executing
    ├── NodeFailedError         a node failed under the fail-fast policy (names the node; cause chained)
    └── NodeTimeoutError        a node exceeded its per-attempt time limit
```

Backend exceptions are translated at the boundary with ``raise ... from err`` so the cause stays visible.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = [
    "BranchwiseError",
    "BudgetExhausted",
    "ConfigError",
    "DatasetError",
    "EngineError",
    "EngineRequestError",
    "EngineStreamBroken",
    "EngineTimeout",
    "EngineUnavailable",
    "ExecutionError",
    "GraderPoolError",
    "MissingDependencyError",
    "ModelProvisionError",
    "NodeFailedError",
    "NodeTimeoutError",
    "PlanError",
    "RateLimited",
    "ReplayMiss",
    "RequestValidationError",
    "SandboxViolation",
    "SpecError",
    "ToolArgumentError",
    "ToolError",
    "ToolTimeout",
    "TraceFormatError",
    "UnknownNameError",
    "WorkerCrashError",
]


class BranchwiseError(Exception):
    """Base class of every error raised by branchwise."""


class ConfigError(BranchwiseError, ValueError):
    """A usage error: invalid arguments, configuration or names. Raised before any work starts."""


class RequestValidationError(ConfigError):
    """A `GenerationRequest` field is invalid.

    Attributes:
        field: the offending field name.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid request field {field!r}: {message}")
        self.field = field


class UnknownNameError(ConfigError, KeyError):
    """A name was looked up in a registry and not found.

    Attributes:
        kind: what was looked up (e.g. "engine backend", "model").
        name: the name that was asked for.
        suggestions: close matches among the registered names.
    """

    def __init__(self, kind: str, name: str, known: Sequence[str]) -> None:
        self.kind = kind
        self.name = name
        known = list(known)
        self.suggestions = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        if not self.suggestions and name:
            # A short or truncated name ("smolm") is far from the long one in full; compare the prefixes.
            heads = {k[: len(name) + 1]: k for k in known}
            self.suggestions = [heads[h] for h in difflib.get_close_matches(name, list(heads), n=3, cutoff=0.6)]
        hint = f" Did you mean {' or '.join(map(repr, self.suggestions))}?" if self.suggestions else ""
        message = f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known)) or '(none)'}."
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingDependencyError(ConfigError, ImportError):
    """An optional dependency needed for the requested feature is not installed.

    Attributes:
        package: the missing distribution.
        install: the command that installs it.
    """

    def __init__(self, feature: str, package: str, install: str) -> None:
        super().__init__(f"{feature} needs the {package!r} package, which is not installed. Install it with: {install}")
        self.package = package
        self.install = install


class PlanError(ConfigError):
    """A plan is invalid.

    Attributes:
        node: the plan node at fault, if any.
        field: the node field at fault, if any.
    """

    def __init__(self, message: str, *, node: str | None = None, field: str | None = None) -> None:
        where = ""
        if node is not None:
            where = f"node {node}" + (f", field {field!r}" if field else "") + ": "
        super().__init__(where + message)
        self.node = node
        self.field = field


class SpecError(ConfigError):
    """An invalid pipeline spec.

    Attributes:
        path: the dotted YAML path at fault ("" for the whole document).
        line: its 1-based line in the YAML text, when known.
        source: the file name or "<string>".
        detail: the message without the location.
    """

    def __init__(self, message: str, *, path: str = "", line: int | None = None, source: str = "<string>") -> None:
        where = source + (f":{line}" if line is not None else "")
        at = f" at {path!r}" if path else ""
        super().__init__(f"{where}: invalid pipeline spec{at}: {message}")
        self.path = path
        self.line = line
        self.source = source
        self.detail = message


class TraceFormatError(ConfigError):
    """A file is not a readable branchwise trace: not UTF-8 JSON Lines, another format, a newer version, or a
    record whose fields have the wrong types.

    Attributes:
        source: the file at fault.
        line: the 1-based line number, when one line is at fault.
    """

    def __init__(self, source: str, message: str, *, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line


class DatasetError(ConfigError):
    """A benchmark data set cannot be used: missing, unreadable, malformed, or failing its sha256 check.

    Attributes:
        source: the file or URL at fault.
        line: the 1-based line number of a malformed row, if any.
    """

    def __init__(self, source: str, message: str, *, line: int | None = None) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")
        self.source = source
        self.line = line


class ModelProvisionError(BranchwiseError):
    """A model could not be obtained: download, checksum or conversion failed."""


class EngineError(BranchwiseError):
    """A runtime failure inside an engine backend."""


class EngineUnavailable(EngineError):
    """The backend cannot be reached or could not start."""


class EngineTimeout(EngineError):
    """A request exceeded its hard time limit."""


class RateLimited(EngineError):
    """The backend kept rate-limiting (HTTP 429) after every retry."""


class EngineStreamBroken(EngineError):
    """A streamed call broke after part of its output had been delivered, so it was not retried.

    The connection was lost, the server went silent past the idle timeout, or the stream ended before every
    sample finished. Retrying inside the engine would sample different text than the consumer already holds, so
    the engine stops instead; the caller may discard the partial output and make a new call (a strategy can
    drop or resample that branch). A failure before any output was delivered is retried inside the engine and
    never raises this. Not an `EngineUnavailable`: the server may well be up, only this request is lost.

    Attributes:
        url: the base URL the stream came from, when known.
    """

    def __init__(self, message: str, *, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


class EngineRequestError(EngineError):
    """The backend rejected a request or returned something unusable.

    Attributes:
        status_code: the HTTP status, when the backend is an HTTP server.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ReplayMiss(EngineRequestError):
    """The ``replay`` engine's trace bank cannot serve a request. Replay never resamples or substitutes.

    Attributes:
        reason: ``"unknown_prompt"`` (no banked problem has this prompt), ``"settings"`` (banked with other
            sampling settings, a smaller ``max_tokens`` or other ``logprobs``), ``"exhausted"`` (more samples
            asked for than remain unserved), or ``"cut"`` (a sample cut short when it was banked was read past
            its end).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"trace bank cannot serve this request ({reason}): {message}")
        self.reason = reason


class GraderPoolError(BranchwiseError):
    """The grading worker pool cannot run items: it failed to start, or was closed under them."""


class WorkerCrashError(GraderPoolError):
    """One item killed its worker process every time it ran (a crash, not a timeout)."""


class BudgetExhausted(BranchwiseError):
    """A Budget cap was reached. ``cap`` names which one."""

    def __init__(self, cap: str, message: str | None = None) -> None:
        super().__init__(message or f"budget exhausted: {cap}")
        self.cap = cap


class ToolError(BranchwiseError):
    """A tool call failed. ``tool`` names the tool."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(f"tool {tool!r} failed: {message}")
        self.tool = tool


class ToolArgumentError(ToolError):
    """The arguments of a tool call do not fit the tool: unknown, missing, duplicated or invalid.

    Attributes:
        field: the offending argument name, if one can be named.
    """

    def __init__(self, tool: str, message: str, *, field: str | None = None) -> None:
        where = f"argument {field!r}: " if field else ""
        super().__init__(tool, where + message)
        self.field = field


class ToolTimeout(ToolError):
    """A tool call exceeded its time limit."""


class SandboxViolation(ToolError):
    """Sandboxed code hit a resource limit or attempted a forbidden operation.

    Attributes:
        limit: which limit or rule: ``cpu_time``, ``wall_time``, ``memory``, ``processes``, ``output``,
            ``file_size``, ``network``, ``filesystem`` or ``forbidden``.
    """

    def __init__(self, tool: str, limit: str, message: str) -> None:
        super().__init__(tool, f"{limit} limit: {message}" if limit else message)
        self.limit = limit


class ExecutionError(BranchwiseError):
    """A plan run failed while executing (as opposed to `PlanError`, an invalid plan)."""


class NodeFailedError(ExecutionError):
    """A plan node failed and the fail-fast policy stopped the run; the node's error is the ``__cause__``.

    Attributes:
        node: the node id.
        name: the node's tool name ("think" for a thought).
        error: the node's exception.
    """

    def __init__(self, node: int, name: str, error: BaseException) -> None:
        super().__init__(f"node {node} ({name}) failed: {type(error).__name__}: {error}")
        self.node = node
        self.name = name
        self.error = error


class NodeTimeoutError(ExecutionError):
    """A plan node exceeded its per-attempt time limit.

    Attributes:
        node: the node id.
        name: the node's tool name.
        timeout_s: the limit.
    """

    def __init__(self, node: int, name: str, timeout_s: float) -> None:
        super().__init__(f"node {node} ({name}) timed out after {timeout_s:g} s")
        self.node = node
        self.name = name
        self.timeout_s = timeout_s
