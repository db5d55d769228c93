"""Ingest: files of logged conversations -> validated, PII-scrubbed rows in the interaction store.

    ingest_files(store, settings, [Path("logs.jsonl")], fmt="auto") -> IngestSummary

What it promises:
- Streaming: a file is read in chunks and split into lines in binary (each line decoded on its own, so one
  line of invalid UTF-8 is one quarantined line); rows go to the store in batches of BATCH_ROWS, one
  transaction each (store.interactions.insert_ignore: sqlite3's executemany on SQLite, COPY into a staging
  table and one INSERT ... ON CONFLICT DO NOTHING on PostgreSQL); memory stays flat in the file size.
- Nothing is lost on interruption: counts are reported only after their batch committed, and re-ingesting
  the same file adds nothing (store.interactions.insert_ignore skips known ids and content hashes).
- Bad input never stops a file: a malformed line, a wrong type, an unknown role, an oversized message,
  invalid UTF-8 or an id already stored with other content (`id_conflict`) goes to the quarantine file
  (settings.quarantine_path) with file, line and reason, and is counted. A missing file is reported and
  the other files are still ingested.
- A bad line is quarantined once: re-ingesting a file counts the bad lines the quarantine already holds as
  `already_quarantined` and appends nothing, so a scheduled re-run is clean unless something new is bad.
- PII is scrubbed (flywheel.data.pii) from message content, tool-call arguments and complaint text before
  the content hash is computed and before anything is stored, the quarantine file included.

How: flywheel.data.batches turns a file into batches (reading, mapping the shape, validating, scrubbing);
this module stores them. For a large file on a machine with two cores or more, a helper process builds every
other batch while this one builds the rest and writes them all (flywheel.data.parallel; a writer thread was
tried first: the two threads convoyed on the GIL and it ran slower than one).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from hashlib import sha256
from pathlib import Path
from typing import IO, Any

from pydantic import Field
from sqlalchemy import Connection
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from flywheel.data.batches import RAW_PREFIX_CHARS, BadRecord, Batch, BatchReader
from flywheel.data.formats import FORMATS
from flywheel.data.parallel import batches as built_batches
from flywheel.data.parallel import fewer_gc_passes
from flywheel.data.rows import BadLine, build_row  # noqa: F401 - serve.capture imports these from here
from flywheel.errors import UserInputError
from flywheel.records import Record, utcnow
from flywheel.settings import Settings
from flywheel.store.db import Store
from flywheel.store.interactions import holders, insert_prepared, plan_for

BATCH_ROWS = 2000
# Files at least this large are shared with a helper process: below it the process start (~0.3 s of
# imports) costs more than it saves.
PARALLEL_MIN_BYTES = 16 << 20
ID_CONFLICT = "id_conflict"  # the quarantine kind of a line whose id the store holds with other content


class FileSummary(Record):
    path: str
    read: int = 0  # non-blank lines (or JSON array items)
    stored: int = 0  # new rows, committed
    duplicates: int = 0  # rows the store already held (same id and content, or same content under another id)
    quarantined: int = 0  # bad lines written to the quarantine by this run
    conflicts: int = 0  # of those, lines whose id the store holds with other content (kind id_conflict)
    already_quarantined: int = 0  # bad lines the quarantine held from an earlier run: not written again
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
    def conflicts(self) -> int:
        return sum(f.conflicts for f in self.files)

    @property
    def already_quarantined(self) -> int:
        return sum(f.already_quarantined for f in self.files)

    @property
    def failed_files(self) -> int:
        return sum(1 for f in self.files if f.error)

    @property
    def clean(self) -> bool:
        """True when every file was read and no line was newly quarantined: each was stored, a duplicate,
        or a bad line an earlier run had quarantined already (that one was reported then)."""
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
    batch with the file's counts so far (everything it reports is durable). `parallel`: share the parsing with
    a helper process (flywheel.data.parallel); None decides by the file's size and the cores (_parallel_pays)."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    summary = IngestSummary(quarantine_path=str(settings.quarantine_path))
    quarantine = _Quarantine(settings.quarantine_path, [_quarantine_name(path) for path in paths])
    try:
        with fewer_gc_passes():
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
                shared = parallel if parallel is not None else _parallel_pays(size)
                reader = BatchReader(path, fmt, settings.policies.max_message_chars, batch_rows, store.engine.dialect.name)
                # Before any batch exists (a helper process starts building them right away): every row of
                # this file is stored with an ingest time at or after it.
                started = utcnow()
                try:
                    with closing(built_batches(reader, shared)) as batches:  # closed early too: the helper ends with it
                        _store_file(store, batches, counts, quarantine, on_progress, started)
                except OSError as exc:
                    counts.error = f"cannot read: {exc.strerror or exc}"
    finally:
        quarantine.close()
    return summary


def _parallel_pays(size: int) -> bool:
    """Sharing the parsing with a helper process pays for a large file on two cores or more. With a free core
    both processes parse: about 6 s of CPU each for 200,000 conversations on SQLite, 4.5-5 on PostgreSQL,
    where one process alone needs 10 and 7.5-8. On a machine other work keeps busy it costs a little: on
    this project's 2 cores at load 2.3-3.4, bench/ingest.py measured SQLite 15.2-17.0k rows/s in parallel
    against 17.1-17.7k in one process, PostgreSQL 13.6-19.7k against 15.0-17.0k. The load average does not
    tell the two apart (it lags a minute and counts finished work), so it is not consulted."""
    return size >= PARALLEL_MIN_BYTES and (os.cpu_count() or 1) >= 2


def _store_file(
    store: Store, batches: Iterator[Batch], counts: FileSummary, quarantine: _Quarantine, on_progress: Progress | None, started: datetime
) -> None:
    reasons: Counter[str] = Counter()
    formats: Counter[str] = Counter()  # each batch counts its own lines and placeholders: summed here
    pii: Counter[str] = Counter()
    name = _quarantine_name(Path(counts.path))

    def bad_line(bad: BadRecord) -> None:
        if not quarantine.write(name, bad):
            counts.already_quarantined += 1
            return
        counts.quarantined += 1
        counts.conflicts += bad.kind == ID_CONFLICT
        reasons[bad.kind] += 1

    with _bulk_connection(store) as conn:
        for batch in batches:
            for bad in batch.bad:
                bad_line(bad)
            counts.read += batch.read
            if batch.rows:
                stored, refused = _store_batch(conn, batch.rows, batch.lines, since=started)
                counts.stored += stored
                counts.duplicates += len(batch.rows) - stored - len(refused)
                for bad in refused:
                    bad_line(bad)
            quarantine.flush()
            formats.update(batch.formats)
            pii.update(batch.pii)
            counts.formats = dict(formats)
            counts.pii = dict(pii)
            counts.reasons = dict(reasons)
            if on_progress is not None:
                on_progress(counts.model_copy())


# --- storing ---------------------------------------------------------------------------------------------------


def _quarantine_name(path: Path) -> str:
    """How the quarantine names a file: absolute, so that a re-run from another folder matches its entries."""
    return str(path.absolute())


class _Quarantine:
    """Appends bad lines to the quarantine file, JSON Lines: file (absolute), line, kind, reason, raw (a
    scrubbed prefix of the line), at.

    Each bad line goes in once. Its key is the file, the line number and a hash of its kind and raw text:
    the raw text is what the quarantine keeps of the line's content (scrubbed, up to 2,000 characters), so
    the file itself is the record of what was quarantined, with no table to keep in step. The entries of
    this run's files are read back on the first bad line, so a clean run does not read the file at all."""

    def __init__(self, path: Path, files: list[str]):
        self.path = path
        self._files = set(files)
        self._known: set[tuple[str, int, bytes]] | None = None
        self._handle: IO[str] | None = None

    def write(self, file: str, bad: BadRecord) -> bool:
        """Append `bad` unless the quarantine holds it already; True when it was appended."""
        if self._known is None:
            self._known = self._read_known()
        key = _quarantine_key(file, bad.line, bad.kind, bad.raw)
        if key in self._known:
            return False
        self._known.add(key)  # the same file named twice in one run is quarantined once too
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")
        record = {"file": file, "line": bad.line, "kind": bad.kind, "reason": bad.reason, "raw": bad.raw, "at": utcnow().isoformat()}
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return True

    def _read_known(self) -> set[tuple[str, int, bytes]]:
        known: set[tuple[str, int, bytes]] = set()
        # A cheap substring test skips the entries of other files before they are parsed.
        needles = [f'"file": {json.dumps(name, ensure_ascii=False)}' for name in self._files]
        try:
            handle = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return known
        with handle:
            for text in handle:
                if not any(needle in text for needle in needles):
                    continue
                try:
                    entry = json.loads(text)
                    known.add(_quarantine_key(entry["file"], entry["line"], entry["kind"], entry["raw"]))
                except (ValueError, KeyError, TypeError):
                    continue  # an entry cut short by a kill or edited by hand matches nothing: its line is written again
        return known

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


def _quarantine_key(file: str, line: int, kind: str, raw: str) -> tuple[str, int, bytes]:
    return file, line, sha256(f"{kind}\0{raw}".encode("utf-8", "surrogatepass")).digest()


def _store_batch(conn: Connection, rows: list[list[Any]], lines: list[int], *, since: datetime) -> tuple[int, list[BadRecord]]:
    """Insert one batch (each row as its values: flywheel.data.batches); returns (rows that were new, the rows for the quarantine): those the store refused
    and those whose id it holds with other content. `since`: when this file's ingest began, which tells a
    row stored from this file from one stored earlier."""
    stored, refused = _insert_batch(conn, rows, lines)
    if stored + len(refused) < len(rows):  # some rows were skipped: duplicates, or ids held by other content
        refused += _id_conflicts(conn, rows, lines, {bad.line for bad in refused}, since)
    return stored, refused


def _id_conflicts(conn: Connection, rows: list[list[Any]], lines: list[int], refused: set[int], since: datetime) -> list[BadRecord]:
    """The rows whose id the store holds with another content hash: the same id for two different
    conversations. Not a duplicate, and not stored: the earlier copy keeps the id, this one is quarantined."""
    at = plan_for(conn.dialect.name).position
    id_at, hash_at, source_at = at["id"], at["content_hash"], at["source"]
    with conn.begin():
        held = holders(conn, [row[id_at] for row in rows], since)
    conflicts = []
    for row, line in zip(rows, lines):
        row_id = row[id_at]
        digest, source, recent = held.get(row_id, (row[hash_at], "", False))
        if digest == row[hash_at] or line in refused:
            continue
        where, _, earlier_line = source.rpartition(":")
        if recent and where == row[source_at].rpartition(":")[0]:
            reason = f"id {row_id!r} was already used by line {earlier_line} of this file, with different content"
        elif source:
            reason = f"id {row_id!r} is already stored with different content (from {source}{'' if recent else ', an earlier ingest'})"
        else:
            reason = f"id {row_id!r} is already stored with different content"
        conflicts.append(BadRecord(line, ID_CONFLICT, reason, _raw(conn, row)))
    return conflicts


def _raw(conn: Connection, row: list[Any]) -> str:
    """A row's quarantine copy: its messages (already scrubbed), written as json.dumps writes them."""
    messages = json.loads(row[plan_for(conn.dialect.name).position["messages"]])
    return json.dumps(messages, ensure_ascii=False)[:RAW_PREFIX_CHARS]


def _insert_batch(conn: Connection, rows: list[list[Any]], lines: list[int]) -> tuple[int, list[BadRecord]]:
    """Insert one batch in one transaction; returns (rows that were new, the rows the store refused).
    If the database refuses the batch for a data reason (a value PostgreSQL will not hold), the rows go one
    by one and the refused ones come back for the quarantine: one odd row does not cost its neighbours."""
    try:
        with conn.begin():
            return insert_prepared(conn, rows), []
    except (DataError, IntegrityError):
        pass
    stored = 0
    refused: list[BadRecord] = []
    for row, line in zip(rows, lines):
        try:
            with conn.begin():
                stored += insert_prepared(conn, [row])
        except (DataError, IntegrityError) as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            refused.append(BadRecord(line, "store_refused", f"the store refused this row: {reason}"[:200], _raw(conn, row)))
    return stored, refused
