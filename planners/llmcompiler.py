"""LLMCompiler-style planning: the model writes a numbered plan, parsed line by line from the token stream.

```
1. retrieve("population of Paris")
2. retrieve(query="population of Berlin", k=2)
Thought: now compare them
3. think("Which city is larger? $1 versus $2")
4. join()
<END_OF_PLAN>
```

`PlanParser` is incremental: `PlanParser.feed` takes text as it streams and returns the nodes whose lines just
completed, so the executor can start them while the model is still writing (eager dispatch). Output is repaired
where the fix is unambiguous, and every repair is recorded as a `Repair`:

- ``code_fence``: markdown fences around the plan are ignored.
- ``ignored_line``: prose lines between tasks (other than ``Thought:`` lines) are ignored.
- ``trailing_prose``: text after the join or the end marker is ignored.
- ``ref_braces``: ``${1}`` is rewritten ``$1``.
- ``numbered``: a task line without a number gets the next one.
- ``numbering_gap``: task numbers that skip some (1, 2, 4) are kept as written, and the gap is recorded.
- ``unclosed_call``: a call missing its closing parenthesis is closed.
- ``tool_name``: an unknown tool name with exactly one close match is replaced by it.
- ``duplicate_join``: a second join is dropped.
- ``join_moved``: tasks after the join are kept and the join moved to the end.
- ``missing_join``: a plan without a join gets one.

A plan that is only a join (``1. join()``) is valid: the planner decided no tool is needed and the joiner
answers directly, as in LLMCompiler. A task written on the same line as the end marker is part of the plan.

Anything else (an unparseable argument list, a duplicate task number, a reference to a later task, an unknown
tool without a single close match) raises `PlanError` naming the node and field.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import logging
import re
from collections.abc import Sequence
from typing import Any

from ..engine.types import ChatMessage, GenerationRequest
from ..errors import PlanError
from .base import NodeCallback, Planner, ReplanContext, describe_tools
from .plan import Plan, PlanNode, Repair, ToolsLike, check_node

__all__ = ["END_OF_PLAN", "LLMCompilerPlanner", "PlanParser", "parse_call", "parse_plan"]

logger = logging.getLogger(__name__)

END_OF_PLAN = "<END_OF_PLAN>"

_TASK = re.compile(r"^\s*(?:[-*]\s*)?(?:(?:step|task)\s*)?(\d+)\s*[.):]\s*(.*)$", re.IGNORECASE)
_CALL = re.compile(r"^([A-Za-z_][\w]*)\s*\((.*)$", re.DOTALL)
_MAX_TASK_DIGITS = 9  # int() refuses much longer numbers outright; no plan has that many tasks
_BRACED = re.compile(r"\$\{(\d+)\}")
_BARE_REF = re.compile(r"\$(?:\{\d+\}|\d+)(?:\.[A-Za-z0-9_]+)*")


def _quote_bare_references(args: str) -> str:
    """Wrap references written outside string literals in quotes, so the argument list parses as Python."""
    out: list[str] = []
    i, quote = 0, ""
    while i < len(args):
        ch = args[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(args):
                out.append(args[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = ""
            i += 1
            continue
        if ch in "\"'":
            quote = ch
            out.append(ch)
            i += 1
            continue
        if ch == "$":
            m = _BARE_REF.match(args, i)
            if m:
                out.append(repr(m.group(0)))
                i = m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_call(text: str, *, node: int | None = None) -> tuple[str, list[Any], dict[str, Any], bool]:
    """Parse ``name(arg, key=value)`` with literal (Python/JSON-like) arguments and bare ``$N`` references.

    Returns:
        (name, args, kwargs, closed) where ``closed`` is False when a missing ``)`` had to be added.

    Raises:
        PlanError: not a call, or arguments that are not literals.
    """
    where = None if node is None else str(node)
    text = text.strip().rstrip(";").rstrip()
    m = _CALL.match(text)
    if m is None:
        raise PlanError(f"expected a call like tool(args), got {text!r}", node=where, field="tool")
    name, rest = m.group(1), m.group(2)
    closed = True
    source = f"f({_quote_bare_references(rest)}"
    if not rest.rstrip().endswith(")"):
        closed = False
        source += ")"
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        if closed:
            raise PlanError(f"cannot parse the arguments of {text!r}", node=where, field="args") from None
        raise PlanError(f"cannot parse the arguments of {text!r} (unclosed call)", node=where, field="args") from None
    call = tree.body
    if not isinstance(call, ast.Call) or call.func is None:
        raise PlanError(f"expected a call, got {text!r}", node=where, field="args")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    try:
        for a in call.args:
            args.append(_literal(a))
        for k in call.keywords:
            if k.arg is None:
                raise PlanError("**kwargs are not allowed in a plan", node=where, field="args")
            kwargs[k.arg] = _literal(k.value)
    except (ValueError, TypeError, SyntaxError) as err:
        raise PlanError(
            f"arguments must be literals or $N references in {text!r}: {err}", node=where, field="args"
        ) from err
    return name, args, kwargs, closed


_CONSTANTS = {"true": True, "false": False, "null": None, "none": None}


def _literal(tree: ast.expr) -> Any:
    if isinstance(tree, ast.Name) and tree.id.lower() in _CONSTANTS:  # JSON-style true/false/null
        return _CONSTANTS[tree.id.lower()]
    return ast.literal_eval(tree)


class PlanParser:
    """Turns streamed planner text into plan nodes, one line at a time.

    Args:
        tools: when given, tool names are checked (and repaired when one close match exists).
        thought_tool: the pseudo-tool name of reasoning-thread nodes.
    """

    def __init__(self, tools: ToolsLike | None = None, *, thought_tool: str = "think") -> None:
        self.tools = tools
        self.thought_tool = thought_tool
        self.nodes: list[PlanNode] = []
        self.repairs: list[Repair] = []
        self.text = ""
        self._buffer = ""
        self._join: PlanNode | None = None
        self._ended = False
        self._trailing_noted = False
        self._in_fence = False

    def feed(self, text: str) -> list[PlanNode]:
        """Add streamed text; returns the work nodes (tool/thought) whose lines just completed."""
        self.text += text
        self._buffer += text
        out: list[PlanNode] = []
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            node = self._line(line)
            if node is not None:
                out.append(node)
        return out

    def finish(self) -> list[PlanNode]:
        """End of the stream: parse the last line, apply end-of-plan repairs; returns nodes completed now."""
        out: list[PlanNode] = []
        if self._buffer.strip():
            node = self._line(self._buffer)
            if node is not None:
                out.append(node)
        self._buffer = ""
        if not self.nodes and self._join is None:
            raise PlanError("the planner output holds no task lines (expected `1. tool(args)` lines)")
        if self._join is None:
            next_id = max((n.id for n in self.nodes), default=0) + 1
            self._join = PlanNode(next_id, kind="join")
            self._repair("missing_join", f"added join() as node {next_id}", node=next_id)
        elif self.nodes and self._join.id < self.nodes[-1].id:
            old = self._join.id
            self._join = PlanNode(self.nodes[-1].id + 1, kind="join", question=self._join.question)
            self._repair(
                "join_moved",
                f"tasks followed the join; join {old} moved to the end as node {self._join.id}",
                node=self._join.id,
            )
        return out

    def plan(self) -> Plan:
        """The plan so far (call after `finish`): the work nodes, then the join."""
        nodes = list(self.nodes)
        if self._join is not None:
            nodes.append(self._join)
        return Plan(nodes=nodes, repairs=list(self.repairs), source=self.text)

    # -- internals ----------------------------------------------------------------------------------------------
    def _repair(self, kind: str, detail: str, *, node: int | None = None, line: str | None = None) -> None:
        repair = Repair(kind, detail, node=node, line=line)
        self.repairs.append(repair)
        logger.debug("plan repair: %s", repair)

    def _line(self, raw: str) -> PlanNode | None:
        line = raw.strip()
        if not line:
            return None
        if line.startswith("```"):
            self._in_fence = not self._in_fence
            self._repair("code_fence", "ignored a markdown code fence", line=line)
            return None
        if self._ended:
            if not self._trailing_noted:
                self._trailing_noted = True
                self._repair("trailing_prose", "ignored text after the end of the plan", line=line)
            return None
        if END_OF_PLAN in line:
            before, after = line.split(END_OF_PLAN, 1)
            # The task before the marker is still part of the plan: parse it before the plan counts as ended.
            node = self._line(before) if before.strip() else None
            self._ended = True
            if after.strip():
                self._line(after)  # records the trailing prose once
            return node
        if line.lower().startswith("thought:"):
            return None
        m = _TASK.match(line)
        if m is not None:
            digits = m.group(1)
            if len(digits.lstrip("0")) > _MAX_TASK_DIGITS:
                raise PlanError(f"task number {digits[:12]}... has {len(digits)} digits", field="id")
            number: int | None = int(digits)
            body = m.group(2)
        elif _CALL.match(line) and not line.lower().startswith(("the ", "i ", "we ")):
            number, body = None, line
        else:
            self._note_prose(line)
            return None
        if not _CALL.match(body.strip()):
            self._note_prose(line)
            return None
        if _BRACED.search(body):
            body = _BRACED.sub(r"$\1", body)
            self._repair("ref_braces", "rewrote ${N} references as $N", node=number, line=line)
        last = max([n.id for n in self.nodes] + ([self._join.id] if self._join is not None else []), default=0)
        if number is None:
            number = last + 1
            self._repair("numbered", f"gave an unnumbered task the number {number}", node=number, line=line)
        elif number > last + 1:
            # Kept as written (references use these numbers), but a skipped number often means a lost task.
            skipped = f"{last + 1}" if number == last + 2 else f"{last + 1}-{number - 1}"
            self._repair(
                "numbering_gap", f"task {number} follows task {last}; {skipped} missing", node=number, line=line
            )
        name, args, kwargs, closed = parse_call(body, node=number)
        if not closed:
            self._repair("unclosed_call", "added the missing ')'", node=number, line=line)
        if name == "join":
            self._add_join(number, args, kwargs, line)
            return None
        if any(n.id == number for n in self.nodes) or (self._join is not None and self._join.id == number):
            raise PlanError(f"task number {number} is used twice", node=str(number), field="id")
        if name == self.thought_tool:
            question = args[0] if args else kwargs.get("question")
            if not isinstance(question, str) or len(args) + len(kwargs) != 1:
                raise PlanError(f"{self.thought_tool}() takes one question string", node=str(number), field="question")
            node = PlanNode(number, kind="thought", question=question)
        else:
            name = self._tool_name(name, number, line)
            node = PlanNode(number, tool=name, args=args, kwargs=kwargs)
        self.nodes.append(node)
        return node

    def _add_join(self, number: int, args: list[Any], kwargs: dict[str, Any], line: str) -> None:
        if self._join is not None:
            self._repair("duplicate_join", f"dropped a second join (node {number})", node=number, line=line)
            return
        values = args + list(kwargs.values())
        answer = values[0] if values else None
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)
        self._join = PlanNode(number, kind="join", question=answer or None)

    def _tool_name(self, name: str, number: int, line: str) -> str:
        if self.tools is None or name in self.tools:
            return name
        known = [*self.tools.names(), self.thought_tool]
        close = difflib.get_close_matches(name, known, n=2, cutoff=0.75)
        if len(close) == 1 and close[0] != self.thought_tool:
            self._repair("tool_name", f"unknown tool {name!r} replaced by {close[0]!r}", node=number, line=line)
            return close[0]
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise PlanError(f"unknown tool {name!r}.{hint} Known: {', '.join(known)}", node=str(number), field="tool")

    def _note_prose(self, line: str) -> None:
        if self._join is not None:
            self._ended = True
            self._trailing_noted = True
            self._repair("trailing_prose", "ignored text after the join", line=line)
        else:
            self._repair("ignored_line", "ignored a line that is not a task", line=line)


def parse_plan(text: str, tools: ToolsLike | None = None, *, validate: bool = True) -> Plan:
    """Parse a complete plan text (see `PlanParser`); validated against ``tools`` unless ``validate`` is False.

    Raises:
        PlanError: unparseable or invalid.
    """
    parser = PlanParser(tools)
    parser.feed(text)
    parser.finish()
    plan = parser.plan()
    return plan.validate(tools) if validate else plan


_SYSTEM = """You are a planner. Write a numbered plan of tool calls that answers the question.
Tools:
{tools}
- join(): always the last task; it ends the plan.

Rules: one task per line, written `N. tool(arguments)`. Use $N for the output of task N. Tasks that do not
depend on each other run in parallel. End with `N. join()` and then {end}.

Example:
Question: Who is older, Ann Lee or Bo Ray?
1. retrieve("Ann Lee birth year")
2. retrieve("Bo Ray birth year")
3. think("Who is older? Ann Lee: $1. Bo Ray: $2.")
4. join()
{end}"""


class LLMCompilerPlanner(Planner):
    """Plans by streaming a numbered plan from the model; each task is dispatched the moment its line ends.

    Args:
        max_tokens: cap on the plan's tokens.
        temperature: sampling temperature (0: greedy).
        system: the system prompt template (``{tools}`` and ``{end}`` are filled in).
        thought_tool: the pseudo-tool name of reasoning-thread nodes.
    """

    kind = "llmcompiler"

    def __init__(
        self, *, max_tokens: int = 384, temperature: float = 0.0, system: str = _SYSTEM, thought_tool: str = "think"
    ) -> None:
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system = system
        self.thought_tool = thought_tool

    def messages(self, query: str, tools: ToolsLike, context: ReplanContext | None) -> tuple[ChatMessage, ...]:
        system = self.system.replace("{tools}", describe_tools(tools)).replace("{end}", END_OF_PLAN)
        user = f"Question: {query}"
        if context is not None and context.plans:
            user = f"{context.render()}\n\nWrite a new plan.\n{user}"
        return (ChatMessage("system", system), ChatMessage("user", user))

    async def plan(
        self,
        query: str,
        *,
        engine: Any,
        tools: ToolsLike,
        context: ReplanContext | None = None,
        on_node: NodeCallback | None = None,
    ) -> Plan:
        request = GenerationRequest(
            messages=self.messages(query, tools, context),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            stop=(END_OF_PLAN,),
        )
        parser = PlanParser(tools, thought_tool=self.thought_tool)
        seen: set[int] = set()

        def emit(nodes: Sequence[PlanNode]) -> None:
            for node in nodes:
                check_node(node, seen, tools)
                seen.add(node.id)
                if on_node is not None:
                    on_node(node, [r for r in parser.repairs if r.node == node.id])

        async with contextlib.aclosing(engine.stream(request)) as deltas:
            async for delta in deltas:
                if delta.index == 0 and delta.text:
                    emit(parser.feed(delta.text))
        emit(parser.finish())
        plan = parser.plan().validate(tools)
        if on_node is not None:
            join = plan.join
            on_node(join, [r for r in parser.repairs if r.node == join.id])
        return plan
