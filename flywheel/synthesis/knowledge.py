"""The "knowledge" generator: knowledge-base entries turned into question-answer pairs.

The KB (flywheel.data.kb) holds what the project already states as true: approved responses per
intent, reference docs, and facts as (head, relation, tail) triples. A model that answers wrong on
these is missing knowledge it was given, so each entry becomes training questions:
  - approved_response: three questions about its title, answered by its text exactly as written (it
    may be a JSON answer: it is copied verbatim, never reformatted);
  - doc: two questions about its title, answered by its text;
  - fact: "What is the {relation} of {head}?" answered by a sentence, and the inverse question where
    it reads well and has one answer (no other fact gives the same relation and tail another head);
  - policy: nothing: a policy is a rule for whoever answers, not an answer to a user.
A fact missing a part is reported with the entry's id and source, and skipped. Samples take the
entry's intent, or "knowledge" without one, and the problem type "missing_knowledge"; entries are read in
id order and each intent stops at synthesis.per_intent (or what the stage wants of it, if less).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flywheel.records import Message
from flywheel.synthesis.records import Generated, GeneratorOutput, GeneratorProblem, Seed, SynthesisInputs
from flywheel.synthesis.template import system_prompt

NAME = "knowledge"
PROBLEM_TYPE = "missing_knowledge"  # the taxonomy's type for an answer that lacks what the KB states
DEFAULT_INTENT = "knowledge"

# {topic}: a title that names a subject ("Refund policy")
TOPIC_FORMS = ("I have a question about {topic}.", "Can you help me with {topic}?", "What can you tell me about {topic}?")
# {question}: a title that is itself a question ("Where is my refund?"): asked as it is, and in two other ways
QUESTION_FORMS = ("{question}", "Quick question: {question}", "Hi, I was wondering: {question}")
PHRASINGS = {"approved_response": 3, "doc": 2}  # a doc is reference text rather than a reply: fewer questions
COPULAS = ("is", "are", "was", "were")
# relations that are a verb in the third person: the question needs its base form ("What does X accept?")
VERBS = {
    "accepts": "accept",
    "allows": "allow",
    "charges": "charge",
    "costs": "cost",
    "covers": "cover",
    "has": "have",
    "includes": "include",
    "offers": "offer",
    "owns": "own",
    "provides": "provide",
    "requires": "require",
    "serves": "serve",
    "ships": "ship",
    "supports": "support",
    "uses": "use",
}
MAX_INVERSE_TAIL_WORDS = 6  # a long tail ("a refund within 5 days of ...") makes an inverse question nobody asks


def _words(relation: str) -> str:
    """ "opening_hours" and "openingHours" read as "opening hours"."""
    spaced = re.sub(r"(?<=[a-z])([A-Z])(?=[a-z])", lambda m: " " + m.group(1).lower(), relation)
    return " ".join(spaced.replace("_", " ").replace("-", " ").split())


def _sentence(text: str) -> str:
    return text.rstrip(" .") + "."


def _be(noun: str) -> str:
    last = noun.split()[-1] if noun.split() else noun
    return "are" if last.endswith("s") and not last.endswith(("ss", "us", "is")) else "is"


def fact_pairs(head: str, relation: str, tail: str, inverse: bool) -> list[tuple[str, str, str]]:
    """(direction, question, answer) for one triple; the inverse only when `inverse` and it reads well."""
    rel = _words(relation)
    first, _, rest = rel.partition(" ")
    if first.lower() == "has" and rest:  # "has capital": the noun after it is the relation
        first, rel = "", rest
    if first.lower() in COPULAS and rest:  # "is the capital of", "is located in"
        answer = _sentence(f"{head} {rel} {tail}")
        pairs = [("forward", f"What {first.lower()} {head} {rest}?", answer)]
        back = ("inverse", f"What {first.lower()} {rest} {tail}?", answer)
    elif first.lower() in VERBS:  # "accepts", "ships to"
        answer = _sentence(f"{head} {rel} {tail}")
        pairs = [("forward", f"What does {head} {' '.join([VERBS[first.lower()], rest]).strip()}?", answer)]
        back = ("inverse", f"What {rel} {tail}?", answer)
    else:  # a noun: "capital", "opening hours"
        answer = _sentence(f"The {rel} of {head} {_be(rel)} {tail}")
        pairs = [("forward", f"What {_be(rel)} the {rel} of {head}?", answer)]
        back = ("inverse", f"What has {tail} as its {rel}?", answer)
    if inverse and len(tail.split()) <= MAX_INVERSE_TAIL_WORDS and not re.search(r"[.!?;]", tail.rstrip(".")):
        pairs.append(back)
    return pairs


def _questions(title: str, count: int) -> list[tuple[str, str]]:
    """(form, question) pairs about a title."""
    title = title.strip()
    if title.endswith("?"):
        forms = QUESTION_FORMS[:count]
        return [(f, f.format(question=title)) for f in forms]
    return [(f, f.format(topic=title.rstrip(".:"))) for f in TOPIC_FORMS[:count]]


def _where(entry: Mapping[str, Any]) -> str:
    entry_id, source = str(entry.get("id") or "?"), str(entry.get("source") or "")
    return f"{entry_id} ({source})" if source else entry_id


def _part(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    return value.strip() if isinstance(value, str) else ""


def _inverse_ok(kb: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], bool]:
    """(relation, tail) -> whether one head has it: only then does the inverse question have one answer."""
    heads: dict[tuple[str, str], set[str]] = {}
    for entry in kb:
        if entry.get("kind") == "fact":
            key = (_words(_part(entry, "relation")).casefold(), _part(entry, "tail").casefold())
            heads.setdefault(key, set()).add(_part(entry, "head").casefold())
    return {key: len(found) == 1 for key, found in heads.items()}


def pairs_for(
    entry: Mapping[str, Any], unique: Mapping[tuple[str, str], bool], problems: list[GeneratorProblem]
) -> list[tuple[dict[str, Any], str, str]]:
    """(params, question, answer) for one KB entry; its problem, if any, is appended to `problems`."""
    kind = entry.get("kind")
    if kind == "fact":
        head, relation, tail = (_part(entry, k) for k in ("head", "relation", "tail"))
        missing = [k for k, v in (("head", head), ("relation", relation), ("tail", tail)) if not v]
        if missing:
            problems.append(GeneratorProblem(generator=NAME, source=_where(entry), problem=f"fact triple missing {', '.join(missing)}"))
            return []
        one_head = unique.get((_words(relation).casefold(), tail.casefold()), False)
        return [({"kind": kind, "direction": d}, q, a) for d, q, a in fact_pairs(head, relation, tail, one_head)]
    if kind not in PHRASINGS:
        return []  # policies (rules, not answers) and kinds this generator does not know
    text = str(entry.get("text") or "")
    topic = _part(entry, "title") or _words(str(entry.get("intent") or ""))
    if not text.strip() or not topic:
        problems.append(
            GeneratorProblem(
                generator=NAME, source=_where(entry), problem="text is empty" if not text.strip() else "no title or intent to ask about"
            )
        )
        return []
    return [({"kind": kind, "form": form}, question, text) for form, question in _questions(topic, PHRASINGS[str(kind)])]


def _limit(inputs: SynthesisInputs, intent: str) -> int:
    cap = inputs.settings.synthesis.per_intent
    return min(cap, inputs.wants[intent]) if intent in inputs.wants else cap


def _prompt(seeds: Sequence[Seed], intent: str, question: str) -> list[Message]:
    system = system_prompt(seeds, intent)
    return [*([system] if system else []), Message(role="user", content=question)]


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    output = GeneratorOutput()
    entries = sorted(inputs.kb, key=lambda e: (str(e.get("id") or ""), str(e.get("source") or "")))
    unique = _inverse_ok(entries)
    seeds = list(inputs.seeds)
    made: dict[str, int] = {}
    for entry in entries:
        intent = str(entry.get("intent") or "").strip() or DEFAULT_INTENT
        for params, question, answer in pairs_for(entry, unique, output.problems):
            if made.get(intent, 0) >= _limit(inputs, intent):
                break
            made[intent] = made.get(intent, 0) + 1
            source_text = _part(entry, "title") or _part(entry, "text") or question
            output.samples.append(
                Generated(
                    generator=NAME,
                    params=params,
                    source_id=str(entry.get("id") or entry.get("source") or ""),
                    source_text=source_text,
                    intent=intent,
                    problem_type=PROBLEM_TYPE,
                    messages=_prompt(seeds, intent, question),
                    answer=answer,
                )
            )
    return output
