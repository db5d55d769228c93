"""The "augment" generator: variants of each verified sample's last user turn, same answer, same intent.

Three families of operations, each small and rule-based so that the answer stays right:
  - entity: one entity (flywheel.synthesis.entities) replaced by another value of its kind; the frame
    of the sentence stays. An entity the answer mentions is never replaced: the answer depends on it.
  - rewrite: meaning-preserving edits: politeness and filler added or removed, contractions expanded
    or contracted, clauses reordered around because/so/but in a single sentence, and active to passive
    for a fixed list of verbs whose past tense is their participle.
  - noise: what real users type: swapped letters, QWERTY neighbour slips, dropped letters, mixed case,
    chat spellings ("pls", "u", "thx") and missing apostrophes. A model that only saw clean text
    fails on these.
Variant i of a seed starts from family i mod 3 (so a seed's variants differ in kind), sometimes adds an
operation of another family, and records the operations in params["ops"]. A variant equal to the
source or to an earlier one is not emitted. Randomness comes from a `random.Random` per (run seed,
"augment", seed id, variant index), so a resumed or repeated run gives the same variants.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from flywheel.records import stable_hash
from flywheel.synthesis.entities import kb_cities, match_case, slot_values, swap_entity, with_defaults
from flywheel.synthesis.records import Generated, GeneratorOutput, Seed, SynthesisInputs
from flywheel.synthesis.template import replace_last_user

NAME = "augment"
ATTEMPTS = 8  # tries per variant before giving it up (a short text has few distinct edits)
SECOND_OP = 0.35  # chance that a variant gets an operation of a second family on top


@dataclass(frozen=True)
class Context:
    values: Mapping[str, list[str]]  # slot values per entity kind
    cities: Collection[str]
    answer: str  # the seed's answer, case-folded: entities it mentions stay


# An operation returns the edited text and its label, or None where it does not apply.
Op = Callable[[str, random.Random, Context], tuple[str, str] | None]

# sentence starters that are lower-cased when they stop being first (names and "I" are not)
_STARTERS = frozenset(
    "a an the my our your this that these those what where when why how who which can could would will should is are was were "
    "do does did have has please there it some any no yes help need just also because although since".split()
)


def _lower_first(text: str) -> str:
    word = re.match(r"[A-Za-z]+", text)
    return text[0].lower() + text[1:] if word and word.group(0).lower() in _STARTERS and word.group(0)[1:].islower() else text


def _upper_first(text: str, like: str) -> str:
    """Capitalise the first letter, unless the source is written all in lower case."""
    return text if like[:1].islower() else text[:1].upper() + text[1:]


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([,.!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()
    return re.sub(r"^[,.\s]+", "", text)


def _keep_case(replacement: str, match: re.Match[str]) -> str:
    new = match.expand(replacement)
    return (new[:1].upper() if match.group(0)[0].isupper() else new[:1].lower()) + new[1:]


def _apply_all(rules: Iterable[tuple[str, str]], text: str) -> str:
    """Every (pattern, replacement) rule in turn, ignoring case but keeping the case of each match's first
    letter: "Can't" -> "Cannot", "i am" -> "i'm"."""
    for pattern, replacement in rules:
        text = re.sub(pattern, partial(_keep_case, replacement), text, flags=re.IGNORECASE)
    return text


# --- entity -----------------------------------------------------------------------------------------------


def entity_swap(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    swapped = swap_entity(text, rng, ctx.values, ctx.cities, keep=ctx.answer)
    return (swapped[0], f"entity_swap:{swapped[1]}") if swapped else None


# --- rewrites ---------------------------------------------------------------------------------------------

_GREETING = re.compile(r"^\s*(?:hi|hello|hey|good (?:morning|afternoon|evening))(?: there)?\s*[,!.]*\s+", re.IGNORECASE)
_THANKS = re.compile(r"[\s,.]*\b(?:thanks|thank you|thx|cheers)(?: (?:so much|a lot|in advance))?\s*[.!]*\s*$", re.IGNORECASE)
_PLEASE = re.compile(r",?\s*\bplease\b,?", re.IGNORECASE)
_FILLER = re.compile(r"^\s*(?:so|um+|uh+|well|actually|basically|ok(?:ay)?),?\s+", re.IGNORECASE)


def add_politeness(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    options = []
    if not _GREETING.match(text):
        options.append(match_case(rng.choice(("Hi! ", "Hello! ", "Hi there. ", "Good morning. ")), text[:1]) + text)
    if not _THANKS.search(text):
        options.append(
            text.rstrip() + ("" if text.rstrip()[-1:] in ".!?" else ".") + rng.choice((" Thanks!", " Thank you.", " Thanks in advance."))
        )
    if re.search(r"\b(?:can|could|would) you\b(?! please)", text, re.IGNORECASE):
        options.append(re.sub(r"\b((?:can|could|would) you)\b(?! please)", r"\1 please", text, count=1, flags=re.IGNORECASE))
    return (rng.choice(options), "add_politeness") if options else None


def remove_politeness(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    options = [_tidy(pattern.sub(" ", text) if pattern is _PLEASE else pattern.sub("", text)) for pattern in (_GREETING, _THANKS, _PLEASE)]
    options = [_upper_first(o, text) for o in options if o and o != text and re.search(r"\w", o)]
    return (rng.choice(options), "remove_politeness") if options else None


def add_filler(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    if _FILLER.match(text) or _GREETING.match(text):  # "Um, Hi! ..." is nobody's way of writing
        return None
    filler = rng.choice(("So, ", "Um, ", "Well, ", "Actually, ", "Basically, "))
    return match_case(filler, text[:1]) + _lower_first(text), "add_filler"


_A = "['’]"  # a straight or typographic apostrophe
_EXPAND = (
    (rf"\bcan{_A}t\b", "cannot"),
    (rf"\bwon{_A}t\b", "will not"),
    (rf"\b(do|does|did|is|are|was|were|has|have|had|could|should|would|must|need)n{_A}t\b", r"\1 not"),
    (rf"\bI{_A}m\b", "I am"),
    (rf"\b(you|we|they){_A}re\b", r"\1 are"),
    (rf"\b(I|you|we|they){_A}ve\b", r"\1 have"),
    (rf"\b(I|you|we|they|he|she|it){_A}ll\b", r"\1 will"),
    (rf"\b(I|you|we|they|he|she){_A}d (?=like|love|prefer|rather|be\b)", r"\1 would "),  # 'd before these is "would", not "had"
    (rf"\b(it|that|what|where|there|here|who|how|he|she){_A}s (?=been\b|got\b)", r"\1 has "),
    (rf"\b(it|that|what|where|there|here|who|how|he|she){_A}s\b", r"\1 is"),  # only pronouns: a noun's 's may be possessive
)
# contracted only before another word: "I know where they are." cannot end in "they're."
_NEXT = r"(?=\s+[A-Za-z])"
_CONTRACT = (
    (r"\bcannot\b", "can't"),
    (r"\bwill not\b", "won't"),
    (r"\b(do|does|did|is|are|was|were|has|have|had|could|should|would|must) not\b", r"\1n't"),
    (rf"\bI am\b{_NEXT}", "I'm"),
    (rf"\b(you|we|they) are\b{_NEXT}", r"\1're"),
    (rf"\b(it|that|what|where|there|here|who|how) is\b{_NEXT}", r"\1's"),
    (rf"\b(I|you|we|they) will\b{_NEXT}", r"\1'll"),
    (r"\b(I|you|we|they) have (?=been\b|not\b|already\b|just\b|never\b|\w{3,}ed\b)", r"\1've "),  # "I have a card" stays
    (r"\b(I|you|we|they|he|she) would (?=like\b|love\b|prefer\b|rather\b)", r"\1'd "),
)


def _fixed(name: str, edit: Callable[[str], str]) -> Op:
    """An operation without randomness: it applies where `edit` changes the text (and leaves some)."""

    def op(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
        new = edit(text)
        return (new, name) if new != text and re.search(r"\w", new) else None

    return op


expand_contractions = _fixed("expand_contractions", lambda t: _apply_all(_EXPAND, t))
contract = _fixed("contract", lambda t: _apply_all(_CONTRACT, t))
_ADVERB = re.compile(r"\s+(?:basically|actually|literally)\b,?", re.IGNORECASE)
remove_filler = _fixed("remove_filler", lambda t: _upper_first(_tidy(_ADVERB.sub("", _FILLER.sub("", t))), t))


_SUBJECT = r"(?=(?:i|we|you|it|they|he|she|my|our|the|this|that|now|nothing|still)\b)"  # "so"/"but" starting a clause
# (label, the sentence as clauses a and b, the sentence rebuilt: {A} is a capitalised, {a} a lower-cased)
_REORDERS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("reorder:because", re.compile(r"because (?P<b>.+?), (?P<a>.+)", re.I), "{A} because {b}"),
    ("reorder:because", re.compile(r"(?P<a>.+?),? because (?P<b>.+)", re.I), "Because {b}, {a}"),
    ("reorder:so", re.compile(rf"(?P<a>.+?),? so {_SUBJECT}(?P<b>.+)", re.I), "Because {a}, {b}"),
    ("reorder:but", re.compile(rf"(?P<a>.+?),? but {_SUBJECT}(?P<b>.+)", re.I), "Although {a}, {b}"),
)


def reorder_clauses(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    """Swap the clauses of one sentence around because/so/but ("A so B" becomes "Because A, B"). Only a
    single sentence with one connector, once, and three words or more on each side: anything else is
    not safe to move. "But" is left alone in questions, where "Although A, B?" misreads."""
    body = text.strip().rstrip(".!?")
    end = text.strip()[len(body) :]
    if not body or re.search(r"[.!?;:\n]", body) or len(re.findall(r"\b(?:because|so|but)\b", body, re.I)) != 1:
        return None
    for label, pattern, form in _REORDERS:
        m = pattern.fullmatch(body)
        if m is None or (label == "reorder:but" and end.startswith("?")):
            continue
        a, b = m.group("a"), m.group("b")
        if min(len(a.split()), len(b.split())) < 3 or "," in a + b:
            return None
        out = form.format(A=a[:1].upper() + a[1:], a=_lower_first(a), b=b)
        return (out[:1].lower() if text[:1].islower() else out[:1]) + out[1:] + end, label
    return None


_PASSIVE = re.compile(
    r"^(I|We) (sent|paid|ordered|made|booked|returned|transferred|requested|submitted|cancell?ed|canceled|placed|activated|blocked|reported|bought|updated|changed) "
    r"((?:the|my|our|a|an|this|that) [a-z]+(?: (?!(?:to|from|for|on|in|at|last|yesterday|today|this|but|and|because|so|twice|again|already|with|by|of)\b)[a-z]+)?)"
    r"(?=[ ,.!?]|$)(.*)$",
    re.DOTALL,
)


def passive(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    """ "I sent the money to Anna" -> "The money was sent by me to Anna": only for the verbs above, whose
    past tense is also their participle, and an object of a determiner and one or two words."""
    m = _PASSIVE.match(text)
    if m is None:
        return None
    subject, verb, thing, rest = m.groups()
    last = thing.split()[-1]
    be = "were" if last.endswith("s") and not last.endswith(("ss", "us", "is")) else "was"
    return f"{thing[0].upper()}{thing[1:]} {be} {verb} by {'me' if subject == 'I' else 'us'}{rest}", "passive"


# --- noise ------------------------------------------------------------------------------------------------

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS = {c: "".join(r[j] for j in (i - 1, i + 1) if 0 <= j < len(r)) for r in _ROWS for i, c in enumerate(r)}
# "thank_you" before "you": a rule must not eat part of a later one
_SHORT = "thank_you=thx please=pls you=u your=ur thanks=thx because=cuz are=r tomorrow=tmrw message=msg okay=ok"
_CHAT = tuple((rf"\b{w.replace('_', ' ')}\b", short) for w, short in (p.split("=") for p in _SHORT.split()))


def _word(text: str, rng: random.Random, min_len: int) -> re.Match[str] | None:
    words = [m for m in re.finditer(r"[A-Za-z]+", text) if len(m.group(0)) >= min_len]
    return rng.choice(words) if words else None


def _typo(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    """One slip inside one word (never its first letter, which readers and models both lean on)."""
    word = _word(text, rng, 4)
    if word is None:
        return None
    w, i = word.group(0), rng.randrange(1, len(word.group(0)) - 1)
    kind = rng.choice(("typo_swap", "typo_keyboard", "typo_drop"))
    if kind == "typo_swap" and w[i] != w[i + 1]:
        new = w[:i] + w[i + 1] + w[i] + w[i + 2 :]
    elif kind == "typo_keyboard" and w[i].lower() in _NEIGHBOURS:
        slip = rng.choice(_NEIGHBOURS[w[i].lower()])
        new = w[:i] + (slip.upper() if w[i].isupper() else slip) + w[i + 1 :]
    else:
        kind, new = "typo_drop", w[:i] + w[i + 1 :]
    return text[: word.start()] + new + text[word.end() :], kind


def mixed_case(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    """The whole text in lower case, or one word shouted."""
    word = _word(text, rng, 3)
    shouted = text[: word.start()] + word.group(0).upper() + text[word.end() :] if word else text
    options = [t for t in (text.lower(), shouted) if t != text]
    return (rng.choice(options), "mixed_case") if options else None


def chat_spelling(text: str, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    present = [rule for rule in _CHAT if re.search(rule[0], text, re.IGNORECASE)]
    if not present:
        return None
    chosen = [rule for rule in present if rng.random() < 0.6] or [rng.choice(present)]
    return _apply_all(tuple(chosen), text), "chat_spelling"


drop_apostrophes = _fixed("drop_apostrophes", lambda t: re.sub(rf"(?<=[A-Za-z]){_A}(?=[A-Za-z])", "", t))


FAMILIES: tuple[tuple[Op, ...], ...] = (
    (entity_swap,),
    (add_politeness, remove_politeness, add_filler, remove_filler, expand_contractions, contract, reorder_clauses, passive),
    (_typo, mixed_case, chat_spelling, drop_apostrophes),
)


def _apply_family(text: str, family: int, rng: random.Random, ctx: Context) -> tuple[str, str] | None:
    ops = list(FAMILIES[family])
    rng.shuffle(ops)
    return next((r for op in ops if (r := op(text, rng, ctx)) is not None and r[0] != text), None)


def _candidates(text: str, index: int, rng: random.Random, ctx: Context) -> Iterator[tuple[str, list[str]]]:
    for attempt in range(ATTEMPTS):
        family = (index + attempt) % len(FAMILIES)  # variant i starts from family i mod 3
        steps = [_apply_family(text, family, rng, ctx)]
        if steps[0] is not None and rng.random() < SECOND_OP:
            steps.append(_apply_family(steps[0][0], rng.choice([f for f in range(len(FAMILIES)) if f != family]), rng, ctx))
        done = [step for step in steps if step is not None]
        if done:
            yield done[-1][0], [label for _, label in done]


def _augmentable(seed: Seed, wants: Mapping[str, int]) -> bool:
    """Reply seeds only (a prompt ending in a tool result or call has an answer that depends on more than
    the user's words); with wants, only of the intents the stage found short."""
    ends_with_user = bool(seed.messages) and seed.messages[-1].role == "user" and bool(seed.last_user().strip())
    return ends_with_user and (not wants or wants.get(seed.intent, 0) > 0)


def generate(inputs: SynthesisInputs) -> GeneratorOutput:
    seeds = sorted((s for s in inputs.seeds if _augmentable(s, inputs.wants)), key=lambda s: s.id)
    return GeneratorOutput(samples=variants(inputs, seeds, NAME))


def variants(inputs: SynthesisInputs, seeds: Sequence[Seed], generator: str) -> list[Generated]:
    """`synthesis.per_seed` variants of each seed's last user turn, labelled `generator`."""
    out: list[Generated] = []
    cities = kb_cities(inputs.kb)
    texts = [str(e.get("text") or "") for e in inputs.kb] + [i.last_user_text() for i in inputs.unlabelled] + [s.last_user() for s in seeds]
    values = with_defaults(slot_values(texts, cities))
    for seed in seeds:
        source = seed.last_user()
        ctx = Context(values=values, cities=cities, answer=seed.answer.casefold())
        made: set[str] = set()
        for index in range(inputs.settings.synthesis.per_seed):
            rng = random.Random(int(stable_hash([inputs.seed, generator, seed.id, index]), 16))
            found = next(((t, ops) for t, ops in _candidates(source, index, rng, ctx) if t.strip() and t != source and t not in made), None)
            if found is None:
                continue
            text, ops = found
            made.add(text)
            out.append(
                Generated(
                    generator=generator,
                    params={"ops": ops},
                    source_id=seed.id,
                    source_text=source,
                    intent=seed.intent,
                    problem_type=seed.problem_type,
                    messages=replace_last_user(seed.messages, text),
                    answer=seed.answer,
                )
            )
    return out
