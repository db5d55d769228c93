"""What a tool module needs to define a tool: `ToolContext`, `ToolSpec` and `report_progress`.

A tool is a plain typed function whose first parameter is the `Context` (annotated `ToolContext`, so it
is injected and never part of the schema the model sees) and whose docstring (Google style, with an
`Args:` section) becomes its description. The schema the model gets, the validation of the arguments it
sends and the call all come from that one signature:

    def show_failure(ctx: ToolContext, failure_id: str) -> FailureDetail:
        \"\"\"One failure with its conversation, verdict and correction.

        Args:
            failure_id: the failure's id, from list_failures.
        \"\"\"

Tools report progress of long steps with `report_progress(ctx, ...)`; the agent's tool node points that
at LangGraph's stream writer, the CLI prints it.

The tool modules import this module; `flywheel.tools.registry` imports the tool modules and collects
their `SPECS`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from langchain_core.tools import BaseTool, InjectedToolArg, StructuredTool

from flywheel.context import Context

if TYPE_CHECKING:
    ToolContext = Annotated[Context, InjectedToolArg()]
else:
    # At run time the annotation says Any: the handle is injected, and pydantic (which builds each tool's
    # full argument model) has no business describing a Context.
    ToolContext = Annotated[Any, InjectedToolArg()]


def report_progress(ctx: Context, message: str, **data: Any) -> None:
    """Tell whoever watches (the chat, `flywheel run`, the daemon) how a long step is going."""
    if ctx.progress is not None:
        ctx.progress({"message": message, **data})


@dataclass(frozen=True)
class ToolSpec:
    """One tool: the function, and what the agent needs to know about its effects.

    `mutates`: the call changes the store or starts something; the agent records its result under the
    tool call's id (table `effects`) so that a node re-run after a crash does not call it again.
    `facts`: reads the facts the graph routes on (dataset, job, candidate, gate) out of a result."""

    fn: Callable[..., Any]
    mutates: bool = False
    facts: Callable[[Any], dict[str, Any]] | None = None
    tool: BaseTool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Tools with arguments must document each one (an undocumented argument is a worse schema);
        # a tool whose only parameter is the injected Context has no Args section to parse.
        has_args = len(inspect.signature(self.fn).parameters) > 1
        built = StructuredTool.from_function(self.fn, parse_docstring=has_args, error_on_invalid_docstring=has_args)
        object.__setattr__(self, "tool", built)

    @property
    def name(self) -> str:
        return self.fn.__name__
