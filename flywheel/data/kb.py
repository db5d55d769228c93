"""The knowledge base: approved responses, policies, documents and facts in the "kb" collection of the index.

`flywheel kb add FILE...` reads two formats.

**JSONL** (`.jsonl`): one object per line,
    {"id"?: str, "text": str, "intent"?: str, "kind"?: "approved_response" | "policy" | "doc" | "fact", "title"?: str}
A fact (JSONL only) is a triple: `{"kind": "fact", "head": str, "relation": str, "tail": str, "text"?: str, ...}`, all
three parts non-empty; without a text its text is "{head} {relation} {tail}". Other kinds take no
head, relation or tail. (The knowledge generator, flywheel.synthesis.knowledge, asks questions of facts.)
Unknown keys are refused (a typo such as "intnet" would otherwise silently lose the intent).

**Markdown** (`.md`, `.markdown`, `.txt`): every heading (`#` to `######`) starts a section whose text is
the body below it, up to the next heading of any level; headings inside ``` fences do not count.
Text before the first heading is a section too, titled by the front matter or the file name.
Two ways to set a section's intent and kind:
  - front matter at the top of the file sets defaults for every section:
        ---
        kind: approved_response
        intent: refund_status
        ---
    (plain `key: value` lines; keys: kind, intent, title)
  - attributes at the end of a heading override them for that section, Pandoc style:
        ## Where is my refund? {intent=refund_status kind=approved_response}

Ids: an explicit JSONL "id" is used as given (re-adding it with new content updates that entry);
otherwise the id is a hash of text, kind, intent and title (and a fact's triple), so re-adding a file
adds nothing.
A bad line or section is reported as `file:line: problem`, skipped, and the rest is still added;
a path that does not exist is reported by name; the command then exits non-zero. docs/kb.md has the
user's version of this.

Metadata keys written (the KB corrector filters on them): `kind`, `intent` (absent when unknown),
`title`, `source` (`file:line`), and for a fact `head`, `relation`, `tail`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from flywheel.jsonl import json_objects
from flywheel.records import stable_hash
from flywheel.store.vectors import KB, Hit, VectorIndex

Kind = Literal["approved_response", "policy", "doc", "fact"]
KINDS: tuple[str, ...] = ("approved_response", "policy", "doc", "fact")
TRIPLE: tuple[str, ...] = ("head", "relation", "tail")
MARKDOWN_SUFFIXES = {".md", ".markdown", ".txt"}
JSONL_SUFFIXES = {".jsonl"}

_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")  # CommonMark ATX heading
_ATTRS = re.compile(r"\s*\{([^{}]*)\}\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


class KbEntry(BaseModel):
    """One knowledge-base section as it travels from a file to the index."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    text: str = ""  # required, except for a fact (then built from its triple)
    intent: str | None = None
    kind: Kind = "doc"
    title: str = ""
    source: str = ""  # file:line, filled by the reader
    # a fact's triple, e.g. ("Gold plan", "monthly price", "£12"); only for kind "fact"
    head: str | None = None
    relation: str | None = None
    tail: str | None = None

    @field_validator("text")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("head", "relation", "tail")
    @classmethod
    def _strip_part(cls, value: str | None) -> str | None:
        return " ".join(value.split()) if value is not None else None

    @model_validator(mode="after")
    def _complete(self) -> KbEntry:
        parts = [getattr(self, key) for key in TRIPLE]
        if self.kind == "fact":
            missing = [key for key, part in zip(TRIPLE, parts) if not part]
            if missing:
                raise ValueError(f"a fact needs head, relation and tail; {', '.join(missing)} missing or empty")
            if not self.text:
                self.text = " ".join(str(part) for part in parts)
        elif any(part is not None for part in parts):
            raise ValueError(f"head, relation and tail belong to kind fact, not {self.kind}")
        elif not self.text:
            raise ValueError("text is missing or empty")
        return self

    @field_validator("intent", "id")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    def entry_id(self) -> str:
        if self.id:
            return self.id
        key = {"text": self.text, "kind": self.kind, "intent": self.intent, "title": self.title}
        if self.kind == "fact":  # two facts may share a text; only facts hash their triple, so older ids stay
            key.update({k: getattr(self, k) for k in TRIPLE})
        return "kb-" + stable_hash(key)

    def metadata(self) -> dict[str, str]:
        meta = {"kind": self.kind, "title": self.title, "source": self.source}
        if self.intent:
            meta["intent"] = self.intent
        for key in TRIPLE:  # stored so that synthesis can read the triple back from the index
            value = getattr(self, key)
            if value:
                meta[key] = value
        return meta


class KbSummary(BaseModel):
    files: int = 0
    sections: int = 0  # valid entries read
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[str] = []  # "file:line: problem"
    missing: list[str] = []  # paths given that do not exist: nothing was read from them


# --- readers ----------------------------------------------------------------------------------------------


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


def read_jsonl(path: Path, errors: list[str]) -> Iterator[KbEntry]:
    for line in json_objects(path):
        if line.value is None:  # not a JSON object: line.error says why
            errors.append(f"{line.where}: {line.error}")
        elif "source" in line.value:
            errors.append(f"{line.where}: 'source' is set by flywheel, not by the file")
        else:
            try:
                yield KbEntry.model_validate({**line.value, "source": line.where})
            except ValidationError as exc:
                errors.append(f"{line.where}: {_first_error(exc)}")


def _parse_attrs(raw: str) -> dict[str, str]:
    """`intent=refund kind="approved_response"` -> dict. Pandoc's `#id` and `.class` tokens are ignored."""
    out: dict[str, str] = {}
    for token in re.findall(r'[\w-]+=(?:"[^"]*"|\S+)|\S+', raw):
        if "=" in token:
            key, value = token.split("=", 1)
            out[key.strip()] = value.strip().strip('"')
    return out


def _front_matter(lines: list[str], where: str, errors: list[str]) -> tuple[dict[str, str], int]:
    """Parse a leading `---` block of `key: value` lines. Returns the keys and the first body line index."""
    if not lines or lines[0].strip() != "---":
        return {}, 0
    keys: dict[str, str] = {}
    for index in range(1, len(lines)):
        line = lines[index].strip()
        if line in ("---", "..."):
            return keys, index + 1
        if not line or line.startswith("#"):
            continue
        if ":" not in line:
            errors.append(f"{where}:{index + 1}: front matter line is not 'key: value'")
            continue
        key, value = line.split(":", 1)
        keys[key.strip()] = value.strip().strip("\"'")
    errors.append(f"{where}:1: front matter is not closed with '---'; read as text")
    return {}, 0


def read_markdown(path: Path, errors: list[str]) -> Iterator[KbEntry]:
    lines = path.read_text(encoding="utf-8").splitlines()
    defaults, start = _front_matter(lines, str(path), errors)
    unknown = set(defaults) - {"kind", "intent", "title"}
    if unknown:
        errors.append(f"{path}:1: unknown front matter keys {sorted(unknown)}; expected kind, intent, title")
    defaults = {k: v for k, v in defaults.items() if k not in unknown}

    # A section: (line number of its heading or first line, its attributes, its body lines).
    title = defaults.get("title") or path.stem
    attrs: dict[str, str] = {}
    heading_line = start + 1
    body: list[str] = []
    in_fence = False

    def finish() -> KbEntry | None:
        text = "\n".join(body).strip()
        if not text:
            return None  # a heading with nothing under it (e.g. a chapter title) is not an entry
        fields = {**{k: v for k, v in defaults.items() if k != "title"}, "title": title, **attrs}
        extra = set(fields) - {"kind", "intent", "title", "id"}
        where = f"{path}:{heading_line}"
        if extra:
            errors.append(f"{where}: unknown heading attributes {sorted(extra)}; expected kind, intent, id")
            return None
        try:
            return KbEntry.model_validate({**fields, "text": text, "source": where})
        except ValidationError as exc:
            errors.append(f"{where}: {_first_error(exc)}")
            return None

    for number, line in enumerate(lines[start:], start=start + 1):
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading is None:
            body.append(line)
            continue
        entry = finish()
        if entry is not None:
            yield entry
        text = heading.group(2)
        found = _ATTRS.search(text)
        attrs = _parse_attrs(found.group(1)) if found else {}
        title = text[: found.start()].strip() if found else text.strip()
        heading_line = number
        body = []
    entry = finish()
    if entry is not None:
        yield entry


def read_file(path: Path, errors: list[str]) -> list[KbEntry]:
    """Every valid entry of one file; problems are appended to `errors` as `file:line: problem`."""
    if not path.exists():
        errors.append(f"{path}: no such file")
        return []
    if not path.is_file():
        errors.append(f"{path}: not a file (a folder?); give the files in it")
        return []
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            return list(read_jsonl(path, errors))
        if suffix in MARKDOWN_SUFFIXES:
            return list(read_markdown(path, errors))
    except UnicodeDecodeError as exc:
        errors.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return []
    errors.append(f"{path}: unknown file type {suffix or '(none)'}; expected .jsonl, .md, .markdown or .txt")
    return []


# --- writing to the index ---------------------------------------------------------------------------------


def _same(hit_text: str, hit_meta: dict, entry: KbEntry) -> bool:
    meta = entry.metadata()
    return hit_text == entry.text and all(hit_meta.get(k) == meta.get(k) for k in ("kind", "intent", "title", *TRIPLE))


def add_entries(index: VectorIndex, entries: list[KbEntry], summary: KbSummary) -> None:
    """Upsert entries, counting which are new, changed or already present (those are not re-embedded)."""
    by_id: dict[str, KbEntry] = {}
    for entry in entries:
        by_id[entry.entry_id()] = entry  # the same section twice in one run: the last one wins
    ids = list(by_id)
    existing = {}
    for start in range(0, len(ids), 1000):
        existing.update({hit.id: hit for hit in index.get(KB, ids=ids[start : start + 1000])})
    changed: list[str] = []
    for entry_id in ids:
        hit = existing.get(entry_id)
        if hit is None:
            summary.added += 1
            changed.append(entry_id)
        elif _same(hit.text, hit.metadata, by_id[entry_id]):
            summary.unchanged += 1
        else:
            summary.updated += 1
            changed.append(entry_id)
    index.upsert(KB, changed, [by_id[i].text for i in changed], [by_id[i].metadata() for i in changed])


def add_files(index: VectorIndex, paths: Iterable[Path | str]) -> KbSummary:
    """Load Markdown and JSONL files into the "kb" collection. Bad entries land in `summary.errors`,
    paths that do not exist in `summary.missing` (the other files are still added)."""
    summary = KbSummary()
    entries: list[KbEntry] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():  # a wrong path is not a bad entry: reported apart, by name
            summary.missing.append(str(path))
            continue
        summary.files += 1
        found = read_file(path, summary.errors)
        summary.sections += len(found)
        entries.extend(found)
    add_entries(index, entries, summary)
    return summary


def search(index: VectorIndex, query: str, k: int = 5, kind: str | None = None, intent: str | None = None) -> list[Hit]:
    """The `k` KB sections nearest to `query`, optionally of one kind and/or intent."""
    conditions = [{"kind": kind}] if kind else []
    if intent:
        conditions.append({"intent": intent})
    where = conditions[0] if len(conditions) == 1 else ({"$and": conditions} if conditions else None)
    return index.query(KB, query, k=k, where=where)
