"""The agent's tools, collected in one registry.

A tool is a plain typed function taking the injected `Context` first (see flywheel.tools.base, which
holds `ToolSpec`, `ToolContext` and `report_progress` for the tool modules; this module imports the tool
modules, never the other way round).

The registry holds exactly the tools listed in `TOOL_SPECS` (plus any a caller adds on purpose): a name
the model invents is refused by the agent's tool node, never looked up anywhere else. There is no tool
that promotes a model or changes a setting; promotion is code after a human decision
(flywheel.release.decisions).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from langchain_core.tools import BaseTool
from pydantic import BaseModel

from flywheel.context import Context
from flywheel.errors import ToolInputError
from flywheel.tools.base import ToolSpec

MAX_RESULT_CHARS = 8000  # what one tool result may put into the model's context


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
    # Imported here, not at the top: the tool modules pull in the store, trainer and release code, which
    # importing the registry's types (agent.graph) should not pay for.
    from flywheel.tools import canary, corrections, datasets, evals, failures, jobs, labels, retrieval, synthesis

    specs = [
        *failures.SPECS,
        *labels.SPECS,
        *corrections.SPECS,
        *retrieval.SPECS,
        *synthesis.SPECS,
        *datasets.SPECS,
        *jobs.SPECS,
        *evals.SPECS,
        *canary.SPECS,
    ]
    return ToolRegistry(ctx, [*specs, *extra])
