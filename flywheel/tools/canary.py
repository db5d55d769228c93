"""Tools: start a canary for a gate-passed candidate and read its observations (flywheel.release.canary).

A canary serves real users, so `start_canary` refuses a version that has not passed its gate (the check
is in flywheel.release.canary, not here). Reading the status records an observation and, when the
canary harms, rolls it back: that is the canary monitor's rule (`canary.rule`: the sequential test by
default), applied the same way as `flywheel canary status`. The status carries the decision (harm,
no_harm, inconclusive, continue) and its evidence: requests per version, each rate's log likelihood
ratios and the thresholds they are held to.
Neither tool promotes: promotion needs a person's approval (flywheel.release.decisions).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from flywheel.records import Record
from flywheel.release import canary, registry
from flywheel.tools.base import ToolContext, ToolSpec, report_progress


class CanaryStarted(Record):
    version: str
    share: float
    already_running: bool


def start_canary(ctx: ToolContext, version: str, share: Annotated[float, Field(gt=0, lt=0.5)] | None = None) -> CanaryStarted:
    """Serve a gate-passed candidate to a share of users, to watch its problem rates on real traffic before a person decides.

    Args:
        version: the candidate version id.
        share: the share of users it serves, below 0.5 (default: the canary.share setting).
    """
    switch = canary.start_canary(ctx.store, registry.resolve(ctx.store, version).id, share, actor="agent")
    return CanaryStarted(
        version=switch.to_version or version, share=registry.current_routing(ctx.store).share, already_running=switch.replayed
    )


def canary_status(ctx: ToolContext) -> canary.CanaryStatus:
    """Compare the running canary with the champion now: requests, failure and problem rates on each side, and the sequential test's decision (harm, no_harm, inconclusive, or continue: observe again after more traffic) with its evidence. A canary that harms is rolled back automatically."""
    routing = registry.current_routing(ctx.store)
    if ctx.canary_traffic is not None and routing.canary and ctx.canary_served != routing.canary:
        # In a deployment the gateway serves the canary's users as they come; a simulated world (the demo)
        # serves them here, once per canary, before the observation.
        ctx.canary_traffic(routing.canary, routing.share, lambda line: report_progress(ctx, line))
        ctx.canary_served = routing.canary
    return canary.observe_canary(ctx.store, ctx.settings, actor="agent")


SPECS = [
    ToolSpec(start_canary, mutates=True, facts=lambda started: {"canary": started.version}),
    ToolSpec(
        canary_status,
        mutates=True,
        facts=lambda status: {"canary_state": str(status.state), "canary_decision": status.decision, "canary_reason": status.reason},
    ),
]
