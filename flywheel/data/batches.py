"""One input file -> batches of validated, PII-scrubbed store rows and the bad lines between them.

Everything ingest does before the store: read (flywheel.data.readers), parse, detect the shape and map it
(flywheel.data.formats), validate and scrub (flywheel.data.rows), and turn each row into the values the
store's bulk insert takes (flywheel.store.interactions.plan_for: JSON and, on SQLite, datetimes as text).
No database here, so the same code runs in the ingest process and in a helper process, each building its
share of a file's batches (`share`; flywheel.data.parallel), and a batch pickles small: flat lists of
strings and numbers, which unpickle about five times faster than the row dicts with their nested messages
(and the writing process has no converting left).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from flywheel.data.formats import MappingError, detect, to_flat
from flywheel.data.pii import Scrubber
from flywheel.data.readers import looks_like_array, open_binary, read_json_array, read_lines
from flywheel.data.rows import BadLine, build_row
from flywheel.records import utcnow
from flywheel.store.interactions import plan_for

RAW_PREFIX_CHARS = 2000  # how much of a bad line the quarantine keeps


@dataclass
class BadRecord:
    line: int  # 0: the file as a whole (a JSON array that cannot be read on)
    kind: str  # groups reasons in the summary: malformed_json, unknown_role, oversized, ...
    reason: str
    raw: str  # a PII-scrubbed prefix of the line


@dataclass
class Batch:
    rows: list[list[Any]] = field(default_factory=list)  # each row's values, in plan_for(dialect) column order
    lines: list[int] = field(default_factory=list)  # the line of each row
    bad: list[BadRecord] = field(default_factory=list)
    read: int = 0  # non-blank lines covered by this batch
    # Per batch, not per file, so that batches built in different processes add up (the ingest sums them).
    formats: dict[str, int] = field(default_factory=dict)  # lines of this batch per shape
    pii: dict[str, int] = field(default_factory=dict)  # placeholders written in this batch, per kind


class BatchReader:
    """Iterate a file as batches of at most `batch_rows` rows (or as many bad lines).

    With `share=(first, end, period)` (period > 1) it builds only its share of a JSON Lines file: the file is
    cut into chunks of `batch_rows` lines, chunk k is this reader's when first <= k % period < end, and each
    chunk is one batch (empty when its lines are blank). Readers with shares that cover 0..period, one per
    process, build every batch once; taking chunk 0, 1, 2, ... from whichever reader has it gives the
    batches in file order."""

    def __init__(
        self, path: Path, fmt: str, max_chars: int, batch_rows: int, dialect: str = "sqlite", share: tuple[int, int, int] = (0, 1, 1)
    ):
        self.path = path
        self.dialect = dialect  # the store's dialect name: how rows become values (pickles; a plan does not)
        self.fmt = fmt
        self.max_chars = max_chars
        self.batch_rows = batch_rows
        # A line holds a few messages; anything far beyond that is refused before it is parsed.
        self.max_line_bytes = max(1 << 20, 64 * max_chars)
        self.source_name = path.name[-300:]
        self.scrubber = Scrubber()
        self.formats: Counter[str] = Counter()
        self.share = share

    def part(self, first: int, end: int, period: int) -> BatchReader:
        """A reader of the same file for the chunks k with first <= k % period < end."""
        return BatchReader(self.path, self.fmt, self.max_chars, self.batch_rows, self.dialect, (first, end, period))

    def shareable(self) -> bool:
        """Whether the file can be shared among readers: JSON Lines can be cut anywhere at a newline, a JSON
        array only by parsing it from the start."""
        return not looks_like_array(self.path)

    def __iter__(self) -> Generator[Batch]:
        if self.share[2] > 1:
            yield from self._my_chunks()
            return
        plan = plan_for(self.dialect)
        batch = Batch()
        rows: list[dict[str, Any]] = []
        now = utcnow()
        with open_binary(self.path) as handle:
            reader = (
                read_json_array(handle, self.max_line_bytes) if looks_like_array(self.path) else read_lines(handle, self.max_line_bytes)
            )
            try:
                for line_no, raw in reader:
                    row = self._row(batch, line_no, raw, now)
                    if row is not None:
                        rows.append(row)
                        batch.lines.append(line_no)
                    if len(rows) >= self.batch_rows or len(batch.bad) >= self.batch_rows:
                        yield self._close(batch, plan.values(rows))
                        batch = Batch()
                        rows = []
                        now = utcnow()
            except BadLine as exc:  # a JSON array that cannot be read on
                batch.bad.append(BadRecord(0, exc.kind, str(exc), ""))
        yield self._close(batch, plan.values(rows))

    def _my_chunks(self) -> Generator[Batch]:
        """This reader's share: a batch for each of its chunks of `batch_rows` lines. The other chunks' lines
        are read and passed over (splitting lines costs about a fiftieth of parsing them)."""
        plan = plan_for(self.dialect)
        first, end, period = self.share
        size = self.batch_rows
        mine = False
        batch = Batch()
        rows: list[dict[str, Any]] = []
        now = utcnow()
        with open_binary(self.path) as handle:
            for line_no, raw in read_lines(handle, self.max_line_bytes):
                if (line_no - 1) % size == 0:  # the first line of a chunk
                    if mine:
                        yield self._close(batch, plan.values(rows))
                    mine = first <= (line_no - 1) // size % period < end
                    if mine:
                        batch, rows, now = Batch(), [], utcnow()
                if mine:
                    row = self._row(batch, line_no, raw, now)
                    if row is not None:
                        rows.append(row)
                        batch.lines.append(line_no)
        if mine:
            yield self._close(batch, plan.values(rows))

    def _close(self, batch: Batch, values: list[list[Any]]) -> Batch:
        batch.rows = values
        batch.formats = dict(self.formats)
        batch.pii = dict(self.scrubber.counts)
        self.formats.clear()
        self.scrubber.counts.clear()
        return batch

    def _bad(self, batch: Batch, line: int, kind: str, reason: str, raw: bytes | None) -> None:
        text = "" if raw is None else raw[: RAW_PREFIX_CHARS * 4].decode("utf-8", errors="backslashreplace")[:RAW_PREFIX_CHARS]
        # The quarantine is storage too: its copy of the line is scrubbed like everything else.
        batch.bad.append(BadRecord(line, kind, reason, self.scrubber.text(text.replace("\x00", "\\u0000"))))

    def _row(self, batch: Batch, line_no: int, raw: bytes | None, now: Any) -> dict[str, Any] | None:
        """The store row for one raw line, or None (blank, or bad and recorded in the batch)."""
        if raw is None:
            batch.read += 1
            self._bad(batch, line_no, "oversized", f"line is over {self.max_line_bytes} bytes", None)
            return None
        if not raw.strip():
            return None
        batch.read += 1
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as uexc:
                self._bad(batch, line_no, "invalid_utf8", f"invalid UTF-8 at byte {uexc.start}", raw)
            else:
                self._bad(batch, line_no, "malformed_json", f"not valid JSON: {exc}"[:200], raw)
            return None
        if b"\\u0000" in raw:  # JSON's escape for NUL: PostgreSQL cannot store NUL in text
            self._bad(batch, line_no, "nul_character", "the line contains a NUL character (\\u0000)", raw)
            return None
        if type(obj) is not dict:
            self._bad(batch, line_no, "wrong_type", f"expected a JSON object, got a JSON {type(obj).__name__}", raw)
            return None
        try:
            kind = detect(obj) if self.fmt == "auto" else self.fmt
            source = f"{self.source_name}:{line_no}" if kind == "openai" else f"{kind}:{self.source_name}:{line_no}"
            row = build_row(to_flat(obj, kind), self.scrubber, self.max_chars, source, now)
        except BadLine as exc:
            self._bad(batch, line_no, exc.kind, str(exc), raw)
            return None
        except MappingError as exc:
            self._bad(batch, line_no, "unmappable", str(exc), raw)
            return None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            # an export record of an unexpected shape: quarantined with what went wrong, not a crash
            shape = self.fmt if self.fmt != "auto" else "record"
            self._bad(batch, line_no, "unmappable", f"cannot read this {shape}: {type(exc).__name__}: {exc}"[:200], raw)
            return None
        self.formats[kind] += 1
        return row
