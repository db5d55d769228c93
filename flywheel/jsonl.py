"""Reading JSON Lines files of objects (knowledge base, replay rows, test sets), one line at a time.

Each caller decides what a bad line means (skip and report it, or stop); this only says which line is
bad and why, in the `file:line: reason` form every flywheel error uses. The log ingester has its own,
faster reader (flywheel.data.ingest), which also survives invalid UTF-8 line by line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class JsonLine:
    number: int
    where: str  # "path:number"
    value: dict[str, Any] | None  # the object, when the line holds one
    error: str | None  # why not, otherwise


def json_objects(path: Path) -> Iterator[JsonLine]:
    """Every non-blank line of `path`, parsed; a line that is not a JSON object carries an error instead."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield JsonLine(number, where, None, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(value, dict):
                yield JsonLine(number, where, None, f"expected a JSON object, got {type(value).__name__}")
                continue
            yield JsonLine(number, where, value, None)
