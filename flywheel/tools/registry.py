"""The agent's tools, collected in one registry.

A tool is a plain typed function whose first parameter is the `Context` (annotated `ToolContext`, so it
is injected and never part of the schema the model sees) and whose docstring (Google style, with an
`Args:` section) becomes its description. The schema the model gets, the validation of the arguments it
sends and the call all come from that one signature:

    def show_failure(ctx: ToolContext, failure_id: str) -> FailureDetail:
        \"\"\"One failure with its conversation, verdict and correction.

        Args:
            failure_id: the failure's id, from list_failures.
        \"\"\"

The registry holds exactly the tools listed in `TOOL_SPECS` (plus any a caller adds on purpose): a name
the model invents is refused by the agent's tool node, never looked up anywhere else. There is no tool
that promotes a model or changes a setting; promotion is code after a human decision
(flywheel.agent.approval).

Tools report progress of long steps with `report_progress(ctx, ...)`; the agent's tool node points that
at LangGraph's stream writer, the CLI prints it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from langchain_core.tools import BaseTool, InjectedToolArg, StructuredTool
from pydantic import BaseModel

from flywheel.context import Context
from flywheel.errors import ToolInputError

if TYPE_CHECKING:
    ToolContext = Annotated[Context, InjectedToolArg()]
else:
    # At run time the annotation says Any: the handle is injected, and pydantic (which builds each tool's
    # full argument model) has no business describing a Context.
    ToolContext = Annotated[Any, InjectedToolArg()]
PROGRESS_KEY = "agent_progress"  # ctx.extras key of the progress sink: a callable taking one dict
MAX_RESULT_CHARS = 8000  # what one tool result may put into the model's context


def report_progress(ctx: Context, message: str, **data: Any) -> None:
    """Tell whoever watches (the chat, `flywheel run`, the daemon) how a long step is going."""
    sink = ctx.extras.get(PROGRESS_KEY)
    if sink is not None:
        sink({"message": message, **data})


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


class ToolRegistry:
    """The tools one agent run may call, bound to the run's Context."""

    def __init__(self, ctx: Context, specs: Iterable[ToolSpec]):
        self.ctx = ctx
        self._specs: dict[str, ToolSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"two tools named {spec.name!r}")
            self._specs[spec.name] = spec

    @property
    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def spec(self, name: str) -> ToolSpec:
        if name not in self._specs:
            raise ToolInputError(f"no tool named {name!r}; the tools are: {', '.join(self._specs)}")
        return self._specs[name]

    def langchain_tools(self) -> list[BaseTool]:
        """For `chat_model.bind_tools(...)`: the schemas leave out the injected Context."""
        return [spec.tool for spec in self._specs.values()]

    def call(self, name: str, args: dict[str, Any] | None) -> Any:
        """Validate `args` against the tool's schema and call it with the Context.

        Raises ToolInputError for an unknown tool or argument, pydantic's ValidationError for a wrong
        value; whatever the tool itself raises passes through."""
        spec = self.spec(name)
        schema = spec.tool.tool_call_schema
        args = dict(args or {})
        if not isinstance(schema, type) or not issubclass(schema, BaseModel):  # every tool here has a model schema
            raise TypeError(f"tool {name} has no pydantic argument schema")
        unknown = sorted(set(args) - set(schema.model_fields))
        if unknown:
            raise ToolInputError(f"{name} has no argument {unknown[0]!r}; its arguments are: {', '.join(schema.model_fields) or 'none'}")
        values = schema.model_validate(args)
        return spec.fn(self.ctx, **{k: getattr(values, k) for k in schema.model_fields})


def to_jsonable(result: Any) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, (list, tuple)):
        return [to_jsonable(item) for item in result]
    if isinstance(result, dict):
        return {str(k): to_jsonable(v) for k, v in result.items()}
    return result


def render_result(result: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """A tool result as the text the model reads: compact JSON, clipped."""
    text = result if isinstance(result, str) else json.dumps(to_jsonable(result), ensure_ascii=False, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[:limit] + f" …[clipped: {len(text) - limit} more characters]"


def build_tools(ctx: Context, extra: Sequence[ToolSpec] = ()) -> ToolRegistry:
    """Every flywheel tool, bound to `ctx`. `extra` adds tools (tests; a deployment's own read-only ones)."""
    from flywheel.tools import canary, corrections, datasets, evals, failures, jobs, labels, retrieval

    specs = [*failures.SPECS, *labels.SPECS, *corrections.SPECS, *retrieval.SPECS, *datasets.SPECS, *jobs.SPECS, *evals.SPECS, *canary.SPECS]
    return ToolRegistry(ctx, [*specs, *extra])
