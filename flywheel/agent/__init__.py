"""The manager agent: a LangGraph supervisor that runs the improvement loop.

Entry points for every way in (CLI, chat, daemon, Slack) are in flywheel.agent.runner: `start_run`,
`resume_run`, `decide`, `pending_approvals`, `run_in_progress`. The graph is flywheel.agent.graph,
its policies flywheel.agent.policies, the tools flywheel.tools. The approval and promotion rules the
graph applies are release code: flywheel.release.decisions.
"""
