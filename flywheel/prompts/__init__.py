"""Prompt templates as package data files, loaded by name.

A prompt's version is the hash of its text, so every verdict and correction records exactly which
prompt produced it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from flywheel.errors import SettingsError

_SLOT = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def fill(template: str, values: dict[str, str]) -> str:
    """Fill `{name}` slots in one pass over the template, so that a slot name inside an inserted value (a
    logged message containing "{knowledge}") is never itself filled. Unknown slots stay as they are."""
    return _SLOT.sub(lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), template)


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def version(self) -> str:
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:10]}"

    def render(self, **values: str) -> str:
        """Fill `{name}` slots. Values are inserted as they are: callers wrap untrusted text in
        delimited blocks first (see flywheel.prompts.fence.untrusted_block)."""
        return fill(self.text, values)


@lru_cache(maxsize=64)
def load_prompt(name: str) -> Prompt:
    path = resources.files("flywheel.prompts").joinpath(f"{name}.md")
    if not path.is_file():
        raise SettingsError("prompt", f"no prompt named {name!r} in flywheel/prompts")
    return Prompt(name=name, text=path.read_text(encoding="utf-8"))
