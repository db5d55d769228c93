"""The web console: approvals, the labelling queue, failures and versions, in a browser.

`flywheel console` serves `build_app(ctx)` (flywheel.console.app) with uvicorn, on loopback by default.
Pages are rendered on the server with Jinja2 (autoescape on) and plain forms; the only script is the
static file behind the labelling queue's keyboard shortcuts. Every write goes through the same functions
the terminal and Slack use (flywheel.release.approvals, flywheel.agent.runner.decide,
flywheel.data.labels.add_label), with channel "web". docs/console.md has the security model.
"""
