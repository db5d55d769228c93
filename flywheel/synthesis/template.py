"""The "template" generator: slot templates per intent, filled with values the project has seen.

A template is a user sentence with typed slots, `"my {card_type} was charged {amount} twice"`. They come
from two places:
  - the JSONL file `synthesis.templates` (relative to the project folder unless absolute), one
    `{"intent": str, "template": str, "answer"?: str}` per line; slots are `{amount}`, `{date}`,
    `{card_type}`, `{currency}`, `{city}` and braces mean nothing else. A bad line is reported as
    `file:line` and skipped; the rest of the file is still used.
  - the verified samples (seeds): the entities found in a seed's last user turn become slots.
Slot values are the entities seen in the KB and in captured unlabelled traffic (flywheel.synthesis.entities),
topped up with built-in values where the project mentions few or none. Why templates at all: an intent short of verified
samples often has a handful of phrasings that differ only in the values, and those are cheap to vary
without a model.

The answer of a filled template is the template's own, else the intent's most common verified answer,
else the KB's approved response for the intent; a template with none is reported and skipped.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.jsonl import json_objects
from flywheel.records import Message, stable_hash
from flywheel.synthesis.entities import KINDS, find_entities, kb_cities, slot_values, with_defaults
from flywheel.synthesis.records import Generated, GeneratorOutput, GeneratorProblem, Seed, SynthesisInputs

NAME = "template"
SLOT = re.compile(r"\{([^{}]*)\}")
FILE_KEYS = ("intent", "template", "answer")
# Attempts per wanted sample before an intent's templates count as exhausted: a template with few slots
# has few distinct fillings, and the loop must end.
ATTEMPTS_PER_SAMPLE = 20


@dataclass(frozen=True)
class Template:
    intent: str
    text: str  # the user sentence with {slot}s
    source: str  # "file:line", or the id of the seed it was derived from
    answer: str | None = None  # the file's answer; None: the intent's
    seed: Seed | None = None  # the seed it was derived from


# --- prompt helpers (augment and knowledge use them too) --------------------------------------------------


def replace_last_user(messages: Sequence[Message], text: str) -> list[Message]:
    """`messages` with the content of the last user turn replaced (a user turn is added when there is none)."""
    out = list(messages)
    for index in range(len(out) - 1, -1, -1):
        if out[index].role == "user":
            out[index] = out[index].model_copy(update={"content": text})
            return out
    return [*out, Message(role="user", content=text)]


def system_prompt(seeds: Iterable[Seed], intent: str) -> Message | None:
    """A system message for a prompt that has no seed of its own: a seed of the same intent's, else any
    seed's (lowest id first, so the choice does not depend on the order seeds come in)."""
    ordered = sorted(seeds, key=lambda s: (s.intent != intent, s.id))
    return next((m for s in ordered for m in s.messages[:1] if m.role == "system"), None)


def most_common(values: Iterable[str]) -> str | None:
    """The most frequent value; ties go to the smallest, so the answer does not depend on input order."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v)) if counts else None


# --- reading templates ------------------------------------------------------------------------------------


def template_problem(text: str) -> str | None:
    """Why `text` is not a usable template, or None."""
    if not text.strip():
        return "template is empty"
    if "{" in SLOT.sub("", text) or "}" in SLOT.sub("", text):
        return "unbalanced braces (braces only mark slots such as {amount})"
    unknown = [name for name in SLOT.findall(text) if name not in KINDS]
    if unknown:
        return f"unknown slot {{{unknown[0]}}}; slots are {', '.join('{' + k + '}' for k in KINDS)}"
    return None


def _line_problem(value: dict[str, Any]) -> str | None:
    unknown = sorted(set(value) - set(FILE_KEYS))
    if unknown:
        return f"unknown keys {unknown}; expected {', '.join(FILE_KEYS)}"
    if not isinstance(value.get("intent"), str) or not value["intent"].strip():
        return "intent is missing or not a non-empty string"
    if not isinstance(value.get("template"), str):
        return "template is missing or not a string"
    if "answer" in value and (not isinstance(value["answer"], str) or not value["answer"].strip()):
        return "answer is not a non-empty string"
    return template_problem(value["template"])


def read_templates(path: Path, problems: list[GeneratorProblem]) -> list[Template]:
    """Every good template of the file, in line order; each bad line and a missing file is a problem."""
    if not path.is_file():
        problems.append(GeneratorProblem(generator=NAME, source=str(path), problem="synthesis.templates: no such file"))
        return []
    out: list[Template] = []
    for line in json_objects(path):
        problem = line.error if line.value is None else _line_problem(line.value)
        if problem is not None or line.value is None:
            problems.append(GeneratorProblem(generator=NAME, source=line.where, problem=problem or "not a JSON object"))
            continue
        value = line.value
        out.append(Template(intent=value["intent"].strip(), text=value["template"], source=line.where, answer=value.get("answer")))
    return out


def derive_templates(seeds: Iterable[Seed], answers: Mapping[str, str | None], cities: Iterable[str]) -> list[Template]:
    """One template per seed whose last user turn has entities, each entity replaced by its slot.

    An entity that also appears in the intent's answer stays as it is: the answer depends on it, and a
    different value would make the pair wrong. A seed whose text has braces of its own is left out, as
    they would read as slots."""
    known = list(cities)
    out = []
    for seed in sorted(seeds, key=lambda s: s.id):
        text = seed.last_user()
        if not text.strip() or "{" in text or "}" in text:
            continue
        answer = (answers.get(seed.intent) or "").casefold()
        entities = [e for e in find_entities(text, known) if e.text.casefold() not in answer]
        if not entities:
            continue  # nothing to vary: the template would only repeat the seed
        for entity in reversed(entities):  # from the end, so earlier offsets stay valid
            text = text[: entity.start] + "{" + entity.kind + "}" + text[entity.end :]
        out.append(Template(intent=seed.intent, text=text, source=seed.id, seed=seed))
    return out


def templates_path(inputs: SynthesisInputs) -> Path | None:
    raw = inputs.settings.synthesis.templates.strip()
    if not raw:
        return None
    path = Path(raw)
    return path if path.is_absolute() else inputs.settings.project_dir / path


# --- generating -------------------------------------------------------------------------------------------


def _kb_answer(kb: Iterable[Mapping[str, Any]], intent: str) -> str | None:
    approved = sorted((e for e in kb if e.get("kind") == "approved_response" and e.get("intent") == intent), key=lambda e: str(e.get("id")))
    return next((str(e["text"]) for e in approved if str(e.get("text") or "").strip()), None)


def _targets(inputs: SynthesisInputs, intents: Iterable[str]) -> dict[str, int]:
    """How many samples each intent gets: what the stage wants, capped at per_intent; with no wants,
    per_intent for every intent that has templates."""
    cap = inputs.settings.synthesis.per_intent
    if inputs.wants:
        return {intent: min(want, cap) for intent, want in sorted(inputs.wants.items()) if want > 0}
    return {intent: cap for intent in sorted(set(intents))}


def _fill(template: Template, values: Mapping[str, list[str]], rng: random.Random) -> tuple[str, list[list[str]]]:
    filled: list[list[str]] = []

    def pick(match: re.Match[str]) -> str:
        value = rng.choice(values[match.group(1)])
        filled.append([match.group(1), value])
        return value

    return SLOT.sub(pick, template.text), filled


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    output = GeneratorOutput()
    seeds = list(inputs.seeds)
    answers = {
        intent: most_common(s.answer for s in seeds if s.intent == intent and s.answer.strip()) for intent in {s.intent for s in seeds}
    }
    cities = kb_cities(inputs.kb)
    texts = [str(e.get("text") or "") for e in inputs.kb] + [i.last_user_text() for i in inputs.unlabelled]
    values = with_defaults(slot_values(texts, cities))

    path = templates_path(inputs)
    templates = read_templates(path, output.problems) if path is not None else []
    templates += derive_templates(seeds, answers, cities)

    for intent, wanted in _targets(inputs, (t.intent for t in templates)).items():
        answer = answers.get(intent) or _kb_answer(inputs.kb, intent)
        usable = []
        for template in (t for t in templates if t.intent == intent):
            if template.answer is None and answer is None:
                output.problems.append(
                    GeneratorProblem(
                        generator=NAME,
                        source=template.source,
                        problem=f"no answer for intent {intent!r}: the template has none, no verified sample has one and the KB has no approved_response",
                    )
                )
            else:
                usable.append(template)
        if not usable:
            continue
        problem_type = most_common(s.problem_type for s in seeds if s.intent == intent) or "synthetic"
        system = system_prompt(seeds, intent)
        # a verified sentence is never re-emitted as a synthetic one
        seen = {s.last_user() for s in seeds if s.intent == intent}
        rng = random.Random(int(stable_hash([inputs.seed, NAME, intent]), 16))
        made = 0
        for attempt in range(wanted * ATTEMPTS_PER_SAMPLE):
            if made >= wanted:
                break
            template = usable[attempt % len(usable)]  # round robin: every template gets its turn
            text, filled = _fill(template, values, rng)
            if text in seen:
                continue
            seen.add(text)
            if template.seed is not None:
                messages = replace_last_user(template.seed.messages, text)
            else:
                messages = [*([system] if system else []), Message(role="user", content=text)]
            output.samples.append(
                Generated(
                    generator=NAME,
                    params={"template": template.text, "slots": filled},
                    source_id=template.source,
                    source_text=template.seed.last_user() if template.seed else template.text,
                    intent=intent,
                    problem_type=problem_type,
                    messages=messages,
                    answer=template.answer if template.answer is not None else str(answer),
                )
            )
            made += 1
    return output
