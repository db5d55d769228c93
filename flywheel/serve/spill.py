"""Spill files: where capture keeps what the store cannot take right now (flywheel.serve.capture).

Append-only JSON Lines of already scrubbed entries, one file per writing process:
    {"t": "i", "row": {...}}    an interactions row as `build_row` made it (timestamps as ISO 8601)
    {"t": "f", "item": {...}}   a feedback event
A file a live process is still appending to holds an exclusive flock, so another gateway sharing the
folder does not replay it early; `rotate()` closes it so that this process can replay it.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from flywheel.serve.feedback import FeedbackItem

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no cross-process spill locking
    fcntl = None  # type: ignore[assignment]  # None marks "no fcntl here", checked in lock_nonblocking

ROW_TIMES = ("timestamp", "ingested_at")


class SpillFiles:
    """Append-only JSON Lines files of scrubbed entries: {"t": "i", "row": {...}} or {"t": "f", "item": {...}}."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.Lock()
        self._active: IO[bytes] | None = None
        self._active_path: Path | None = None

    def append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        with self._lock:
            if self._active is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._active_path = self.folder / f"spill-{time.time_ns()}-{os.getpid()}.jsonl"
                self._active = open(self._active_path, "ab")
                lock_nonblocking(self._active)
            self._active.write(b"".join(lines))
            self._active.flush()  # in the OS's hands: survives a crash of this process

    def rotate(self) -> None:
        """Close the file being appended to, so that it can be replayed; the next spill opens a new one."""
        with self._lock:
            if self._active is not None:
                self._active.close()
                self._active = None
                self._active_path = None

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob("spill-*.jsonl"), key=lambda p: p.name)

    def pending(self) -> bool:
        return bool(self.files())

    def close(self) -> None:
        self.rotate()


def encode(kind: str, payload: dict[str, Any]) -> bytes:
    return orjson.dumps({"t": kind, ("row" if kind == "i" else "item"): payload}) + b"\n"


def decode(line: bytes) -> tuple[str, Any]:
    entry = orjson.loads(line)
    if entry["t"] == "i":
        row = entry["row"]
        for key in ROW_TIMES:
            if row.get(key):
                row[key] = datetime.fromisoformat(row[key])
        return "i", row
    item = entry["item"]
    item["created_at"] = datetime.fromisoformat(item["created_at"])
    return "f", FeedbackItem(**item)


def lock_nonblocking(handle: IO[bytes]) -> bool:
    """Take an exclusive lock on an open file; False when another open file (this or another process) holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
