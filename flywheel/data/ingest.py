"""Ingest: files of logged conversations -> validated, PII-scrubbed rows in the interaction store.

    ingest_files(store, settings, [Path("logs.jsonl")], fmt="auto") -> IngestSummary

What it promises:
- Streaming: a file is read line by line in binary (each line decoded on its own, so one line of invalid
  UTF-8 is one quarantined line); rows go to the store in batches of BATCH_ROWS; memory stays flat.
- Nothing is lost on interruption: counts are reported only after their batch committed, and re-ingesting
  the same file adds nothing (store.interactions.insert_ignore skips known ids and content hashes).
- Bad input never stops a file: a malformed line, a wrong type, an unknown role, an oversized message or
  invalid UTF-8 goes to the quarantine file (settings.quarantine_path) with file, line and reason, and is
  counted. A missing file is reported and the other files are still ingested.
- PII is scrubbed (flywheel.data.pii) from message content, tool-call arguments and complaint text before
  the content hash is computed and before anything is stored, the quarantine file included.

Shapes: flywheel's own OpenAI-chat line, a LangSmith run or a Langfuse trace (flywheel.data.formats), as
JSON Lines (.jsonl, .jsonl.gz) or a JSON array (flywheel.data.readers); validation in flywheel.data.rows.
"""

from __future__ import annotations

import gc
import json
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import Field
from sqlalchemy import Connection
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from flywheel.data.formats import FORMATS, MappingError, detect, to_flat
from flywheel.data.pii import Scrubber
from flywheel.data.readers import looks_like_array, open_binary, read_json_array, read_lines
from flywheel.data.rows import BadLine, build_row  # noqa: F401 - build_row and BadLine are used from here by serve.capture
from flywheel.errors import UserInputError
from flywheel.records import Record, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.interactions import insert_ignore

BATCH_ROWS = 2000
RAW_PREFIX_CHARS = 2000  # how much of a bad line the quarantine keeps
QUEUED_BATCHES = 2  # batches built and waiting for the writer: bounds memory


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
) -> IngestSummary:
    """Ingest each file; return what happened to every line. `on_progress` is called after each committed
    batch with the file's counts so far (everything it reports is durable)."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = IngestSummary(quarantine_path=str(settings.quarantine_path))
    quarantine = _Quarantine(settings.quarantine_path)
    try:
        with _fewer_gc_passes():
            for path in paths:
                counts = FileSummary(path=str(path))
                summary.files.append(counts)
                if not path.exists():
                    counts.error = "file not found"
                elif path.is_dir():
                    counts.error = "is a folder, not a file"
                else:
                    try:
                        _FileIngest(store, settings, path, fmt, counts, quarantine, on_progress, batch_rows).run()
                    except OSError as exc:
                        counts.error = f"cannot read: {exc.strerror or exc}"
    finally:
        quarantine.close()
    return summary


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
    """Appends bad lines to the quarantine file (JSON Lines: file, line, kind, reason, raw, at). The raw
    prefix is PII-scrubbed too: quarantine is storage."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: IO[str] | None = None
        self._scrubber = Scrubber()

    def write(self, file: str, line: int, kind: str, reason: str, raw: bytes | str | None) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if isinstance(raw, bytes):
            raw = raw[: RAW_PREFIX_CHARS * 4].decode("utf-8", errors="backslashreplace")
        text = (raw or "")[:RAW_PREFIX_CHARS].rstrip("\n").replace("\x00", "\\u0000")
        record = {"file": file, "line": line, "kind": kind, "reason": reason, "raw": self._scrubber.text(text), "at": utcnow().isoformat()}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class _FileIngest:
    """One file: read, map, validate and scrub on this thread; insert on a writer thread (_Writer)."""

    def __init__(self, store: Store, settings: Settings, path: Path, fmt: str, counts: FileSummary,
                 quarantine: _Quarantine, on_progress: Progress | None, batch_rows: int):
        self.store = store
        self.path = path
        self.fmt = fmt
        self.counts = counts
        self.quarantine = quarantine
        self.on_progress = on_progress
        self.batch_rows = batch_rows
        self.max_chars = settings.policies.max_message_chars
        # A line holds a few messages; anything far beyond that is refused before it is parsed.
        self.max_line_bytes = max(1 << 20, 64 * self.max_chars)
        self.name = str(path)
        self.source_name = path.name[-300:]
        self.scrubber = Scrubber()
        self.formats: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def bad(self, line: int, kind: str, reason: str, raw: bytes | str | None) -> None:
        self.counts.quarantined += 1
        self.reasons[kind] += 1
        self.quarantine.write(self.name, line, kind, reason, raw)

    def run(self) -> None:
        batch: list[dict[str, Any]] = []
        lines: list[int] = []
        now = utcnow()
        with open_binary(self.path) as handle, _Writer(self.store) as writer:
            reader = read_json_array(handle, self.max_line_bytes) if looks_like_array(self.path) else read_lines(handle, self.max_line_bytes)
            try:
                for line_no, raw in reader:
                    row = self._row(line_no, raw, now)
                    if row is None:
                        continue
                    batch.append(row)
                    lines.append(line_no)
                    if len(batch) >= self.batch_rows:
                        writer.submit(batch, lines)
                        batch, lines = [], []
                        now = utcnow()
                        self._take(writer.done())
            except BadLine as exc:  # a JSON array that cannot be read on
                self.bad(0, exc.kind, str(exc), None)
            if batch:
                writer.submit(batch, lines)
            self._take(writer.finish())
        self._report()

    def _row(self, line_no: int, raw: bytes | None, now: datetime) -> dict[str, Any] | None:
        """The store row for one raw line, or None (blank, or quarantined)."""
        if raw is None:
            self.counts.read += 1
            self.bad(line_no, "oversized", f"line is over {self.max_line_bytes} bytes", None)
            return None
        if not raw.strip():
            return None
        self.counts.read += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as uexc:
                self.bad(line_no, "invalid_utf8", f"invalid UTF-8 at byte {uexc.start}", raw)
            else:
                self.bad(line_no, "malformed_json", f"not valid JSON: {exc}"[:200], raw)
            return None
        if b"\\u0000" in raw:  # JSON's escape for NUL: PostgreSQL cannot store it, and PII scans join on it
            self.bad(line_no, "nul_character", "the line contains a NUL character (\\u0000)", raw)
            return None
        if type(obj) is not dict:
            self.bad(line_no, "wrong_type", f"expected a JSON object, got a JSON {type(obj).__name__}", raw)
            return None
        try:
            kind = detect(obj) if self.fmt == "auto" else self.fmt
            source = f"{self.source_name}:{line_no}" if kind == "openai" else f"{kind}:{self.source_name}:{line_no}"
            row = build_row(to_flat(obj, kind), self.scrubber, self.max_chars, source, now)
        except BadLine as exc:
            self.bad(line_no, exc.kind, str(exc), raw)
            return None
        except MappingError as exc:
            self.bad(line_no, "unmappable", str(exc), raw)
            return None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            # an export record of an unexpected shape: quarantined with what went wrong, not a crash
            self.bad(line_no, "unmappable", f"cannot read this {self.fmt if self.fmt != 'auto' else 'record'}: {type(exc).__name__}: {exc}"[:200], raw)
            return None
        self.formats[kind] += 1
        return row

    def _take(self, results: list[tuple[int, int, list[tuple[int, str, str]]]]) -> None:
        """Count committed batches: (rows in the batch, rows new, rows the store refused)."""
        for size, stored, refused in results:
            self.counts.stored += stored
            self.counts.duplicates += size - stored - len(refused)
            for line, reason, raw in refused:
                self.bad(line, "store_refused", reason, raw)
            self._report()

    def _report(self) -> None:
        self.quarantine.flush()
        self.counts.formats = dict(self.formats)
        self.counts.reasons = dict(self.reasons)
        self.counts.pii = dict(self.scrubber.counts)
        if self.on_progress is not None:
            self.on_progress(self.counts.model_copy())


class _Writer:
    """Inserts batches on its own thread and connection, one transaction each, in order. The sqlite3 and
    psycopg drivers release the GIL while the database works, so SQLite's B-tree and WAL work overlaps with
    parsing and scrubbing the next batch. At most QUEUED_BATCHES wait; a result comes back only after its
    commit. A database error stops the writer and is raised on the reading thread."""

    def __init__(self, store: Store):
        self.store = store
        self.jobs: queue.Queue[tuple[list[dict[str, Any]], list[int]] | None] = queue.Queue(maxsize=QUEUED_BATCHES)
        self.results: queue.Queue[tuple[int, int, list[tuple[int, str, str]]] | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="flywheel-ingest-writer", daemon=True)
        self.failed = threading.Event()

    def __enter__(self) -> "_Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():  # leaving early (an error on the reading side): stop after the batch in hand
            self.failed.set()
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                pass
            self.thread.join(timeout=60)

    def submit(self, rows: list[dict[str, Any]], lines: list[int]) -> None:
        while True:  # blocks while QUEUED_BATCHES wait, unless the writer has died
            if self.failed.is_set():
                self._raise_failure()
            try:
                self.jobs.put((rows, lines), timeout=0.5)
                return
            except queue.Full:
                continue

    def done(self) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
        """Results of the batches committed so far."""
        out = []
        while True:
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                return out
            if isinstance(item, BaseException):
                raise item
            out.append(item)

    def finish(self) -> list[tuple[int, int, list[tuple[int, str, str]]]]:
        self.jobs.put(None)
        self.thread.join()
        return self.done()

    def _raise_failure(self) -> None:
        self.done()  # raises the writer's exception
        raise RuntimeError("the ingest writer stopped")

    def _run(self) -> None:
        try:
            with _bulk_connection(self.store) as conn:
                while True:
                    job = self.jobs.get()
                    if job is None or self.failed.is_set():
                        return
                    rows, lines = job
                    stored, refused = _store_batch(conn, rows, lines)
                    self.results.put((len(rows), stored, refused))
        except BaseException as exc:  # handed to the reading thread, which raises it
            self.results.put(exc)
            self.failed.set()


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


def _store_batch(conn: Connection, rows: list[dict[str, Any]], lines: list[int]) -> tuple[int, list[tuple[int, str, str]]]:
    """Insert one batch in one transaction; returns (rows that were new, [(line, reason, raw) refused]).
    If the database refuses the batch for a data reason (a value PostgreSQL will not hold), the rows go one
    by one and the refused ones are handed back for quarantine: one odd row does not cost its neighbours."""
    try:
        with conn.begin():
            return insert_ignore(conn, rows), []
    except (DataError, IntegrityError):
        pass
    stored = 0
    refused: list[tuple[int, str, str]] = []
    for row, line in zip(rows, lines):
        try:
            with conn.begin():
                stored += insert_ignore(conn, [row])
        except (DataError, IntegrityError) as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            refused.append((line, f"the store refused this row: {reason}"[:200], json.dumps(row["messages"], ensure_ascii=False)))
    return stored, refused
