"""The daemon: scheduled autonomous cycles (APScheduler 3) and the Slack app, in one long-running process.

- Jobs live in APScheduler's SQLAlchemyJobStore on the flywheel store itself (table
  `flywheel_scheduler_jobs`, created by APScheduler beside ours), one per `daemon.schedules` entry, with
  the stable id `schedule:<id>`. A restart re-adds them with replace_existing, so nothing is duplicated;
  a job whose schedule is unchanged is left as stored, so a firing missed while the daemon was down
  still runs once (coalesce, within daemon.misfire_grace_s); a schedule removed from the settings has
  its job removed.
- A cycle never runs twice at once: max_instances=1 per job, a process-wide lock across jobs, and
  `run_in_progress` across processes (a `flywheel run` in a terminal counts).
- A job calls `start_run(ctx, "schedule")` with the heuristic policy when no LLM endpoint is
  configured. A run that reaches an approval is posted to Slack at once; a sync job also posts every
  pending approval (whichever way in started the run) and closes requests answered elsewhere.
- Slack unreachable or refusing never stops the daemon: one log line, a retry later (`_connect_slack`);
  missing tokens or channel stop it at start, as they are the user's to fix.
- Online rounds (daemon.round_min_verified > 0, flywheel.agent.rounds): a volatile interval job counts
  the verified samples that arrived since the last round every daemon.round_poll_s. Once there are
  enough, a round (trigger `round`, the same supervisor run a cron firing starts) runs in a thread of its
  own, so the poll, the cron jobs and the Slack sync go on meanwhile. A round shares the cron jobs' lock
  and `run_in_progress`: while any autonomous run is driven (here or in another process) a due round
  waits, and it starts at the first poll after that run ends. It also waits while a candidate waits for
  a person's decision, as a cycle then refuses to train and would spend the samples on nothing.
- SIGTERM/SIGINT stop it: no new firings, the Slack endpoint closes, and a running cycle gets
  daemon.shutdown_grace_s to finish; after that it is left to its checkpoint, resumable with
  `flywheel resume RUN`.

APScheduler stores a job as a reference to a module-level function plus pickled arguments, so a job
cannot carry the live Context. The daemon registers itself in `_targets` under a key derived from the
store URL while it runs, and the stored job carries only that key and the schedule id.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from flywheel.context import Context
from flywheel.errors import FlywheelError, InfrastructureError, SettingsError, UserInputError
from flywheel.records import stable_hash
from flywheel.settings import Settings
from flywheel.settings_sections import Schedule

log = logging.getLogger("flywheel.daemon")

JOB_TABLE = "flywheel_scheduler_jobs"
JOB_PREFIX = "schedule:"
SYNC_JOB = "slack-sync"
SLACK_CONNECT_JOB = "slack-connect"
ROUND_POLL_JOB = "round-poll"
SLACK_RETRY_MAX_S = 300.0  # a failed Slack connection is retried after slack.sync_interval_s, doubling up to this
FIRE_REF = "flywheel.agent.schedule:fire"
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")

_targets: dict[str, Callable[[str], Any]] = {}
_targets_lock = threading.Lock()


# --- schedules ---------------------------------------------------------------------------------------------------


def _crontab_weekdays(field: str) -> str:
    """Crontab weekday numbers (0 or 7 = Sunday) as names: APScheduler 3 counts 0 as Monday."""
    names: list[str] = []
    for item in field.split(","):
        if not any(ch.isdigit() for ch in item):
            names.append(item)  # *, mon-fri, sun: the same in both
            continue
        span, _, step = item.partition("/")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            low_s, high_s = span.split("-", 1)
            low, high = int(low_s), int(high_s)
        else:
            low = int(span)
            high = 6 if step else low
        if not (0 <= low <= 7 and 0 <= high <= 7 and low <= high):
            raise ValueError(f"day of week {item!r} is out of range (0-7, 0 and 7 are Sunday)")
        names.extend(DAYS[n % 7] for n in range(low, high + 1, int(step or 1)))
    return ",".join(dict.fromkeys(names))


def cron_trigger(expr: str, timezone: str) -> Any:
    """A CronTrigger from a crontab expression: five fields (minute hour day month weekday), or six with
    a leading second. Weekday numbers follow crontab (0 and 7 are Sunday)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"expected 5 fields (minute hour day month weekday) or 6 (second first), got {len(fields)}")
    second = fields.pop(0) if len(fields) == 6 else "0"
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=_crontab_weekdays(weekday), timezone=timezone
    )


def check_schedules(settings: Settings) -> list[tuple[Schedule, Any]]:
    """Each configured schedule with its trigger; SettingsError names the first wrong entry."""
    seen: set[str] = set()
    checked = []
    for index, item in enumerate(settings.daemon.schedules):
        where = f"daemon.schedules[{index}]"
        if not item.id.strip() or any(ch.isspace() for ch in item.id):
            raise SettingsError(f"{where}.id", f"expected a short name without spaces, got {item.id!r}")
        if item.id in seen:
            raise SettingsError(f"{where}.id", f"{item.id!r} is used twice; schedule ids must be unique")
        seen.add(item.id)
        try:
            checked.append((item, cron_trigger(item.cron, settings.daemon.timezone)))
        except (ValueError, LookupError) as exc:  # an unknown time zone is a LookupError
            raise SettingsError(f"{where}.cron", f"{exc} (got {item.cron!r})") from None
    return checked


def build_scheduler(ctx: Context, table: str = JOB_TABLE) -> Any:
    """A BackgroundScheduler whose jobs persist in `table` of the flywheel store (not started)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    settings = ctx.settings
    try:
        return BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=ctx.store.engine, tablename=table), "volatile": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": settings.daemon.misfire_grace_s},
            timezone=settings.daemon.timezone,
        )
    except LookupError as exc:
        raise SettingsError("daemon.timezone", f"unknown time zone {settings.daemon.timezone!r}") from exc


def stop_scheduler(scheduler: Any) -> None:
    """Shut the scheduler down without consuming due jobs. APScheduler 3 runs one last round of due jobs
    after its executors have shut down, fails to submit them and still advances their next run time: a
    firing due at that moment would be lost. Detaching the persistent store first leaves it due in the
    table, so the next start runs it (within daemon.misfire_grace_s). The store's engine is the flywheel
    store's, so it is not disposed here."""
    if not scheduler.running:
        return
    try:
        scheduler.remove_jobstore("default", shutdown=False)
    except KeyError:
        pass
    scheduler.shutdown(wait=False)


def target_key(settings: Settings) -> str:
    return "store-" + stable_hash(settings.store_url)


def sync_jobs(scheduler: Any, settings: Settings) -> list[str]:
    """Make the stored jobs match `daemon.schedules` (the scheduler must be started, possibly paused).
    Unchanged jobs stay as stored; changed ones are replaced under the same id; removed ones go."""
    key = target_key(settings)
    wanted: dict[str, Any] = {}
    for item, trigger in check_schedules(settings):
        job_id = JOB_PREFIX + item.id
        wanted[job_id] = trigger
        current = scheduler.get_job(job_id, jobstore="default")
        if (
            current is not None
            and repr(current.trigger) == repr(trigger)
            and list(current.args) == [key, item.id]
            and current.func_ref == FIRE_REF
            and current.misfire_grace_time == settings.daemon.misfire_grace_s
        ):
            continue
        scheduler.add_job(
            FIRE_REF, trigger, args=[key, item.id], id=job_id, name=f"flywheel cycle ({item.id})", jobstore="default", replace_existing=True
        )
    for job in scheduler.get_jobs(jobstore="default"):
        if job.id.startswith(JOB_PREFIX) and job.id not in wanted:
            log.info("schedule %s is no longer configured; its job is removed", job.id[len(JOB_PREFIX) :])
            job.remove()
    return sorted(wanted)


def fire(key: str, schedule_id: str) -> Any:
    """What a stored job calls: the live daemon of this store runs the cycle."""
    with _targets_lock:
        target = _targets.get(key)
    if target is None:
        log.warning("schedule %s fired but no daemon of this store runs in this process", schedule_id)
        return None
    return target(schedule_id)


# --- one scheduled cycle -------------------------------------------------------------------------------------------


def scheduled_policy(settings: Settings) -> str | None:
    """A scheduled run uses the configured policy, or the heuristic when no LLM endpoint is configured."""
    return None if settings.llm.enabled else "heuristic"


def run_scheduled(ctx: Context, schedule_id: str, busy: threading.Lock, on_waiting: Callable[[Any], Any] | None = None) -> Any:
    """Start one cycle unless one is running (here or in another process). Returns the RunOutcome, or
    None when skipped or failed (the reason is logged: a scheduler thread has nobody to raise to)."""
    from flywheel.agent.runner import run_in_progress, start_run

    if not busy.acquire(blocking=False):
        log.info("schedule %s: a cycle is running in this daemon; skipped", schedule_id)
        return None
    try:
        if run_in_progress(ctx):
            log.info("schedule %s: an autonomous run is in progress; skipped", schedule_id)
            return None
        try:
            outcome = start_run(ctx, "schedule", scheduled_policy(ctx.settings))
        except UserInputError as exc:  # another process started one between the check and the start
            log.info("schedule %s: skipped: %s", schedule_id, exc)
            return None
        except FlywheelError as exc:
            log.error("schedule %s: the cycle failed: %s", schedule_id, exc)
            return None
        log.info(
            "schedule %s: run %s ended %s%s", schedule_id, outcome.run_id, outcome.state, f" ({outcome.error})" if outcome.error else ""
        )
        if outcome.state == "waiting_approval" and outcome.pending is not None and on_waiting is not None:
            try:
                on_waiting(outcome.pending)
            except FlywheelError as exc:  # the sync job posts it later
                log.warning("run %s waits on %s, but posting to Slack failed: %s", outcome.run_id, outcome.pending.version, exc)
        return outcome
    finally:
        busy.release()


# --- the daemon ----------------------------------------------------------------------------------------------------


class Daemon:
    """The scheduler and (unless off) the Slack app, around one Context. `start()`, then `stop()`;
    `serve_until_signalled()` does both around SIGTERM/SIGINT."""

    def __init__(self, ctx: Context, slack_mode: str | None = None, port: int | None = None, table: str = JOB_TABLE, tokens: Any = None):
        self.ctx, self.settings = ctx, ctx.settings
        self.slack_mode = slack_mode or self.settings.slack.mode
        if self.slack_mode not in ("off", "socket", "http"):
            raise UserInputError(f"--slack must be socket, http or off, not {self.slack_mode!r}")
        self.port = self.settings.slack.http_port if port is None else port
        self.table, self._tokens = table, tokens
        check_schedules(self.settings)  # a wrong schedule is an error before anything starts
        self.scheduler: Any = None
        self.slack: Any = None  # SlackApprovals
        self.http: Any = None  # SlackHttpServer
        self.socket: Any = None  # SocketModeHandler
        self._slack_workers: Any = None
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._slack_tokens: Any = None
        self._slack_lock = threading.Lock()
        self._slack_retry_s = self.settings.slack.sync_interval_s
        self._stopping = False
        self.slack_sync_rounds = 0  # Slack sync rounds completed: a test waits on it to know later rounds ran
        self.round_polls = 0  # online-round checks completed: a test waits on it to know a check saw the store
        self.round_thread: threading.Thread | None = None  # the last round started (a test joins it)
        self._round_waiting: str | None = None  # why a due round waits, logged once per reason

    # --- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> Daemon:
        self.ctx.store  # noqa: B018 - open (and migrate) the store once, before threads share it
        if self.slack_mode != "off":
            self._prepare_slack()
        with _targets_lock:
            _targets[target_key(self.settings)] = self._fire
        self.scheduler = build_scheduler(self.ctx, self.table)
        self.scheduler.start(paused=True)
        job_ids = sync_jobs(self.scheduler, self.settings)
        if self.slack is not None:
            self._connect_slack(first=True)
        if self.settings.daemon.round_min_verified > 0:
            # Imported here, not in the first check: the tool modules take seconds to load, and a check
            # that outlasts round_poll_s makes APScheduler log a skipped execution.
            import flywheel.agent.rounds  # noqa: F401

            self._every(self._poll_rounds, self.settings.daemon.round_poll_s, ROUND_POLL_JOB)
        self.scheduler.resume()
        for job in self.scheduler.get_jobs(jobstore="default"):
            log.info("job %s: next run %s", job.id, job.next_run_time)
        log.info(
            "daemon started: %d schedule(s) %s; %s; slack %s",
            len(job_ids),
            ", ".join(job_ids) or "(none)",
            self.describe_rounds(),
            self.describe_slack(),
        )
        return self

    def describe_rounds(self) -> str:
        n = self.settings.daemon.round_min_verified
        return f"online rounds every {n} new verified samples" if n > 0 else "online rounds off"

    def describe_slack(self) -> str:
        if self.http is not None:
            return f"http on {self.http.url}"
        if self.socket is not None:
            return "socket mode"
        return f"{self.slack_mode} mode, not connected yet (retrying)" if self.slack is not None else "off"

    def _prepare_slack(self) -> None:
        """What needs no network: tokens, channel, client. A mistake here stops the daemon at start."""
        from concurrent.futures import ThreadPoolExecutor

        from flywheel.agent.slack import SlackApprovals, SlackTokens, web_client

        self._slack_tokens = (self._tokens or SlackTokens.from_env()).require(self.slack_mode)
        self.slack = SlackApprovals(self.ctx, web_client(self.settings, self._slack_tokens.bot_token))
        self._slack_workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="slack-worker")

    def _connect_slack(self, first: bool = False) -> None:
        """Check the token with Slack and open the endpoint (HTTP) or the connection (Socket Mode); then
        sync approvals on an interval. Slack unreachable or refusing the token (InfrastructureError) is
        one log line and a retry later, backing off to SLACK_RETRY_MAX_S: scheduled cycles go on
        meanwhile, and their approval requests are posted by the first sync after Slack answers. The
        HTTP port taken at start (UserInputError) stops the daemon; after start, everything is retried."""
        with self._slack_lock:
            if self._stopping:
                return
            try:
                self._open_slack()
            except FlywheelError as exc:
                if first and isinstance(exc, UserInputError):  # the HTTP port is taken: the user's to fix
                    raise
                delay = self._slack_retry_s
                self._slack_retry_s = min(delay * 2, SLACK_RETRY_MAX_S)
                log.warning("slack: %s; retrying in %g s", exc, delay)
                self.scheduler.add_job(
                    self._connect_slack,
                    "date",
                    run_date=datetime.now(self.scheduler.timezone) + timedelta(seconds=delay),
                    id=SLACK_CONNECT_JOB,
                    jobstore="volatile",
                    replace_existing=True,
                )
                return
            if not first:
                log.info("slack: connected, %s", self.describe_slack())
            self._every(self._sync_slack, self.settings.slack.sync_interval_s, SYNC_JOB)

    def _open_slack(self) -> None:
        from flywheel.agent.slack_app import build_app
        from flywheel.agent.slack_server import SlackHttpServer, socket_mode_handler

        tokens = self._slack_tokens
        app = build_app(self.slack, tokens, self.slack_mode, executor=self._slack_workers)  # auth.test
        if self.slack_mode == "http":
            self.http = SlackHttpServer(app, tokens.signing_secret, self.settings.slack.http_host, self.port).start()
            return
        handler = socket_mode_handler(app, tokens)
        try:
            handler.connect()
        except Exception as exc:  # slack_sdk raises its own types; the user sees one line
            with contextlib.suppress(Exception):  # its threads go; the next attempt makes a new handler
                handler.close()
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InfrastructureError(f"cannot open the Slack Socket Mode connection: {cause}") from exc
        self.socket = handler

    def stop(self, grace_s: float | None = None) -> list[str]:
        """Stop firing, close Slack, give a running cycle `grace_s` (default daemon.shutdown_grace_s).
        Returns the ids of runs still being driven (they stay resumable from their checkpoints)."""
        from flywheel.agent import rounds, runs

        grace = self.settings.daemon.shutdown_grace_s if grace_s is None else grace_s
        with self._slack_lock:  # a connection attempt in flight finishes first; none starts after this
            self._stopping = True
        with _targets_lock:
            if _targets.get(target_key(self.settings)) == self._fire:
                del _targets[target_key(self.settings)]
        if self.scheduler is not None:
            stop_scheduler(self.scheduler)
        if self.http is not None:
            self.http.stop()
        if self.socket is not None:
            self.socket.close()
        deadline = time.monotonic() + grace
        while self._busy.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._slack_workers is not None:
            self._slack_workers.shutdown(wait=True, cancel_futures=False)  # a click being applied finishes
        if not self._busy.locked():
            return []
        return [r.id for r in runs.list_runs(self.ctx.store, limit=20, states=[runs.RUNNING]) if r.trigger in ("schedule", rounds.TRIGGER)]

    def serve_until_signalled(self) -> list[str]:
        """start(), wait for SIGTERM or SIGINT, stop(). Must run in the main thread (signal handlers)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            try:
                self.start()
            except BaseException:
                self.stop(grace_s=0)  # whatever did start (the Slack endpoint, the scheduler) stops again
                raise
            while not self._stop.wait(0.5):
                pass
            log.info("stopping")
            return self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self._stop.set()

    # --- jobs ------------------------------------------------------------------------------------------------
    def _fire(self, schedule_id: str) -> Any:
        return run_scheduled(self.ctx, schedule_id, self._busy, self.slack.post if self.slack is not None else None)

    def _poll_rounds(self) -> None:
        """Count the new verified samples; start a round when enough have arrived and nothing runs. A
        flywheel error is one log line (anything else APScheduler logs as a job error); either way the
        next poll retries, and the daemon goes on."""
        from flywheel.agent import rounds

        try:
            status = rounds.round_status(self.ctx)
        except FlywheelError as exc:
            log.warning("online rounds: cannot count the new verified samples: %s", exc)
            return
        finally:
            self.round_polls += 1
        if not status.enough or self._stopping:
            self._round_waiting = None
            return
        waits_for = status.waits_for
        if waits_for is None and not self._busy.acquire(blocking=False):
            waits_for = "a cycle is running in this daemon"
        if waits_for is not None:
            if waits_for != self._round_waiting:  # once per reason, not once per poll
                log.info("online round due (%d new verified samples); waiting: %s", status.new, waits_for)
            self._round_waiting = waits_for
            return
        self._round_waiting = None
        log.info("online round: %d new verified samples since the last round (at least %d); starting", status.new, status.min_verified)
        # The lock is held from here until the round ends, by the round's thread: a cron firing meanwhile is skipped.
        self.round_thread = threading.Thread(target=self._run_round, args=(status.new,), name="flywheel-round", daemon=True)
        self.round_thread.start()

    def _run_round(self, samples: int) -> None:
        from flywheel.agent import rounds

        try:
            rounds.start_round(self.ctx, samples, scheduled_policy(self.settings), self.slack.post if self.slack is not None else None)
        except Exception:  # a thread of its own has nobody to raise to; the next poll goes on
            log.exception("online round: unexpected error")
        finally:
            self._busy.release()

    def _every(self, func: Any, seconds: float, job_id: str) -> None:
        """A job of this process only (not persisted) that runs now and then every `seconds`."""
        self.scheduler.add_job(
            func,
            "interval",
            seconds=seconds,
            id=job_id,
            jobstore="volatile",
            replace_existing=True,
            next_run_time=datetime.now(self.scheduler.timezone),
        )

    def _sync_slack(self) -> None:
        try:
            done = self.slack.sync()
        except FlywheelError as exc:
            log.warning("slack sync: %s", exc)
            return
        self.slack_sync_rounds += 1
        if done["posted"] or done["closed"]:
            log.info("slack sync: %d request(s) posted, %d closed", done["posted"], done["closed"])
