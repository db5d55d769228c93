"""Typed entities in user text, found with regular expressions: amounts, dates, card types, currencies
and cities.

The template and augment generators need to know which words of a verified sample are a value (an
amount, a date, a card) rather than the sentence frame around it: the template generator turns those
words into slots, the augment generator swaps them for other values of the same kind. Regexes are
enough for that and are honest about what they find; nothing here guesses at entities it cannot
pattern-match (product names are left out for that reason).

`find_entities(text)` returns non-overlapping spans, earliest first; `slot_values(texts)` collects the
distinct values seen in a body of text (the KB, captured traffic), and `DEFAULTS` holds a few values per
kind so that a slot can be filled when the project's own text has none; `swap_entity` replaces one
entity of a sentence by another value of its kind.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from random import Random
from typing import Any

KINDS: tuple[str, ...] = ("amount", "date", "card_type", "currency", "city")

# Values that fill a slot when the project's text gives none of that kind.
DEFAULTS: dict[str, tuple[str, ...]] = {
    "amount": ("£12.50", "$20", "€45.99", "100 EUR", "£250", "$7.80"),
    "date": ("yesterday", "last Tuesday", "March 3rd", "12/03/2024", "two days ago", "last week"),
    "card_type": ("visa", "mastercard", "amex", "debit card", "credit card", "virtual card"),
    "currency": ("USD", "EUR", "GBP", "euros", "dollars", "pounds"),
    "city": ("London", "Paris", "Berlin", "Madrid", "New York", "Tokyo"),
}

# A modest list of world cities: a capitalised word after "in/from/to/at" is a city only when it is
# here (or named as one by the caller), since most capitalised words after a preposition are not.
CITIES: frozenset[str] = frozenset(
    """Amsterdam Athens Auckland Bangkok Barcelona Beijing Berlin Bogota Boston Brussels Bucharest Budapest
    Cairo Chicago Copenhagen Dallas Delhi Dubai Dublin Edinburgh Frankfurt Geneva Glasgow Hamburg Helsinki
    Istanbul Jakarta Johannesburg Kyiv Lagos Lima Lisbon London Lyon Madrid Manchester Manila Marseille
    Melbourne Miami Milan Montreal Moscow Mumbai Munich Nairobi Oslo Paris Porto Prague Riga Rome Santiago
    Seattle Seoul Shanghai Singapore Sofia Stockholm Sydney Taipei Tokyo Toronto Valencia Vancouver Vienna
    Vilnius Warsaw Zagreb Zurich""".split()
) | frozenset({"New York", "Los Angeles", "San Francisco", "Hong Kong", "Mexico City", "Buenos Aires", "Rio de Janeiro", "Tel Aviv"})

_SYMBOL = r"[£$€¥₹]"
_ISO = r"(?:USD|EUR|GBP|JPY|CHF|CAD|AUD|NZD|CNY|INR|SEK|NOK|DKK|PLN|CZK|HUF|BRL|MXN|ZAR|SGD|HKD|TRY|AED)"
# lower-case words, matched case-insensitively; ISO codes only in capitals ("eur" is more often a typo)
_CURRENCY_WORD = (
    r"(?:euros?|dollars?|pounds?(?:\s+sterling)?|quid|bucks|yen|yuan|renminbi|francs?|rupees?|pesos?|"
    r"krona|kronor|krone|kroner|zloty|zlotys|rubles?|roubles?|reais|rand|lira|dirhams?)"
)
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d{1,2})?|\d+(?:[.,]\d{1,2})?"
_MONTH = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
_DAY = r"(?:[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?"
_WEEKDAY = r"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day"

# (kind, pattern) in priority order: where two matches overlap, the longer wins, then the earlier kind
# here, so "20 euros" is one amount and not a number beside a currency.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "amount",
        re.compile(
            rf"(?<![\w£$€¥₹])(?:{_SYMBOL}\s?(?:{_NUMBER})(?:\s?[kK]\b)?"
            rf"|(?:{_NUMBER})\s?{_SYMBOL}"
            rf"|(?:{_NUMBER})\s?(?:(?i:{_CURRENCY_WORD})|{_ISO})\b"
            rf"|{_ISO}\s?(?:{_NUMBER}))(?![\d])"
        ),
    ),
    (
        "date",
        re.compile(
            rf"\b(?:\d{{4}}-\d{{2}}-\d{{2}}|\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:\d{{4}}|\d{{2}})"
            rf"|(?i:{_MONTH})\.?\s+{_DAY}(?:,?\s+\d{{4}})?|{_DAY}\s+(?:of\s+)?(?i:{_MONTH})(?:,?\s+\d{{4}})?"
            rf"|(?i:yesterday|today|tomorrow|tonight|(?:the\s+)?day\s+before\s+yesterday|(?:a|one|two|three|\d+)\s+(?:days?|weeks?)\s+ago)"
            rf"|(?i:(?:last|this|next|on)\s+(?:{_WEEKDAY}|week|weekend|month|year))|(?i:{_WEEKDAY}))\b"
        ),
    ),
    (
        "card_type",
        re.compile(
            r"\b(?:(?:visa|mastercard|master\s+card|amex|maestro)\s+)?(?:debit|credit|virtual|prepaid|physical|contactless|disposable)\s+card\b"
            r"|\b(?:visa|mastercard|master\s+card|amex|american\s+express|maestro|discover|diners\s+club|union\s?pay|jcb)\b",
            re.IGNORECASE,
        ),
    ),
    ("currency", re.compile(rf"\b{_ISO}\b|(?i:\b{_CURRENCY_WORD}\b)")),
)
# "in Paris", "to New York": the preposition is not part of the entity, hence the group.
_CITY = re.compile(r"\b(?:in|from|to|at|In|From|To|At)\s+([A-Z][a-z]+(?:\s+(?:de\s+)?[A-Z][a-z]+)?)")
_CITY_OF = re.compile(r"\b[Cc]ity\s+of\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)")
_PROPER = re.compile(r"[A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)*")  # a capitalised name of one or more words


@dataclass(frozen=True)
class Entity:
    kind: str
    start: int
    end: int
    text: str


def _cities(text: str, known: Collection[str]) -> list[Entity]:
    found = []
    for match in _CITY.finditer(text):
        words = match.group(1)
        # "to New York Tomorrow": try the two-word name, then its first word alone
        for name in (words, words.split()[0]):
            if name in known:
                start = match.start(1)
                found.append(Entity("city", start, start + len(name), name))
                break
    return found


def find_entities(text: str, cities: Collection[str] = ()) -> list[Entity]:
    """Every entity in `text`, non-overlapping, in order of position. `cities` adds city names to the
    built-in list (names the KB gives, see `kb_cities`)."""
    known = CITIES | frozenset(cities)
    candidates = [Entity(kind, m.start(), m.end(), m.group(0)) for kind, pattern in _PATTERNS for m in pattern.finditer(text)]
    candidates += _cities(text, known)
    rank = {kind: index for index, kind in enumerate(KINDS)}
    # longest first, then by kind priority: a greedy pass then keeps the most specific reading of a span
    candidates.sort(key=lambda e: (-(e.end - e.start), rank[e.kind], e.start))
    taken: list[Entity] = []
    for entity in candidates:
        if entity.text.strip() and all(entity.end <= other.start or entity.start >= other.end for other in taken):
            taken.append(entity)
    return sorted(taken, key=lambda e: e.start)


def kb_cities(kb: Iterable[Mapping[str, Any]]) -> set[str]:
    """City names the KB states: "the city of X" in any entry's text; the tail of a fact whose relation
    places something in a city ("city", "located in", "based in", "headquartered in"); the head of a
    fact saying it is a city (tail "city")."""
    names: set[str] = set()
    for entry in kb:
        names.update(m.group(1) for m in _CITY_OF.finditer(str(entry.get("text") or "")))
        head, tail = str(entry.get("head") or "").strip(), str(entry.get("tail") or "").strip()
        relation = str(entry.get("relation") or "").lower().replace("_", " ")
        if _PROPER.fullmatch(tail) and re.search(r"\bcity\b|\b(?:located|based|headquartered)\s+in\b", relation):
            names.add(tail)
        if _PROPER.fullmatch(head) and tail.lower() in ("city", "a city"):
            names.add(head)
    return names


def slot_values(texts: Iterable[str], cities: Collection[str] = ()) -> dict[str, list[str]]:
    """The distinct values of each kind seen in `texts`, sorted (case-insensitively, then exactly), so
    that the same texts always give the same lists. Values differing only in case count once, spelled
    the way they were most often written (not shouted, on a tie)."""
    spellings: dict[str, dict[str, Counter[str]]] = {kind: {} for kind in KINDS}
    for text in texts:
        for entity in find_entities(text, cities):
            value = " ".join(entity.text.split())  # "pounds  sterling" and "pounds sterling" are one value
            spellings[entity.kind].setdefault(value.casefold(), Counter())[value] += 1
    out: dict[str, list[str]] = {}
    for kind, by_key in spellings.items():
        chosen = [_usual(counts) for counts in by_key.values()]
        out[kind] = sorted(chosen, key=lambda v: (v.casefold(), v))
    return out


def _usual(counts: Counter[str]) -> str:
    """The spelling written most often; on a tie, one not in capitals, then the first in order."""
    return min(counts, key=lambda v: (-counts[v], v.isupper(), v))


def with_defaults(values: Mapping[str, list[str]], least: int = 4) -> dict[str, list[str]]:
    """Each kind's seen values, topped up with built-in ones to at least `least` values: a slot can always
    be filled, and one amount named once in the KB does not become the amount of every sample."""
    out = {}
    for kind in KINDS:
        seen = list(values.get(kind) or ())
        known = {v.casefold() for v in seen}
        out[kind] = seen + [v for v in DEFAULTS[kind] if v.casefold() not in known][: max(0, least - len(seen))]
    return out


def match_case(value: str, like: str) -> str:
    """`value` written in the case style of `like` (a sentence, or its first letter): all lower case, or
    shouted."""
    if like.islower():
        return value.lower()
    if like.isupper() and len(like) > 3:  # a shouted word, not an ISO code such as "EUR"
        return value.upper()
    return value


def swap_entity(
    text: str, rng: Random, values: Mapping[str, list[str]], cities: Collection[str] = (), keep: str = ""
) -> tuple[str, str] | None:
    """`text` with one entity, picked by `rng`, replaced by another value of its kind (from `values`, else
    the built-in ones) and the kind; None when it has no entity. The sentence around it stays as it is.
    Entities found in `keep` (an answer that depends on them) are not replaced."""
    entities = [e for e in find_entities(text, cities) if e.text.casefold() not in keep.casefold()]
    if not entities:
        return None
    entity = rng.choice(entities)
    others = [v for v in values.get(entity.kind) or () if v.casefold() != entity.text.casefold()]
    others = others or [v for v in DEFAULTS[entity.kind] if v.casefold() != entity.text.casefold()]
    value = match_case(rng.choice(others), text)  # a sentence written in lower case gets a lower-case value
    return text[: entity.start] + value + text[entity.end :], entity.kind
