"""Capture: every served interaction (and every feedback event) reaches the store off the request path.

    capture = Capture(store, settings); capture.start()
    capture.submit(Served(...)) / capture.submit(FeedbackItem(...))   # never blocks, never raises
    capture.close()                                                      # flush on shutdown

The request path only puts the item on a bounded in-memory queue. One writer thread takes batches off it,
builds each store row with ingest's own `build_row` (the same validation and PII scrubbing as a log file
gets, so a captured interaction and an ingested one cannot differ) and inserts them with
`store.interactions.insert_ignore` in one transaction per batch.

Nothing accepted is lost:
- The queue is full (the store is slow): the request path scrubs the item itself and appends it to a spill
  file on disk (JSON Lines under serve.spill_dir) instead of waiting.
- The store fails (down, locked, refusing connections): the writer appends the batch to the spill file and
  retries the store every serve.store_retry_s; meanwhile batches go straight to the spill file.
- Once the store answers again, spill files are replayed in order, batch by batch; a sidecar `.offset`
  file records how far a replay committed, so a crash during a replay resumes it (interactions are
  idempotent by id; at most one feedback batch could apply twice).
- A row the store will never hold (a message longer than policies.max_message_chars, a value PostgreSQL
  refuses) is written, scrubbed, to `rejected.jsonl` beside the spill files with its reason.
- On shutdown the queue is written to the store for up to serve.shutdown_flush_s, the rest is spilled.
Spill files hold scrubbed rows only: PII never reaches the disk, as in ingest. A spill file a live process
is still appending to is locked (flock), so another gateway sharing the folder does not replay it early.
Feedback is applied once (flywheel.serve.feedback): on arrival, on its interaction's insert, or by a sweep.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import orjson
from sqlalchemy.exc import DataError, IntegrityError

from flywheel.data.ingest import BadLine, build_row
from flywheel.data.pii import Scrubber
from flywheel.records import utcnow
from flywheel.serve import feedback
from flywheel.serve.feedback import FeedbackItem
from flywheel.serve.protocol import message_text
from flywheel.serve.spill import SpillFiles, decode, encode, lock_nonblocking
from flywheel.settings import Settings
from flywheel.store.db import Store

log = logging.getLogger("flywheel.serve")

MAX_USER_ID = 200  # interactions.user_id width; longer ids are stored as a stable pseudonym
LINGER_S = 0.05  # the writer's pause after a partial batch


@dataclass(slots=True)
class Served:
    """One answered request as the request path hands it over: raw text, scrubbed by the writer."""

    id: str
    timestamp: datetime
    model_version: str
    messages: list[dict[str, Any]]  # the request's messages and the answer
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    user_id: str | None = None
    user_tier: str | None = None
    intent: str | None = None
    client: str | None = None


def spill_folder(settings: Settings) -> Path:
    return Path(settings.serve.spill_dir) if settings.serve.spill_dir else settings.state_path / "gateway"


# --- the writer ---------------------------------------------------------------------------------------------


class Capture:
    def __init__(self, store: Store, settings: Settings, *, spill_dir: Path | None = None):
        self.store = store
        self.settings = settings
        cfg = settings.serve
        self.batch_size = cfg.capture_batch
        self.retry_s = cfg.store_retry_s
        self.flush_s = cfg.shutdown_flush_s
        self.max_chars = settings.policies.max_message_chars
        self.spill = SpillFiles(spill_dir or spill_folder(settings))
        self.rejected_path = self.spill.folder / "rejected.jsonl"
        self._queue: queue.Queue[Served | FeedbackItem] = queue.Queue(maxsize=cfg.capture_queue)
        self._stopping = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._scrubber = Scrubber()  # the writer's
        self._inline_lock = threading.Lock()  # request-path spills (the queue was full)
        self._inline_scrubber = Scrubber()
        self._last_stamp = utcnow()
        self._down_until = 0.0
        self._next_replay = 0.0
        self.sweeper = feedback.Sweeper(store)
        self._replaying = False
        self._count_lock = threading.Lock()
        self._inflight: list[Served | FeedbackItem] = []
        # counters: `accepted` and `spilled_inline` belong to the request side (the event loop), the plain ones
        # to the writer; those both may touch (lost, rejected, spilled) go through _count's lock
        self.accepted = 0
        self.spilled_inline = 0
        self.lost = 0
        self.stored = 0  # interactions inserted (or found already stored)
        self.feedback_stored = 0
        self.spilled = 0
        self.replayed = 0
        self.rejected = 0
        self.store_errors = 0

    # --- the request side --------------------------------------------------------------------------------

    def stamp(self) -> datetime:
        """The timestamp of a new interaction, strictly increasing within this process: two identical
        conversations of one user in the same microsecond would otherwise share a content hash, and the
        store keeps one row per content hash."""
        now = utcnow()
        if now <= self._last_stamp:
            now = self._last_stamp + timedelta(microseconds=1)
        self._last_stamp = now
        return now

    def submit(self, item: Served | FeedbackItem) -> None:
        """Hand an item to the writer. Never blocks, never raises: when the queue is full the item is
        scrubbed and spilled to disk right here."""
        self.accepted += 1
        if not self._closed:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                pass
        try:
            with self._inline_lock:
                lines, rejected = self._entries([item], self._inline_scrubber)
            self._reject(rejected)
            self.spill.append(lines)
            self.spilled_inline += len(lines)
        except Exception:  # a full disk: the one case where an item is lost, and it is counted and logged
            self._count("lost")
            log.exception("capture: could not spill interaction %s", getattr(item, "id", getattr(item, "interaction_id", "?")))

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> Capture:
        self._thread = threading.Thread(target=self._run, name="flywheel-capture", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued (for up to serve.shutdown_flush_s), spill the rest, close the spill file."""
        self._closed = True
        self._stopping.set()
        limit = (self.flush_s if timeout is None else timeout) + 2.0  # a store call already under way gets 2 s more
        if self._thread is not None:
            self._thread.join(limit)
            if self._thread.is_alive():  # stuck in a store call: keep its batch and the queue on disk
                log.error("capture: the store did not answer within %.0f s at shutdown; spilling what is left", limit)
                self._spill_items(list(self._inflight) + self._drain())
        self._spill_items(self._drain())
        self.spill.close()

    def wait_idle(self, timeout: float = 10.0, replayed: bool = False) -> bool:
        """True once the queue is empty and nothing is being written (and, with `replayed`, no spill file
        is waiting). For tests and the benchmark."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # unfinished_tasks counts items put and not yet handled (task_done), in flight included
            if self._queue.unfinished_tasks == 0 and not self._replaying and not (replayed and self.spill.pending()):
                return True
            time.sleep(0.01)
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "queued": self._queue.qsize(),
            "stored": self.stored,
            "feedback_stored": self.feedback_stored,
            "feedback_swept": self.sweeper.applied,
            "spilled": self.spilled + self.spilled_inline,
            "replayed": self.replayed,
            "rejected": self.rejected,
            "lost": self.lost,
            "store_errors": self.store_errors,
            "spill_pending": self.spill.pending(),
            "store_ok": time.monotonic() >= self._down_until,
        }

    # --- the writer thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        deadline: float | None = None
        while True:
            if self._stopping.is_set() and deadline is None:
                deadline = time.monotonic() + self.flush_s
            items = self._take()
            if items:
                self._inflight = items
                try:
                    if deadline is not None and time.monotonic() > deadline:
                        self._spill_items(items)
                    else:
                        self._handle(items)
                except Exception:  # a bug must not end the writer: keep the batch on disk and go on
                    log.exception("capture: unexpected error; spilling the batch")
                    self._spill_items(items)
                self._inflight = []
                for _ in items:
                    self._queue.task_done()
            elif self._stopping.is_set():
                return
            if not self._stopping.is_set():
                try:
                    self._maybe_replay()
                except Exception:  # e.g. a spill file that cannot be read: logged, retried next time
                    log.exception("capture: replaying spill files failed")
                if time.monotonic() >= self._down_until:
                    self.sweeper.maybe_run()
            if len(items) < self.batch_size:
                # Not a full batch: let more gather instead of waking (and taking the GIL from the event
                # loop) for every request. The store sees a transaction per LINGER_S at most, not per request.
                self._stopping.wait(LINGER_S)

    def _take(self) -> list[Served | FeedbackItem]:
        items: list[Served | FeedbackItem] = []
        while len(items) < self.batch_size:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _drain(self) -> list[Served | FeedbackItem]:
        items = []
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items
            self._queue.task_done()

    def _handle(self, items: list[Served | FeedbackItem]) -> None:
        rows, feedbacks, rejected = self._split(items, self._scrubber)
        self._reject(rejected)
        if time.monotonic() < self._down_until:
            self._spill_parts(rows, feedbacks)
            return
        try:
            self._write(rows, feedbacks)
        except Exception as exc:  # the store is down or broken: keep everything on disk, retry later
            self._store_failed(exc)
            self._spill_parts(rows, feedbacks)

    def _store_failed(self, exc: Exception) -> None:
        self.store_errors += 1
        self._down_until = time.monotonic() + self.retry_s
        log.warning(
            "capture: the store failed (%s); spilling to %s and retrying in %.1f s",
            str(exc).splitlines()[0][:200],
            self.spill.folder,
            self.retry_s,
        )

    # --- building rows -----------------------------------------------------------------------------------

    def _row(self, item: Served, scrubber: Scrubber) -> dict[str, Any]:
        user = item.user_id
        if user is not None and len(user) > MAX_USER_ID:
            user = "user-" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]
        flat = {
            "id": item.id,
            "timestamp": item.timestamp.isoformat(),
            "model_version": item.model_version,
            "user_id": user,
            "user_tier": item.user_tier,
            "intent": item.intent,
            "messages": item.messages,
            "latency_ms": item.latency_ms,
            "prompt_tokens": item.prompt_tokens,
            "completion_tokens": item.completion_tokens,
        }
        source = f"gateway:{item.client}" if item.client else "gateway"
        return build_row(flat, scrubber, self.max_chars, source, utcnow())

    def _split(
        self, items: list[Served | FeedbackItem], scrubber: Scrubber
    ) -> tuple[list[dict[str, Any]], list[FeedbackItem], list[tuple[Served, BadLine]]]:
        rows: list[dict[str, Any]] = []
        feedbacks: list[FeedbackItem] = []
        rejected: list[tuple[Served, BadLine]] = []
        for item in items:
            if isinstance(item, FeedbackItem):
                feedbacks.append(item)
                continue
            try:
                rows.append(self._row(item, scrubber))
            except BadLine as exc:
                rejected.append((item, exc))
            except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a shape build_row did not expect
                rejected.append((item, BadLine("unbuildable", f"{type(exc).__name__}: {exc}"[:300])))
        return rows, feedbacks, rejected

    def _entries(self, items: list[Served | FeedbackItem], scrubber: Scrubber) -> tuple[list[bytes], list[tuple[Served, BadLine]]]:
        rows, feedbacks, rejected = self._split(items, scrubber)
        return self._lines(rows, feedbacks), rejected

    @staticmethod
    def _lines(rows: list[dict[str, Any]], feedbacks: list[FeedbackItem]) -> list[bytes]:
        lines = [encode("i", row) for row in rows]
        lines += [
            encode(
                "f",
                {
                    "interaction_id": f.interaction_id,
                    "kind": f.kind,
                    "value": f.value,
                    "client": f.client,
                    "created_at": f.created_at.isoformat(),
                },
            )
            for f in feedbacks
        ]
        return lines

    # --- the store -----------------------------------------------------------------------------------------

    def _write(self, rows: list[dict[str, Any]], feedbacks: list[FeedbackItem]) -> None:
        """One transaction: the interactions, the feedback that arrived before them, then the new feedback.
        A row the database refuses for its data sends the batch through one row at a time."""
        now = utcnow()
        for row in rows:
            row["ingested_at"] = now
        # In id order: gateways sharing one PostgreSQL may write the same ids at once (a spill replayed by two
        # of them). Each then waits for the other on the first id they share instead of each holding one the
        # other needs (a deadlock PostgreSQL would break by failing one batch, which then goes to the spill).
        rows.sort(key=itemgetter("id"))
        try:
            with self.store.begin() as conn:
                feedback.insert_and_apply(conn, rows)
                feedback.record(conn, feedbacks)
        except (DataError, IntegrityError):
            self._write_one_by_one(rows, feedbacks)
            return
        self.stored += len(rows)
        self.feedback_stored += len(feedbacks)

    def _write_one_by_one(self, rows: list[dict[str, Any]], feedbacks: list[FeedbackItem]) -> None:
        for row in rows:
            try:
                with self.store.begin() as conn:
                    feedback.insert_and_apply(conn, [row])
                self.stored += 1
            except (DataError, IntegrityError) as exc:
                reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
                self._reject_row(row, "store_refused", f"the store refused this row: {reason}"[:300])
        for item in feedbacks:
            try:
                with self.store.begin() as conn:
                    feedback.record(conn, [item])
                self.feedback_stored += 1
            except (DataError, IntegrityError) as exc:
                self._append_rejected(
                    {"kind": "store_refused", "reason": str(exc).splitlines()[0][:300], "feedback": self._lines([], [item])[0].decode()}
                )

    # --- spilling and replaying ------------------------------------------------------------------------------

    def _spill_parts(self, rows: list[dict[str, Any]], feedbacks: list[FeedbackItem]) -> None:
        self._spill_lines(self._lines(rows, feedbacks))

    def _spill_items(self, items: list[Served | FeedbackItem]) -> None:
        if not items:
            return
        with self._inline_lock:
            lines, rejected = self._entries(items, self._inline_scrubber)
        self._reject(rejected)
        self._spill_lines(lines)

    def _spill_lines(self, lines: list[bytes]) -> None:
        try:
            self.spill.append(lines)
            self._count("spilled", len(lines))
        except Exception:
            self._count("lost", len(lines))
            log.exception("capture: could not write %d entries to the spill file", len(lines))

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + n)

    def _maybe_replay(self) -> None:
        now = time.monotonic()
        if now < self._down_until or now < self._next_replay or self._queue.qsize() >= self.batch_size:
            return
        self._next_replay = now + self.retry_s
        if not self.spill.pending():
            return
        self.spill.rotate()
        for path in self.spill.files():
            if not self._replay_file(path):
                return

    def _replay_file(self, path: Path) -> bool:
        """Replay one spill file into the store. False when the store failed (the file stays, with its offset)."""
        offset_path = path.with_name(path.name + ".offset")
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return True  # another process replayed it meanwhile
        with handle:
            if not lock_nonblocking(handle):
                return True  # a live process is still appending to it, or replaying it
            offset = int(offset_path.read_text()) if offset_path.exists() else 0
            handle.seek(offset)
            self._replaying = True
            try:
                for rows, feedbacks, end in self._batches(handle, path):
                    try:
                        self._write(rows, feedbacks)
                    except Exception as exc:
                        self._store_failed(exc)
                        return False
                    self.replayed += len(rows) + len(feedbacks)
                    offset_path.write_text(str(end))
                path.unlink()
                offset_path.unlink(missing_ok=True)
            finally:
                self._replaying = False
        log.info("capture: replayed %s", path.name)
        return True

    def _batches(self, handle: IO[bytes], path: Path) -> Iterator[tuple[list[dict[str, Any]], list[FeedbackItem], int]]:
        rows: list[dict[str, Any]] = []
        feedbacks: list[FeedbackItem] = []
        for line in iter(handle.readline, b""):
            try:
                kind, value = decode(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash mid-write
                self._append_rejected(
                    {
                        "kind": "corrupt_spill_line",
                        "reason": f"unreadable line in {path.name}",
                        "raw": line[:2000].decode("utf-8", "replace"),
                    }
                )
                continue
            (rows if kind == "i" else feedbacks).append(value)
            if len(rows) + len(feedbacks) >= self.batch_size:
                yield rows, feedbacks, handle.tell()
                rows, feedbacks = [], []
        if rows or feedbacks:
            yield rows, feedbacks, handle.tell()

    # --- rows the store will never hold ----------------------------------------------------------------------

    def _reject(self, rejected: list[tuple[Served, BadLine]]) -> None:
        for item, exc in rejected:
            scrub = Scrubber()
            messages = [
                {"role": m.get("role"), "content": scrub.text(message_text(m.get("content")))} for m in item.messages if isinstance(m, dict)
            ]
            self._append_rejected(
                {"kind": exc.kind, "reason": str(exc), "id": item.id, "model_version": item.model_version, "messages": messages}
            )

    def _reject_row(self, row: dict[str, Any], kind: str, reason: str) -> None:
        self._append_rejected({"kind": kind, "reason": reason, "id": row.get("id"), "row": row})

    def _append_rejected(self, record: dict[str, Any]) -> None:
        self._count("rejected")
        record["at"] = utcnow().isoformat()
        log.warning("capture: %s %s: %s (kept in %s)", record.get("kind"), record.get("id", ""), record.get("reason"), self.rejected_path)
        try:
            self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejected_path, "ab") as handle:
                handle.write(orjson.dumps(record, default=str) + b"\n")
        except OSError:
            self._count("lost")
            log.exception("capture: could not write to %s", self.rejected_path)
