"""Prompt templates as package data files, loaded by name.

A prompt's version is the hash of its text, so every verdict and correction records exactly which
prompt produced it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from flywheel.errors import SettingsError


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str

    @property
    def version(self) -> str:
        return f"{self.name}@{hashlib.sha256(self.text.encode()).hexdigest()[:10]}"

    def render(self, **values: str) -> str:
        """Fill `{name}` slots. Values are inserted as they are: callers wrap untrusted text in
        delimited blocks first (see flywheel.evals.judge.untrusted_block)."""
        text = self.text
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text


@lru_cache(maxsize=64)
def load_prompt(name: str) -> Prompt:
    path = resources.files("flywheel.prompts").joinpath(f"{name}.md")
    if not path.is_file():
        raise SettingsError("prompt", f"no prompt named {name!r} in flywheel/prompts")
    return Prompt(name=name, text=path.read_text(encoding="utf-8"))
