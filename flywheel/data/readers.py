"""Reading input files as a stream of raw records: JSON Lines (plain or .gz) or one JSON array.

Each reader yields (line or item number, raw bytes); memory stays flat in the file size. A line longer than
the limit is yielded as None (and skipped without being held in memory); a JSON array that cannot be
delimited raises BadLine for the item where it broke.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from flywheel.data.rows import BadLine


def open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # the caller closes it


CHUNK_BYTES = 1 << 20


def read_lines(handle: io.BufferedIOBase, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes without the newline) for each line; None for a line over `max_bytes`, which
    is skipped without being held in memory. Reads 1 MB chunks and splits them in C: a readline() call per
    line cost more than parsing the line's JSON."""
    number = 0
    carry = b""  # the unfinished line at the end of the last chunk
    skipping = False  # inside an oversized line: drop bytes up to its newline
    while True:
        chunk = handle.read(CHUNK_BYTES)
        if not chunk:
            break
        parts = chunk.split(b"\n")
        last = parts.pop()  # after the last newline: unfinished (b"" when the chunk ended with one)
        for part in parts:
            number += 1
            if skipping:
                skipping = False
                yield number, None
                continue
            if carry:
                part = carry + part
                carry = b""
            yield number, (part if len(part) <= max_bytes else None)
        if skipping:
            continue
        carry = carry + last if parts == [] else last
        if len(carry) > max_bytes:
            carry = b""
            skipping = True
    if skipping or carry:
        number += 1
        yield number, None if skipping else (carry if len(carry) <= max_bytes else None)


def read_json_array(handle: io.BufferedIOBase, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(item number, raw JSON text of the item) for a file holding one JSON array, read in chunks so that
    memory stays flat. An item that cannot be delimited ends the file (a BadLine for that item)."""
    decoder = json.JSONDecoder()
    text_decoder = codecs.getincrementaldecoder("utf-8")("strict")
    buffer = ""
    eof = False
    number = 0
    pos = 0

    def fill() -> bool:
        nonlocal buffer, pos, eof
        chunk = handle.read(1 << 20)
        if not chunk:
            eof = True
            buffer = buffer[pos:] + text_decoder.decode(b"", final=True)
        else:
            try:
                buffer = buffer[pos:] + text_decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise BadLine("invalid_utf8", f"invalid UTF-8 in JSON array after item {number}: {exc.reason}") from None
        pos = 0
        return not eof

    fill()
    while pos < len(buffer) and buffer[pos].isspace():
        pos += 1
    if not buffer[pos : pos + 1] == "[":
        raise BadLine("malformed_json", "the file starts with neither a JSON object per line nor a JSON array")
    pos += 1
    while True:
        while True:  # skip whitespace and commas between items
            while pos < len(buffer) and (buffer[pos].isspace() or buffer[pos] == ","):
                pos += 1
            if pos < len(buffer) or eof or not fill():
                break
        if pos >= len(buffer) or buffer[pos] == "]":
            return
        number += 1
        while True:
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as exc:
                if not eof and len(buffer) - pos < max_bytes:
                    fill()
                    continue
                raise BadLine("malformed_json", f"item {number}: {exc.msg} (the rest of the array cannot be read)") from None
            break
        yield number, buffer[pos:end].encode("utf-8")
        pos = end


def looks_like_array(path: Path) -> bool:
    with open_binary(path) as handle:
        head = handle.read(64).lstrip()
    return head.startswith(b"[")
