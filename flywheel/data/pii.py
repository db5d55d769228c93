"""PII scrubbing: find personal data and secrets in logged text and replace each with a typed placeholder.

Kinds and placeholders:
    EMAIL        [EMAIL]        e-mail addresses
    PHONE        [PHONE]        international (+CC ...), North American (555) 123-4567, UK/EU domestic 0...
                                numbers, and bare 10-11 digit numbers right after a phone word ("call", "tel")
    CARD         [CARD]         13-19 digit payment card numbers that pass the Luhn check (stdnum.luhn)
    IBAN         [IBAN]         IBANs whose country format and mod-97 check pass (stdnum.iban)
    NATIONAL_ID  [NATIONAL_ID]  US SSN (stdnum.us.ssn), UK National Insurance number (format rules),
                                Spanish DNI/NIE (stdnum.es), Italian codice fiscale (stdnum.it),
                                French NIR (stdnum.fr.nir)
    SECRET       [SECRET]       API keys and tokens: sk-..., AKIA..., ghp_..., github_pat_..., xox[bp]-...,
                                AIza..., JWTs, Bearer tokens, and high-entropy values after key=/token=/...
    PERSON       [PERSON]       person names: capitalised words a title, naming phrase, greeting or role
                                confirms, or a gazetteer of given names and surnames (flywheel.data.pii_names)
    ADDRESS      [ADDRESS]      postal addresses: a house number with its street, then unit, city, state,
                                postcode (US, UK, EU forms); a UK postcode alone (flywheel.data.pii_address)
    DOB          [DOB]          a date after a birth cue ("born", "DOB", "date of birth", "birthday", ...);
                                other dates are training data and stay (flywheel.data.pii_dob)
In JSON (tool-call arguments) a key names the kind of a bare value: {"dob": ...}, {"last_name": ...},
{"street": ...}, {"api_key": ...}.

Why regular expressions plus checksum validation rather than a library: Microsoft Presidio's pattern
recognizers do run offline (with its NoOpNlpEngine, no spaCy model), but bench/pii.py measured them about
150x slower per text on the same logs (ingest would top out near 700 conversations a second), with lower
recall on phones and national ids and no recognizer for API keys; its person recognizer needs a spaCy
model, which cannot be downloaded here. For addresses pyap, the one offline finder, found 0.37 of the
labelled ones at 2.5 ms a text; usaddress and probablepeople parse strings already known to be addresses
or names. Names come from Faker's person providers (a library, MIT, offline) as a gazetteer. Numbers in
docs/ingest.md.

Measured (python bench/pii.py; a span counts when it has the kind and covers 80% of the labelled one):
recall and precision 1.00 for the first six kinds on tests/data/pii_labelled.jsonl; person 0.97 / 1.00,
address 1.00 / 1.00, date of birth 0.98 / 1.00 on that set, which they were tuned on, and person
0.98 / 0.95, address 1.00 / 1.00, date of birth 0.98 / 1.00 on tests/data/pii_heldout.jsonl, scored only
at the end. 7.0 µs per message (6.3 µs CPU) on bench/pii.py's 18,133 messages, 2.6 before the last three
kinds, at a load average of 4.5 on 2 cores; ingest CPU +16% (bench/ingest.py, 200,000 conversations).

Speed: most logged text holds no PII. Substring tests (memchr-fast) decide whether the secret patterns run
at all, a byte-level digit count whether the number scan runs (every number kind has six digits or more),
and one scan then finds every number kind. Every candidate of a checksummed kind is validated, which is
what keeps order numbers, amounts and card-like numbers failing Luhn out. Names and addresses need a
look at every capitalised word and every number: one scan, from the spaces (a literal the regex engine
jumps between in C), finds where either may start. A date of birth needs a birth cue, which a search on
the lower-cased text for a 'b' rules out in most texts. Texts found clean are remembered (system prompts
and canned answers repeat in every conversation).

Scrubbing is idempotent (placeholders hold no digits, no '@', no key=value shape and no lower-case
letters, and the context a cue reads stops at a placeholder), so re-ingesting already scrubbed text
changes nothing and its content hash stays the same.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.es import dni as _es_dni
from stdnum.es import nie as _es_nie
from stdnum.fr import nir as _fr_nir
from stdnum.it import codicefiscale as _it_cf
from stdnum.us import ssn as _us_ssn

from flywheel.data import pii_address, pii_names
from flywheel.data.pii_dob import birth_date_spans, is_date, may_hold_birth
from flywheel.data.pii_secrets import KEY_SUFFIXES, looks_random, may_hold_key_value, may_hold_token, secret_spans

KINDS: tuple[str, ...] = ("EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "SECRET", "PERSON", "ADDRESS", "DOB")
PLACEHOLDER = {kind: f"[{kind}]" for kind in KINDS}


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    kind: str


# Every pattern below starts with a literal or a single character class, so that the regex engine skips
# ahead in C to the few places where a match can start (a digit, '+', '(', '@', ':' or '='); a pattern that
# starts with a lookbehind or an alternation of classes is tried at every character and costs ten times more.
# Boundary checks that would come first are written as lookbehinds after the first character instead.


# --- e-mail: found from the '@', the local part is then read backwards ----------------------------------------
_EMAIL_DOMAIN = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])"
)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]+(?:'[A-Za-z0-9._%+-]+)*$")


def _emails(text: str, spans: list[Span]) -> None:
    for m in _EMAIL_DOMAIN.finditer(text):
        local = _EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if local is None:
            continue
        start = local.start()
        while start < m.start() and text[start] in ".'":
            start += 1
        if start < m.start() and not _overlaps(spans, start, m.end()):
            spans.append(Span(start, m.end(), "EMAIL"))


# --- numbers: IBAN, payment card, national ids, phone numbers -----------------------------------------------------
# One scan finds them all. The pattern consumes one first character (a digit, '+' or '('; a class, so the
# engine skips ahead to those in C) and rejects a digit right after a digit at once; then each kind's
# alternative checks what precedes: most kinds start a token (nothing word-like before them), the IBAN, the
# NINO, the NIE and the codice fiscale have letters before their first digit, and their span starts there.
# Leftmost candidate first; when a candidate fails its check, the kinds after it are tried at the same place
# (a bare 15-digit French NIR fails the card check first), then the scan goes on after the candidate.
#
# Kinds that start a token: (kind, first character, the rest after it).
_TOKEN_KINDS: list[tuple[str, str, str]] = [
    # payment cards: grouped by four (Visa/MC/Discover), 4-6-5 (Amex), or one run of 13-19 digits
    ("card", "[0-9]", r"(?:[0-9]{3}[ -](?:[0-9]{4}[ -]){2}[0-9]{1,7}|[0-9]{3}[ -][0-9]{6}[ -][0-9]{4,5}|[0-9]{12,18})(?![\w-])"),
    # US SSN 123-45-6789 / 123 45 6789, Spanish DNI 12345678Z, French NIR 2 95 10 99 126 111 93
    ("ssn", "[0-9]", r"[0-9]{2}(?P<sep>[- ])[0-9]{2}(?P=sep)[0-9]{4}(?![\w-])"),
    ("es_dni", "[0-9]", r"[0-9]{7}-?[A-Z](?![\w-])"),
    ("fr_nir", "[12]", r" ?[0-9]{2} ?[0-9]{2} ?(?:[0-9]{2}|2[AB]) ?[0-9]{3} ?[0-9]{3} ?[0-9]{2}(?![\w-])"),
    # phones: international +CC groups; in parentheses (555) 123-4567 / (020) 7946 0958; North American
    # 555-123-4567, 1-800-555-0199; UK/EU domestic after the trunk 0: 020 7946 0958, 07700 900123
    ("intl", r"\+", r"[0-9]{1,3}(?:[ .-]?\(?[0-9]{1,5}\)?){1,6}(?![\w-]|\.[0-9])"),
    ("paren", r"\(", r"(?:[0-9]{3}\) ?[0-9]{3}[ .-][0-9]{4}|0[0-9]{2,4}\)(?:[ -]?[0-9]{2,4}){1,3})(?![\w-]|\.[0-9])"),
    ("nanp", "[0-9]", r"(?:(?<=1)[ .-][0-9]{3}[ .-]|[0-9]{2}[ .-])[0-9]{3}[ .-][0-9]{4}(?![\w-]|\.[0-9])"),
    ("domestic", "0", r"[0-9]{2,4}(?:[ -]?[0-9]{2,4}){1,3}(?![\w-]|\.[0-9])"),
    # bare 9-11 digits: a phone or an SSN only right after a word that says so (checked below)
    ("bare", "[0-9]", r"[0-9]{8,10}(?![\w-])"),
]
# Kinds with letters before the first digit: (kind, what precedes the first digit, the rest, letters before).
_LETTERED_KINDS: list[tuple[str, str, str, int]] = [
    # IBAN DE89 3704 0044 0532 0130 00: the country letters, then the check digits. People type them in lower
    # case too; the mod-97 check keeps that safe.
    ("iban", r"(?<=[A-Za-z]{2}[0-9])(?<![\w][A-Za-z]{2}[0-9])", r"[0-9](?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?(?![\w])", 2),
    # UK NINO AB123456C / AB 12 34 56 C: prefix letters (D, F, I, Q, U, V never; O never second; BG GB NK KN
    # TN NT ZZ never, checked below), six digits, suffix A-D
    ("nino", r"(?<=[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][0-9])(?<![\w][A-Z]{2}[0-9])", r"[0-9] ?[0-9]{2} ?[0-9]{2} ?[A-D](?![\w])", 2),
    (
        "nino_spaced",
        r"(?<=[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] [0-9])(?<![\w][A-Z]{2} [0-9])",
        r"[0-9] ?[0-9]{2} ?[0-9]{2} ?[A-D](?![\w])",
        3,
    ),
    # Spanish NIE X1234567L, Italian codice fiscale RSSMRA85T10A562S
    ("es_nie", r"(?<=[XYZ][0-9])(?<![\w][XYZ][0-9])", r"[0-9]{6}-?[A-Z](?![\w])", 1),
    ("it_cf", r"(?<=[A-Z]{6}[0-9])(?<![\w][A-Z]{6}[0-9])", r"[0-9][A-EHLMPR-T][0-9]{2}[A-Z][0-9]{3}[A-Z](?![\w])", 6),
]
_FIRST = r"[0-9+(](?<![0-9][0-9])"
_NOT_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
_TOKEN_START = r"(?<![\w+.-].)"
_NUMBERS = re.compile(
    _FIRST
    + "(?:"
    + _TOKEN_START
    + "(?:"
    + "|".join(f"(?<={first})(?P<{kind}>{rest})" for kind, first, rest in _TOKEN_KINDS)
    + ")|"
    + "|".join(f"{before}(?P<{kind}>{rest})" for kind, before, rest, _ in _LETTERED_KINDS)
    + ")"
)
# Each kind alone, to try the kinds after a failed candidate at the same place.
_NUMBER_ONE = {kind: re.compile(f"{_FIRST}{_TOKEN_START}(?<={first})(?P<{kind}>{rest})") for kind, first, rest in _TOKEN_KINDS}
_NUMBER_ONE.update({kind: re.compile(f"{_FIRST}{before}(?P<{kind}>{rest})") for kind, before, rest, _ in _LETTERED_KINDS})
_NUMBER_ORDER = [kind for kind, _, _ in _TOKEN_KINDS] + [kind for kind, _, _, _ in _LETTERED_KINDS]
_LETTERS_BEFORE = {kind: n for kind, _, _, n in _LETTERED_KINDS}
_NINO_NEVER = frozenset(("BG", "GB", "NK", "KN", "TN", "NT", "ZZ"))
_STDNUM_CHECKS: dict[str, Callable[[str], bool]] = {
    "ssn": lambda value: _us_ssn.is_valid(value.replace(" ", "-")),
    "es_dni": _es_dni.is_valid,
    "fr_nir": _fr_nir.is_valid,
    "es_nie": _es_nie.is_valid,
    "it_cf": _it_cf.is_valid,
}
_PHONE_DIGITS = {"intl": (8, 15), "paren": (10, 11), "nanp": (10, 11), "domestic": (10, 11)}
_PHONE_WORDS = re.compile(
    r"(?:phone|tel|telephone|call|call me|mobile|cell|whatsapp|sms|text me|fax)(?: at| on| number| no\.?)?[^0-9\n\x00]{0,6}$"
)
_SSN_WORDS = re.compile(r"(?:ssn|social security(?: number| no\.?)?)[^0-9\n\x00]{0,6}$")


def _valid_iban(candidate: str) -> int:
    """The length of the longest valid IBAN at the start of `candidate` (0 when none): the pattern may
    swallow a following word, so trailing groups are dropped until the check passes."""
    groups = candidate.split(" ")
    while groups:
        text = " ".join(groups)
        if _iban.is_valid(text.upper()):
            return len(text)
        if len(groups) == 1:
            return 0
        groups.pop()
    return 0


def _valid_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456" or len(set(digits)) == 1:
        return False
    return _luhn.is_valid(digits)


def _check_number(kind: str, m: re.Match[str], text: str) -> Span | None:
    """The span of a number candidate of `kind` if it passes that kind's check."""
    start, end = m.start(), m.end()
    if kind in _LETTERS_BEFORE:
        start -= _LETTERS_BEFORE[kind]
    value = text[start:end]
    if kind == "iban":
        length = _valid_iban(value)
        return Span(start, start + length, "IBAN") if length else None
    if kind == "card":
        return Span(start, end, "CARD") if _valid_card(value) else None
    if kind in _PHONE_DIGITS:
        low, high = _PHONE_DIGITS[kind]
        return Span(start, end, "PHONE") if low <= sum(c.isdigit() for c in value) <= high else None
    if kind == "nino" or kind == "nino_spaced":
        return Span(start, end, "NATIONAL_ID") if value[:2] not in _NINO_NEVER else None
    if kind == "bare":
        before = text[max(0, start - 30) : start].lower()
        if len(value) >= 10 and _PHONE_WORDS.search(before):
            return Span(start, end, "PHONE")
        if len(value) == 9 and _SSN_WORDS.search(before) and _us_ssn.is_valid(value):
            return Span(start, end, "NATIONAL_ID")
        return None
    return Span(start, end, "NATIONAL_ID") if _STDNUM_CHECKS[kind](value) else None


def _numbers(text: str, spans: list[Span]) -> None:
    pos = 0
    search = _NUMBERS.search
    while True:
        m = search(text, pos)
        if m is None:
            return
        group = m.lastgroup
        assert group is not None  # every alternative of _NUMBERS is a named group
        kind = group if group != "sep" else "ssn"
        span = _check_number(kind, m, text)
        if span is None:  # the kinds after it, at the same place
            for other in _NUMBER_ORDER[_NUMBER_ORDER.index(kind) + 1 :]:
                m2 = _NUMBER_ONE[other].match(text, m.start())
                if m2 is not None:
                    span = _check_number(other, m2, text)
                    if span is not None:
                        break
        if span is not None and not _overlaps(spans, span.start, span.end):
            spans.append(span)
            pos = max(span.end, m.start() + 1)
        else:
            # Go on after the candidate, as a scan for one kind would: digits inside a longer number that
            # failed its check ("0532 0130 01" inside an IBAN with a wrong check digit) are not a phone.
            pos = m.end()


# --- scanning ---------------------------------------------------------------------------------------------------


def _overlaps(spans: list[Span], start: int, end: int) -> bool:
    for span in spans:
        if start < span.end and span.start < end:
            return True
    return False


# --- names and postal addresses: one scan for where either may start ----------------------------------------------
# A house number, a UK postcode or a run of capitalised words starts right after a space or a line break.
# Starting the pattern with that literal lets the regex engine jump from space to space in C, and a space
# before a lower-case letter (most of them) fails at the next character; a scan that stopped at every
# capital and at every digit cost about 1.5 times more (bench/pii.py, cpu_us_per_text). The text is scanned
# with a space in front, so that its first word counts too. What each finds is judged in
# flywheel.data.pii_address and flywheel.data.pii_names.
_ANCHORS = (
    f"[0-9](?P<house>{pii_address.HOUSE_REST})"
    f"|[A-Z](?P<postcode>{pii_address.POSTCODE_REST})"
    f"|[{pii_names.UPPER}](?P<run>{pii_names.RUN_REST})"
)
_AFTER_SPACE = re.compile(f" (?:{_ANCHORS})")
_AFTER_NEWLINE = re.compile(f"\n(?:{_ANCHORS})")


def places_and_people(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(postal addresses, person names) in `text`, each a list of (start, end) in order."""
    padded = " " + text
    matches: Any = _AFTER_SPACE.finditer(padded)
    if "\n" in text:
        matches = sorted([*matches, *_AFTER_NEWLINE.finditer(padded)], key=lambda m: m.start())
    addresses: list[tuple[int, int]] = []
    people: list[tuple[int, int]] = []
    for m in matches:
        kind = m.lastgroup
        start, end = m.start(), m.end() - 1  # in `text`: the anchor starts one after the space in `padded`
        if addresses and start < addresses[-1][1]:
            continue  # inside the address just found: "Baker Street", "London NW1 6XE"
        if kind == "run":
            run = padded[m.start() + 1 : m.end()]
            if " " in run or run not in pii_names.never_alone():  # most runs are one common word: "Please", "Settings"
                people += pii_names.names_in_run(text, start, run)
        else:
            found = (
                pii_address.address_at_number(text, start, end) if kind == "house" else pii_address.address_at_postcode(text, start, end)
            )
            if found is not None:
                addresses.append(found)
    if "name" in text:
        pii_names.lower_case_names(text, people)
    return addresses, people


def _add(spans: list[Span], found: list[tuple[int, int]], kind: str) -> None:
    for start, end in found:
        if not _overlaps(spans, start, end):
            spans.append(Span(start, end, kind))


def find_pii(text: str) -> list[Span]:
    """Every PII span in `text`, sorted by position. Earlier kinds in the scan order win overlaps:
    secrets, e-mail, IBAN, card, national id, phone (a key or an IBAN may contain phone-like digits),
    date of birth, address, person (a street may be named after a person: "Victoria Crescent")."""
    if not text:
        return []
    spans = [Span(start, end, "SECRET") for start, end in secret_spans(text)]
    if "@" in text:
        _emails(text, spans)
    # Every number kind has at least six digits; counting them in bytes costs far less than a scan.
    digits = _digit_count(text)
    if digits >= 6:
        _numbers(text, spans)
    if digits and may_hold_birth(text):  # every date has a digit ("the 4th of May")
        found = birth_date_spans(text)
        if found:
            _add(spans, found, "DOB")
    addresses, people = places_and_people(text)
    if addresses:
        _add(spans, addresses, "ADDRESS")
    if people:
        _add(spans, people, "PERSON")
    if len(spans) > 1:
        spans.sort(key=lambda s: s.start)
    return spans


def may_contain_pii(text: str) -> bool:
    """A cheap test: False means `find_pii` finds nothing."""
    return bool(text) and (
        "@" in text or may_hold_token(text) or may_hold_key_value(text) or _digit_count(text) >= 1 or pii_names.may_hold_name(text)
    )


def _digit_count(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))


class Scrubber:
    """Replaces PII with placeholders and counts what it replaced, per kind."""

    __slots__ = ("counts", "_clean")

    # Texts seen clean before (system prompts, canned answers, tool schemas repeat in every logged
    # conversation, and so do short ones: "That doesn't answer my question", "How do I stop the
    # auto-renewal?") are not scanned again. Below 24 characters the scan costs about what the lookup does.
    # (It was 100 while a scan cost 2 µs; finding names, which takes a look at every capital, made it 6.)
    # Bounded: the cache is dropped when it fills.
    CACHE_MIN_CHARS = 24
    CACHE_ENTRIES = 4096

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._clean: dict[str, None] = {}

    def text(self, text: str) -> str:
        if not text or (len(text) >= self.CACHE_MIN_CHARS and text in self._clean):
            return text
        spans = find_pii(text)
        if not spans:
            if len(text) >= self.CACHE_MIN_CHARS:
                if len(self._clean) >= self.CACHE_ENTRIES:
                    self._clean.clear()
                self._clean[text] = None
            return text
        parts: list[str] = []
        last = 0
        for span in spans:
            parts.append(text[last : span.start])
            parts.append(PLACEHOLDER[span.kind])
            self.counts[span.kind] += 1
            last = span.end
        parts.append(text[last:])
        return "".join(parts)

    def texts(self, texts: list[str]) -> list[str]:
        """Scrub several texts; returns `texts` itself when nothing was found. (One scan over the texts
        joined was tried: the six-digit test that skips the number scan then rarely applies, and it was
        slower than a scan per text.)"""
        out: list[str] | None = None
        for index, text in enumerate(texts):
            cleaned = self.text(text)
            if cleaned is not text:
                if out is None:
                    out = list(texts)
                out[index] = cleaned
        return texts if out is None else out

    def json_text(self, text: str) -> str:
        """Scrub JSON text (tool-call arguments) value by value, so that escapes such as '\\n' before a
        number do not hide it and the result stays valid JSON. Text that is not JSON is scrubbed as text."""
        if not may_contain_pii(text):
            return text
        # Most arguments hold ids and dates only: scan the text itself first (escapes blanked out, same
        # length) and parse the JSON only when something is there.
        probe = text.replace("\\n", "  ").replace("\\t", "  ").replace("\\r", "  ").replace('\\"', "  ") if "\\" in text else text
        if not find_pii(probe) and not _may_hold_pii_key(probe):
            return text
        try:
            value = json.loads(text)
        except ValueError:
            return self.text(text)
        cleaned = self._walk(value)
        if cleaned == value:
            return text  # nothing found: keep the caller's exact formatting (and content hash)
        return json.dumps(cleaned, ensure_ascii=False, separators=(", ", ": "))

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self._walk(v) for v in value]
        if isinstance(value, dict):
            # {"api_key": "...", "dob": "..."}: the value alone has no context, so the key name supplies it
            out = {}
            for key, item in value.items():
                name = self.text(key) if isinstance(key, str) else key
                kind = _key_kind(str(key), item) if isinstance(item, str) else None
                if kind is not None:
                    self.counts[kind] += 1
                    out[name] = PLACEHOLDER[kind]
                else:
                    out[name] = self._walk(item)
            return out
        return value


# JSON keys that say what their value is, for values without a cue of their own: {"dob": "1985-04-12"},
# {"last_name": "Okafor"}, {"street": "12 Oak Lane"}. Compared lower-cased without '_' and '-', so that
# "first_name", "firstName" and "First-Name" are one key. A plain "name" is left out: tools name products.
_NAME_KEYS = frozenset(
    """firstname lastname fullname middlename givenname familyname surname customername
    cardholder cardholdername holdername accountholder accountholdername contactname recipientname recipient""".split()
)
_BIRTH_KEYS = frozenset("dob dateofbirth birthdate birthday birthdt".split())
_ADDRESS_KEYS = frozenset(
    """address street streetaddress addressline1 addressline2 address1 address2 line1 line2
    shippingaddress billingaddress deliveryaddress homeaddress postaladdress mailingaddress""".split()
)
_NAME_VALUE = re.compile(r"[^\W\d_][^\W\d_'’.-]*(?:[ '’.-]+[^\W\d_]+){0,4}\.?")


def _key_kind(key: str, value: str) -> str | None:
    """The kind of PII that the key `key` says `value` is, if the value has that shape too."""
    compact = key.lower().replace("_", "").replace("-", "")
    if len(value) >= 8 and key.lower().endswith(KEY_SUFFIXES) and looks_random(value):
        return "SECRET"  # {"api_key": "..."}
    if compact in _NAME_KEYS and _NAME_VALUE.fullmatch(value.strip()):
        return "PERSON"
    if compact in _BIRTH_KEYS and is_date(value.strip()):
        return "DOB"
    if compact in _ADDRESS_KEYS and _digit_count(value) and len(value) > 3:
        return "ADDRESS"
    return None


def _may_hold_pii_key(text: str) -> bool:
    lower = text.lower()
    return (
        "name" in lower
        or "birth" in lower
        or "dob" in lower
        or "address" in lower
        or "street" in lower
        or "holder" in lower
        or "recipient" in lower
        or "line1" in lower
    )


def scrub(text: str) -> str:
    """`text` with every PII span replaced by its placeholder."""
    return Scrubber().text(text)
