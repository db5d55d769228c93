"""Ingest: files of logged conversations -> validated, PII-scrubbed rows in the interaction store.

    ingest_files(store, settings, [Path("logs.jsonl")], fmt="auto") -> IngestSummary

What it promises:
- Streaming: a file is read in chunks and split into lines in binary (each line decoded on its own, so one
  line of invalid UTF-8 is one quarantined line); rows go to the store in batches of BATCH_ROWS, one
  transaction each; memory stays flat in the file size.
- Nothing is lost on interruption: counts are reported only after their batch committed, and re-ingesting
  the same file adds nothing (store.interactions.insert_ignore skips known ids and content hashes).
- Bad input never stops a file: a malformed line, a wrong type, an unknown role, an oversized message or
  invalid UTF-8 goes to the quarantine file (settings.quarantine_path) with file, line and reason, and is
  counted. A missing file is reported and the other files are still ingested.
- PII is scrubbed (flywheel.data.pii) from message content, tool-call arguments and complaint text before
  the content hash is computed and before anything is stored, the quarantine file included.

How: flywheel.data.batches turns a file into batches (reading, mapping the shape, validating, scrubbing);
this module stores them. For a large file on a machine with a free core the batches are built in a helper
process while this one writes (a writer thread was tried first: the two threads convoyed on the GIL and it
ran slower than one).
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pydantic import Field
from sqlalchemy import Connection
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from flywheel.data.batches import Batch, BatchReader, BadRecord
from flywheel.data.formats import FORMATS
from flywheel.data.rows import BadLine, build_row  # noqa: F401 - serve.capture imports these from here
from flywheel.errors import InfrastructureError, UserInputError
from flywheel.records import Record, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.interactions import insert_ignore

BATCH_ROWS = 2000
# Files at least this large are parsed in a helper process when a core is free: below it the process start
# (~0.3 s of imports) costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20


class FileSummary(Record):
    path: str
    read: int = 0  # non-blank lines (or JSON array items)
    stored: int = 0  # new rows, committed
    duplicates: int = 0  # rows the store already held (same id or same content)
    quarantined: int = 0
    error: str | None = None  # the file could not be read at all
    formats: dict[str, int] = Field(default_factory=dict)  # lines per detected format
    reasons: dict[str, int] = Field(default_factory=dict)  # quarantined lines per reason kind
    pii: dict[str, int] = Field(default_factory=dict)  # placeholders written, per PII kind


class IngestSummary(Record):
    files: list[FileSummary] = []
    quarantine_path: str = ""

    @property
    def stored(self) -> int:
        return sum(f.stored for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def failed_files(self) -> int:
        return sum(1 for f in self.files if f.error)

    @property
    def clean(self) -> bool:
        """True when every line of every file was stored or was a duplicate."""
        return self.quarantined == 0 and self.failed_files == 0


Progress = Callable[[FileSummary], None]


def ingest_files(
    store: Store,
    settings: Settings,
    paths: list[Path],
    fmt: str = "auto",
    on_progress: Progress | None = None,
    batch_rows: int = BATCH_ROWS,
    parallel: bool | None = None,
) -> IngestSummary:
    """Ingest each file; return what happened to every line. `on_progress` is called after each committed
    batch with the file's counts so far (everything it reports is durable). `parallel`: build batches in a
    helper process; None decides by file size and how busy the machine is (_helper_pays)."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = IngestSummary(quarantine_path=str(settings.quarantine_path))
    quarantine = _Quarantine(settings.quarantine_path)
    try:
        with _fewer_gc_passes():
            for path in paths:
                counts = FileSummary(path=str(path))
                summary.files.append(counts)
                try:
                    size = path.stat().st_size
                    if path.is_dir():
                        counts.error = "is a folder, not a file"
                        continue
                    open(path, "rb").close()  # unreadable files fail here, with the reason, before any work
                except FileNotFoundError:
                    counts.error = "file not found"
                    continue
                except OSError as exc:
                    counts.error = f"cannot read: {exc.strerror or exc}"
                    continue
                use_helper = parallel if parallel is not None else _helper_pays(size)
                reader = BatchReader(path, fmt, settings.policies.max_message_chars, batch_rows)
                batches = _from_helper(reader) if use_helper else iter(reader)
                try:
                    _store_file(store, batches, counts, quarantine, on_progress)
                except OSError as exc:
                    counts.error = f"cannot read: {exc.strerror or exc}"
    finally:
        quarantine.close()
    return summary


def _helper_pays(size: int) -> bool:
    """A helper process pays when the file is large and a whole core is idle. On a busy machine it only
    adds the pickling (about a third more CPU in all) and the two processes slow each other down: on this
    project's shared 2-core machine bench/ingest.py measured 22k rows/s with it at load 1.8 and 12k at
    load 2.5, where one process did 17k."""
    cores = os.cpu_count() or 1
    if size < PARALLEL_MIN_BYTES or cores < 2:
        return False
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return True
    return load <= cores - 1


def _store_file(store: Store, batches: Iterator[Batch], counts: FileSummary, quarantine: _Quarantine, on_progress: Progress | None) -> None:
    reasons: Counter[str] = Counter()
    with _bulk_connection(store) as conn:
        for batch in batches:
            for bad in batch.bad:
                quarantine.write(counts.path, bad)
                reasons[bad.kind] += 1
            counts.read += batch.read
            counts.quarantined += len(batch.bad)
            if batch.rows:
                stored, refused = _store_batch(conn, batch.rows, batch.lines)
                counts.stored += stored
                counts.duplicates += len(batch.rows) - stored - len(refused)
                for bad in refused:
                    quarantine.write(counts.path, bad)
                    reasons[bad.kind] += 1
                counts.quarantined += len(refused)
            quarantine.flush()
            counts.formats = batch.formats
            counts.pii = batch.pii
            counts.reasons = dict(reasons)
            if on_progress is not None:
                on_progress(counts.model_copy())


# --- the helper process --------------------------------------------------------------------------------------


def _from_helper(reader: BatchReader) -> Iterator[Batch]:
    """The reader's batches, built in a helper process and handed over pickled through a pipe. The pipe
    holds about one batch, so the helper runs at most a batch ahead: memory stays flat. If this process
    stops, the helper finds the pipe closed and ends; if the helper dies, this raises."""
    context = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads and open connections
    receiver, sender = context.Pipe(duplex=False)
    helper = context.Process(target=_helper_main, args=(sender, reader), name="flywheel-ingest-reader", daemon=True)
    helper.start()
    sender.close()
    try:
        while True:
            try:
                item = pickle.loads(receiver.recv_bytes())
            except EOFError:
                raise InfrastructureError(f"the ingest reader process for {reader.path} stopped (exit code {helper.exitcode})") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        receiver.close()
        helper.join(timeout=10)
        if helper.is_alive():
            helper.terminate()


def _helper_main(sender: Any, reader: BatchReader) -> None:
    try:
        for batch in reader:
            sender.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        sender.send_bytes(pickle.dumps(None))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the ingest process is gone or stopping: nothing to hand over
    except BaseException as exc:  # handed to the ingest process, which raises it
        try:
            sender.send_bytes(pickle.dumps(exc))
        except Exception:
            sender.send_bytes(pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        sender.close()


# --- storing ---------------------------------------------------------------------------------------------------


@contextmanager
def _fewer_gc_passes() -> Iterator[None]:
    """Each line allocates a few dozen dicts and lists, none of them in a reference cycle; the default
    collector threshold (700) makes it walk the young objects every few lines, about a tenth of the ingest
    time. A higher threshold for the duration keeps collection on, just rarer."""
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


class _Quarantine:
    """Appends bad lines to the quarantine file, JSON Lines: file, line, kind, reason, raw (a scrubbed prefix
    of the line), at."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: IO[str] | None = None

    def write(self, file: str, bad: BadRecord) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        record = {"file": file, "line": bad.line, "kind": bad.kind, "reason": bad.reason, "raw": bad.raw, "at": utcnow().isoformat()}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@contextmanager
def _bulk_connection(store: Store) -> Iterator[Connection]:
    """One connection for a whole file, one transaction per batch. On SQLite, for the duration: a 32 MB page
    cache (with the default 2 MB every insert into the content-hash index reads a page) and a WAL checkpoint
    every 64 MB instead of every 4 MB (each checkpoint syncs the database file); at the end a passive
    checkpoint and the defaults again. bench/ingest.py measured 12k -> 17k rows/s on 200,000 rows."""
    with store.engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA cache_size=-32768")
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint=16384")
            conn.commit()
        try:
            yield conn
        finally:
            if sqlite:
                try:
                    conn.rollback()  # nothing is open unless a batch failed
                    conn.exec_driver_sql("PRAGMA wal_autocheckpoint=1000")
                    conn.exec_driver_sql("PRAGMA cache_size=-2000")
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                    conn.commit()
                except SQLAlchemyError:
                    pass  # best effort on a connection that is failing anyway; the original error propagates


def _store_batch(conn: Connection, rows: list[dict[str, Any]], lines: list[int]) -> tuple[int, list[BadRecord]]:
    """Insert one batch in one transaction; returns (rows that were new, the rows the store refused).
    If the database refuses the batch for a data reason (a value PostgreSQL will not hold), the rows go one
    by one and the refused ones come back for the quarantine: one odd row does not cost its neighbours."""
    try:
        with conn.begin():
            return insert_ignore(conn, rows), []
    except (DataError, IntegrityError):
        pass
    stored = 0
    refused: list[BadRecord] = []
    for row, line in zip(rows, lines):
        try:
            with conn.begin():
                stored += insert_ignore(conn, [row])
        except (DataError, IntegrityError) as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            raw = json.dumps(row["messages"], ensure_ascii=False)[:2000]  # already scrubbed
            refused.append(BadRecord(line, "store_refused", f"the store refused this row: {reason}"[:200], raw))
    return stored, refused
