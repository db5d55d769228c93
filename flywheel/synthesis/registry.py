"""The generators by name, like the selection strategies: `flywheel synthesize --generator NAME` and
`synthesis.generators` pick from these.

Each entry is "module:function"; a generator module is imported only when it runs, so the LLM one
costs nothing offline and no generator module imports another through here.
"""

from __future__ import annotations

from importlib import import_module

from flywheel.errors import UserInputError
from flywheel.synthesis.records import Generator

GENERATORS: dict[str, str] = {
    "template": "flywheel.synthesis.template:generate",  # slot templates per intent
    "augment": "flywheel.synthesis.augment:generate",  # entity swaps, rewrites, adversarial noise of verified samples
    # the same variants of stable production answers of well-served intents next to the short ones
    "neighbours": "flywheel.synthesis.neighbours:generate",
    "mining": "flywheel.synthesis.mining:generate",  # unlabelled traffic near verified samples, pseudo-labelled
    "knowledge": "flywheel.synthesis.knowledge:generate",  # KB entries and triples as question-answer pairs
    "toolcalls": "flywheel.synthesis.toolcalls:generate",  # staged tool-call rows from tool-calling traffic
    "llm": "flywheel.synthesis.llm_generate:generate",  # new turns from an LLM (llm.base_url)
}


def check_names(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in GENERATORS]
    if unknown:
        raise UserInputError(f"unknown generator {unknown[0]!r}; choose from {', '.join(GENERATORS)}")
    return names


def get(name: str) -> Generator:
    check_names([name])
    module, _, function = GENERATORS[name].partition(":")
    fn: Generator = getattr(import_module(module), function)
    return fn
