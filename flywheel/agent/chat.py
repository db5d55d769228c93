"""`flywheel chat`: a terminal conversation with the manager, and the terminal view `flywheel run` shares.

The chat is one agent run (trigger "chat"); each line the person types is a new request in it, so the
conversation and the cycle's facts carry over between turns, and the whole chat can be listed and
resumed like any run. Each step is printed as it happens (what the agent says, the tools it calls and
what they return, progress of long steps). Before the first costly step of a request (labels, a
dataset, training) the manager says its plan and waits for a yes (flywheel.agent.plan). When the graph
reaches an approval, the person is asked inline: approve, reject (with a reason) or leave it pending for
`flywheel approve` or Slack.
"""

from __future__ import annotations

import getpass
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from flywheel.agent import runs
from flywheel.agent.plan import ProposedPlan
from flywheel.agent.policies import Policy, choose_policy
from flywheel.agent.runner import AgentEvent, RunOutcome, new_run_id, send_message, start_run
from flywheel.context import Context
from flywheel.errors import PolicyViolation
from flywheel.release import approvals
from flywheel.release.decisions import PendingApproval
from flywheel.release.records import Decision
from flywheel.settings import Settings

Read = Callable[[str], str]
QUIT = {"exit", "quit", "bye", ":q"}


class TerminalView:
    """Prints agent events; asks for approvals inline when it may (`read` is given)."""

    def __init__(self, console: Console, settings: Settings, read: Read | None = None, approver: str | None = None, verbose: bool = True):
        self.console = console
        self.settings = settings
        self.read = read
        self.approver = approver or getpass.getuser()
        self.verbose = verbose

    def on_event(self, event: AgentEvent) -> None:
        out = self.console
        if event.kind == "say":
            out.print(f"[bold cyan]flywheel[/] {escape(event.text)}")
        elif event.kind == "call" and self.verbose:
            out.print(f"  [dim]->[/] {escape(event.text)}")
        elif event.kind == "result" and self.verbose:
            style = "red" if event.data.get("error") else "dim"
            out.print(f"  [{style}]<- {escape(event.text[:200])}[/]")
        elif event.kind == "progress":
            out.print(f"  [dim]… {escape(event.text)}[/]")
        elif event.kind == "outcome":
            out.print(f"[bold green]{escape(event.text)}[/]")
        elif event.kind == "stopped":
            out.print(f"[yellow]stopped: {escape(event.text)}[/]")

    def show_pending(self, pending: PendingApproval) -> None:
        out = self.console
        out.print(f"\n[bold]Approval needed:[/] {escape(pending.summary)}")
        if pending.refused:
            out.print(f"[red]the last answer was not accepted: {escape(pending.refused)}[/]")
        for name in sorted(set(pending.problem_rates_before) | set(pending.problem_rates_after)):
            before, after = pending.problem_rates_before.get(name, 0.0), pending.problem_rates_after.get(name, 0.0)
            out.print(f"  {escape(name)}: {before:.1%} -> {after:.1%}")
        for reason in pending.gate_reasons[:4]:
            out.print(f"  [dim]{escape(reason)}[/]")
        if pending.canary is not None:
            out.print(f"  {escape(pending.canary.sentence())}", highlight=False)
        out.print(f"  report: {escape(pending.report_html or pending.report_json)} (hash {pending.report_hash[:12]})")

    def confirm(self, plan: ProposedPlan) -> str | None:
        """The plan, said as the manager, and the person's answer (None when nobody can answer)."""
        self.console.print(f"[bold cyan]flywheel[/] {escape(plan.text)}")
        if self.read is None:
            return None
        try:
            return self.read("yes/no> ")
        except EOFError:
            return None

    def ask(self, pending: PendingApproval) -> Decision | None:
        """The inline prompt: approve, reject with a reason, or leave it pending."""
        self.show_pending(pending)
        if self.read is None:
            return None
        while True:
            promote_only = " / [p]romote, baselines stay" if pending.baselines else ""
            answer = self.read(f"Approve {pending.version}? [a]pprove / [r]eject{promote_only} / [l]ater: ").strip().lower()
            if answer in ("l", "later", ""):
                self.console.print(f"left pending; answer with: {pending.answer_hint()}")
                return None
            if answer in ("a", "approve", "y", "yes"):
                decision = Decision("approved", self.approver, "approved at the terminal", "terminal", pending.report_hash)
            elif answer in ("p", "promote") and pending.baselines:
                decision = Decision(
                    "approved", self.approver, "approved at the terminal, baselines stay", "terminal", pending.report_hash, False
                )
            elif answer in ("r", "reject", "n", "no"):
                reason = self.read("Reason: ").strip()
                if not reason:
                    self.console.print("a rejection needs a reason")
                    continue
                decision = Decision("rejected", self.approver, reason, "terminal", pending.report_hash)
            else:
                continue
            try:
                approvals.check_approver(self.settings, decision.approver, decision.channel)
            except PolicyViolation as exc:
                self.console.print(f"[red]{escape(str(exc))}[/]; left pending")
                return None
            return decision


class ChatSession:
    """One conversation = one run. `send(text)` is one turn; `loop()` reads turns until exit/EOF."""

    def __init__(self, ctx: Context, view: TerminalView, policy: str | Policy | None = None, run_id: str | None = None):
        self.ctx = ctx
        self.view = view
        self.policy = policy if policy is not None and not isinstance(policy, str) else choose_policy(ctx.settings, policy)
        self.run_id = run_id
        self.last: RunOutcome | None = None

    def send(self, text: str) -> RunOutcome:
        if self.run_id is None:
            self.run_id = new_run_id()
            self.last = start_run(
                self.ctx,
                "chat",
                self.policy,
                message=text,
                ask=self.view.ask,
                on_event=self.view.on_event,
                run_id=self.run_id,
                confirm=self.view.confirm,
            )
        else:
            self.last = send_message(
                self.ctx, self.run_id, text, self.policy, ask=self.view.ask, on_event=self.view.on_event, confirm=self.view.confirm
            )
        if self.last.state == runs.FAILED:
            self.view.console.print(f"[red]{escape(self.last.error or 'failed')}[/]")
        return self.last

    def loop(self, read: Read) -> int:
        out = self.view.console
        out.print(f"flywheel chat ({self.policy.name} policy). Ask about failures, or ask for a fix; 'exit' ends.")
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            if line.lower() in QUIT:
                break
            outcome = self.send(line)
            if outcome.state == runs.WAITING:
                out.print(f"The run waits for a decision: {outcome.pending.answer_hint() if outcome.pending else ''}")
                break
        if self.run_id:
            out.print(f"chat saved as run {self.run_id}")
        return 0
