"""The tool registry: Python callables described, validated and called the same way by planners and the executor.

A `Tool` wraps a sync or async function. Its arguments are validated by a pydantic model built from the
function's type hints (defaults, ``Annotated[..., Field(...)]`` constraints and Google-style ``Args:``
descriptions are respected), and it renders itself for planner prompts (`Tool.signature`,
`ToolRegistry.prompt_description`) and as JSON schemas (`ToolRegistry.schemas`, OpenAI function style).

`Tool.call` is the one entry point the executor uses: it validates, waits for the tool's own concurrency and
rate limits, runs sync functions in a worker thread (`asyncio.to_thread`, so the event loop never blocks) and
async ones directly, and turns failures into `ToolError`. Cancellation propagates: an async tool is cancelled
where it awaits; a sync tool's thread cannot be interrupted and finishes in the background, its result dropped.

Tool results are passed to later plan nodes as plain Python objects (not serialised), so a tool may return
anything; when a result is shown to a language model it is rendered with ``str()`` (or JSON for dicts/lists).

Example:
    >>> registry = ToolRegistry()
    >>> @registry.register
    ... def add(a: int, b: int = 1) -> int:
    ...     '''Add two integers.'''
    ...     return a + b
    >>> registry.get("add").signature()
    'add(a: int, b: int = 1)'
"""

from __future__ import annotations

import asyncio
import inspect
import keyword
import logging
import re
import typing
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import pydantic
from asyncio_throttle.throttler import Throttler

from ..errors import BranchwiseError, ConfigError, ToolArgumentError, ToolError, UnknownNameError

__all__ = ["Tool", "ToolRegistry", "tool"]

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARG_LINE_RE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_SECTION_RE = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Example|Examples|Note|Notes):\s*$")


def _docstring_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """Return (first paragraph, {argument: description}) from a Google-style docstring."""
    doc = inspect.getdoc(fn) or ""
    lines = doc.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION_RE.match(line):
            break
        summary.append(line.strip())
    params: dict[str, str] = {}
    in_args = False
    current: str | None = None
    args_indent: int | None = None
    for line in lines:
        section = _SECTION_RE.match(line)
        if section:
            in_args = section.group(1) in {"Args", "Arguments", "Parameters"}
            current, args_indent = None, None
            continue
        if not in_args or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if args_indent is None:
            args_indent = indent
        match = _ARG_LINE_RE.match(line)
        if indent == args_indent and match:
            current = match.group(1).lstrip("*")
            params[current] = match.group(3).strip()
        elif current is not None and indent > args_indent:
            params[current] = (params[current] + " " + line.strip()).strip()
    return " ".join(summary), params


def _type_name(annotation: Any) -> str:
    """A short, readable rendering of a type annotation for prompts (``str``, ``list[int]``, ``int | None``)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "Any"
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation)
    return re.sub(r"\b(?:typing|collections\.abc|builtins)\.", "", text)


class Tool:
    """A callable tool with validated arguments, concurrency/rate limits and prompt/schema renderings.

    Attributes:
        name: the name planners call it by (a Python identifier).
        description: what it does (by default the first paragraph of the function's docstring).
        fn: the wrapped function (sync or async).
        args_model: pydantic model of the arguments, built from the function's type hints.
        param_names: argument names in positional order.
        max_concurrency: at most this many calls run at once (per event loop); ``None`` = unlimited.
        rate_limit: ``(calls, period_s)``: at most ``calls`` calls start in any ``period_s`` seconds.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        max_concurrency: int | None = None,
        rate_limit: tuple[int, float] | None = None,
    ) -> None:
        """Wrap ``fn``.

        Args:
            fn: a sync or async function with named parameters (no ``*args``/``**kwargs``).
            name: tool name; defaults to ``fn.__name__``.
            description: defaults to the first paragraph of ``fn``'s docstring.
            max_concurrency: cap on concurrent calls (>= 1), or ``None``.
            rate_limit: ``(calls, period_s)`` with calls >= 1 and period_s > 0, or ``None``.

        Raises:
            ConfigError: an invalid name, limit or signature.
        """
        if not callable(fn):
            raise ConfigError(f"a tool must wrap a callable, got {type(fn).__name__}")
        tool_name = name if name is not None else getattr(fn, "__name__", None)
        if not isinstance(tool_name, str) or not _NAME_RE.match(tool_name) or keyword.iskeyword(tool_name):
            raise ConfigError(f"tool name must be a Python identifier, got {tool_name!r} (pass name=...)")
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
            raise ConfigError(f"tool {tool_name!r}: max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        if rate_limit is not None:
            if (
                not isinstance(rate_limit, tuple)
                or len(rate_limit) != 2
                or not isinstance(rate_limit[0], int)
                or rate_limit[0] < 1
                or not isinstance(rate_limit[1], int | float)
                or rate_limit[1] <= 0
            ):
                raise ConfigError(
                    f"tool {tool_name!r}: rate_limit must be (calls >= 1, period_s > 0), got {rate_limit!r}"
                )
            rate_limit = (rate_limit[0], float(rate_limit[1]))
        self.fn = fn
        self.name: str = tool_name
        summary, arg_docs = _docstring_parts(fn)
        self.description: str = description if description is not None else summary
        self.max_concurrency = max_concurrency
        self.rate_limit = rate_limit
        self._is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.args_model, self.param_names, self._n_positional, self._params = self._build_model(arg_docs)
        # Semaphores bind to the loop they first block on; keep one per loop so a Tool can be reused across
        # `asyncio.run` calls (and by several loops in different threads).
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._throttler: Any = None  # a Throttler (asyncio_throttle has no type hints)
        if rate_limit is not None:
            self._throttler = Throttler(rate_limit=rate_limit[0], period=rate_limit[1], retry_interval=0.005)

    def _build_model(
        self, arg_docs: Mapping[str, str]
    ) -> tuple[type[pydantic.BaseModel], tuple[str, ...], int, tuple[inspect.Parameter, ...]]:
        try:
            sig = inspect.signature(self.fn)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"tool {self.name!r}: cannot read the signature of {self.fn!r}: {err}") from err
        unresolvable = (NameError, TypeError, AttributeError, SyntaxError)  # what evaluating annotations raises
        try:
            hints = typing.get_type_hints(self.fn, include_extras=True)
        except unresolvable:
            # String annotations may name variables of an enclosing function (a tool made by a factory).
            try:
                local_names = dict(inspect.getclosurevars(self.fn).nonlocals)
                hints = typing.get_type_hints(self.fn, localns=local_names, include_extras=True)
            except unresolvable:  # unresolvable forward references: unannotated parameters accept anything
                logger.warning("tool %s: could not resolve its type hints; arguments are not type-checked", self.name)
                hints = {}
        fields: dict[str, Any] = {}
        names: list[str] = []
        params: list[inspect.Parameter] = []
        n_positional = 0
        for index, param in enumerate(sig.parameters.values()):
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(
                    f"tool {self.name!r}: parameter {param.name!r} is variadic; tools need named parameters"
                )
            annotation = hints.get(param.name, param.annotation)
            if annotation is inspect.Parameter.empty or isinstance(annotation, str):
                annotation = Any
            params.append(param.replace(annotation=annotation))
            names.append(param.name)
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                n_positional += 1
            default = ... if param.default is inspect.Parameter.empty else param.default
            # Internal field names avoid clashes with BaseModel attributes ("json", "schema", "model_*"); the
            # alias is the real argument name, used for validation, errors and the JSON schema.
            fields[f"p{index}"] = (
                annotation,
                pydantic.Field(default, alias=param.name, description=arg_docs.get(param.name)),
            )
        model_name = "".join(part.capitalize() for part in self.name.split("_")) + "Args"
        try:
            model = pydantic.create_model(
                model_name,
                # Numbers are accepted for string arguments: planners pass earlier results (often numbers) on.
                __config__=pydantic.ConfigDict(
                    extra="forbid", arbitrary_types_allowed=True, protected_namespaces=(), coerce_numbers_to_str=True
                ),
                **fields,
            )
        except (TypeError, ValueError, pydantic.PydanticUserError) as err:
            raise ConfigError(f"tool {self.name!r}: cannot build an argument model: {err}") from err
        return model, tuple(names), n_positional, tuple(params)

    def __repr__(self) -> str:
        return f"Tool({self.signature()})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly (no validation or limits), so a decorated function stays usable."""
        return self.fn(*args, **kwargs)

    def bind(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Map positional and keyword arguments to argument names (no validation of values).

        Raises:
            ToolArgumentError: too many positional arguments, an unknown keyword, or an argument given twice.
        """
        if len(args) > self._n_positional:
            raise ToolArgumentError(
                self.name,
                f"takes at most {self._n_positional} positional argument(s) ({self.signature()}), got {len(args)}",
                field=None,
            )
        bound = dict(zip(self.param_names, args, strict=False))
        for key, value in (kwargs or {}).items():
            if key not in self.param_names:
                raise ToolArgumentError(
                    self.name, f"unknown argument; {self.name} takes {', '.join(self.param_names) or 'none'}", field=key
                )
            if key in bound:
                raise ToolArgumentError(self.name, "given both positionally and by keyword", field=key)
            bound[key] = value
        return bound

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate (and coerce) ``arguments``; fill in defaults.

        Returns:
            ``{argument name: validated value}`` for every parameter.

        Raises:
            ToolArgumentError: naming the tool and the first offending field; every problem is in the message.
        """
        if not isinstance(arguments, Mapping):
            raise ToolArgumentError(self.name, f"arguments must be a mapping, got {type(arguments).__name__}")
        try:
            model = self.args_model.model_validate(dict(arguments))
        except pydantic.ValidationError as err:
            errors = err.errors(include_url=False)
            first_field = next((str(item["loc"][0]) for item in errors if item["loc"]), None)
            if len(errors) == 1 and tuple(errors[0]["loc"]) == (first_field,):
                message = errors[0]["msg"]  # the field is already named by ToolArgumentError
            else:
                message = "; ".join(
                    f"{'.'.join(str(part) for part in item['loc']) or '(arguments)'}: {item['msg']}" for item in errors
                )
            raise ToolArgumentError(
                self.name, f"{message} (signature: {self.signature()})", field=first_field
            ) from None
        return {name: getattr(model, f"p{index}") for index, name in enumerate(self.param_names)}

    def parameters_schema(self) -> dict[str, Any]:
        """JSON schema of the arguments object (by argument name)."""
        schema = self.args_model.model_json_schema(by_alias=True)
        schema["title"] = self.name
        return schema

    def schema(self) -> dict[str, Any]:
        """An OpenAI-style function schema: ``{"type": "function", "function": {name, description, parameters}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters_schema()},
        }

    def signature(self) -> str:
        """The call signature as shown to planners, e.g. ``retrieve(query: str, k: int = 3)``."""
        parts = []
        for param in self._params:
            text = f"{param.name}: {_type_name(param.annotation)}"
            if param.default is not inspect.Parameter.empty:
                text += f" = {param.default!r}"
            parts.append(text)
        return f"{self.name}({', '.join(parts)})"

    def _semaphore(self) -> asyncio.Semaphore | None:
        if self.max_concurrency is None:
            return None
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            semaphore = self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return semaphore

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments``, wait for the concurrency and rate limits, and run the tool.

        Returns:
            whatever the function returns (any Python object).

        Raises:
            ToolArgumentError: invalid arguments (raised before any limit is waited on).
            ToolError: the function raised; the original exception is the ``__cause__``. Errors of branchwise's
                own tree (a `ToolError` subclass, `BudgetExhausted`, a `ConfigError` such as a missing corpus)
                propagate unchanged.
            asyncio.CancelledError: the call was cancelled; it propagates.
        """
        values = self.validate(arguments)
        semaphore = self._semaphore()
        if semaphore is None:
            return await self._run(values)
        async with semaphore:
            return await self._run(values)

    async def _run(self, values: dict[str, Any]) -> Any:
        if self._throttler is not None:
            await self._throttler.acquire()
        args, kwargs = self._split(values)
        try:
            if self._is_async:
                return await self.fn(*args, **kwargs)
            return await asyncio.to_thread(self.fn, *args, **kwargs)
        except BranchwiseError:
            raise
        except Exception as err:
            raise ToolError(self.name, f"{type(err).__name__}: {err}") from err

    def _split(self, values: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for param in self._params:
            if param.kind is param.POSITIONAL_ONLY:
                args.append(values[param.name])
            else:
                kwargs[param.name] = values[param.name]
        return args, kwargs


class ToolRegistry:
    """Tools by name. Iteration yields tools in registration order."""

    def __init__(self, tools: Sequence[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.register(item)

    def register(
        self,
        fn_or_tool: Tool | Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        max_concurrency: int | None = None,
        rate_limit: tuple[int, float] | None = None,
    ) -> Tool:
        """Register a function or a `Tool` (usable as a plain decorator) and return the `Tool`.

        Options given here override those of a `Tool` passed in (a new `Tool` is made; the original is unchanged).

        Raises:
            ConfigError: the name is already registered, or the function cannot be a tool.
        """
        overrides = name is not None or description is not None or max_concurrency is not None or rate_limit is not None
        if isinstance(fn_or_tool, Tool):
            item = fn_or_tool
            if overrides:
                item = Tool(
                    item.fn,
                    name=name if name is not None else item.name,
                    description=description if description is not None else item.description,
                    max_concurrency=max_concurrency if max_concurrency is not None else item.max_concurrency,
                    rate_limit=rate_limit if rate_limit is not None else item.rate_limit,
                )
        else:
            item = Tool(
                fn_or_tool,
                name=name,
                description=description,
                max_concurrency=max_concurrency,
                rate_limit=rate_limit,
            )
        if item.name in self._tools:
            raise ConfigError(f"a tool named {item.name!r} is already registered")
        self._tools[item.name] = item
        return item

    def get(self, name: str) -> Tool:
        """The tool called ``name``.

        Raises:
            UnknownNameError: no such tool (with "did you mean" suggestions).
        """
        try:
            return self._tools[name]
        except (KeyError, TypeError):
            raise UnknownNameError("tool", str(name), list(self._tools)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    def names(self) -> list[str]:
        """Registered tool names, in registration order."""
        return list(self._tools)

    def prompt_description(self) -> str:
        """A numbered list of signatures and descriptions (with argument descriptions) for a planner prompt."""
        lines = []
        for number, item in enumerate(self._tools.values(), start=1):
            lines.append(f"{number}. {item.signature()}")
            if item.description:
                lines.append(f"   {item.description}")
            properties = item.parameters_schema().get("properties", {})
            for arg in item.param_names:
                described = properties.get(arg, {}).get("description")
                if described:
                    lines.append(f"   - {arg}: {described}")
        return "\n".join(lines)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI-style function schemas of every tool, in registration order."""
        return [item.schema() for item in self._tools.values()]


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    max_concurrency: int | None = None,
    rate_limit: tuple[int, float] | None = None,
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    max_concurrency: int | None = None,
    rate_limit: tuple[int, float] | None = None,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Decorator making a `Tool` of a function: ``@tool`` or ``@tool(name=..., max_concurrency=...)``.

    The decorated name is the `Tool`; calling it calls the function directly.
    """

    def wrap(func: Callable[..., Any]) -> Tool:
        return Tool(func, name=name, description=description, max_concurrency=max_concurrency, rate_limit=rate_limit)

    return wrap(fn) if fn is not None else wrap
