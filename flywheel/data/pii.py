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

Why regular expressions plus checksum validation rather than a library: Microsoft Presidio's pattern
recognizers do run offline (with its NoOpNlpEngine, no spaCy model), but bench/pii.py measured them about
150x slower per text on the same logs (ingest would top out near 700 conversations a second), with lower
recall on phones and national ids and no recognizer for API keys; numbers in docs/ingest.md.

Speed: most logged text holds no PII. Substring tests (memchr-fast) decide whether the secret patterns run
at all, a byte-level digit count whether the number scan runs (every number kind has six digits or more),
and one scan then finds every number kind. Long texts found clean are remembered (system prompts repeat in
every conversation). Every candidate of a checksummed kind is validated, which is what keeps order numbers,
amounts and card-like numbers failing Luhn out.

Scrubbing is idempotent (placeholders hold no digits, no '@' and no key=value shape), so re-ingesting
already scrubbed text changes nothing and its content hash stays the same.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.es import dni as _es_dni
from stdnum.es import nie as _es_nie
from stdnum.fr import nir as _fr_nir
from stdnum.it import codicefiscale as _it_cf
from stdnum.us import ssn as _us_ssn

KINDS: tuple[str, ...] = ("EMAIL", "PHONE", "CARD", "IBAN", "NATIONAL_ID", "SECRET")
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


# --- secrets ---------------------------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe secret / restricted keys
    r"|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}"  # AWS access key ids
    r"|ghp_[A-Za-z0-9]{30,}|gho_[A-Za-z0-9]{30,}|ghu_[A-Za-z0-9]{30,}|ghs_[A-Za-z0-9]{30,}|ghr_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs (header.payload.signature)
    # a Bearer token: the token only, the word stays
    r"|Bearer\s+(?P<b1>[A-Za-z0-9._~+/-]{16,}=*)|bearer\s+(?P<b2>[A-Za-z0-9._~+/-]{16,}=*)|BEARER\s+(?P<b3>[A-Za-z0-9._~+/-]{16,}=*)"
)
# A value after key=, token:, "api_key": "...": found from the separator, then the key name is looked for
# just before it, and the value is kept only if it looks random (checked below). The value stops at the next
# ':' or '=' so that "config: API_KEY=..." is tried again from the second separator.
_KEY_VALUE = re.compile(r"[:=][ \t]*[\"']?(?P<value>[^\s\"'`,;<>()\[\]{}:=\x00]{8,})")
# The key names, as the endings of the word just before the separator ("stripe_api_key", "X-Auth-Token").
_KEY_SUFFIXES = tuple(
    f"{a}{sep}{b}" if b else a
    for a, b in (("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("client", "secret"), ("access", "token"),
                 ("auth", "token"), ("refresh", "token"), ("apikey", ""), ("secret", ""), ("token", ""), ("password", ""), ("passwd", ""),
                 ("pwd", ""), ("credential", ""), ("credentials", ""), ("auth", ""), ("key", ""))
    for sep in ("_", "-", "")
)
_WORDISH = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _looks_random(value: str) -> bool:
    """A value after key= counts as a secret when it is long and mixed enough not to be a word."""
    if value.startswith("[") or value.isalpha() and value.islower():
        return False
    classes = sum((any(c.islower() for c in value), any(c.isupper() for c in value), any(c.isdigit() for c in value), any(not c.isalnum() for c in value)))
    if len(value) >= 16:
        counts = Counter(value)
        entropy = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
        return entropy >= 3.0 and classes >= 2
    return classes >= 3  # short values (passwords): need three character classes, e.g. "Hunter2!"


def _may_hold_token(text: str) -> bool:
    """Substring tests (memchr-fast) for the prefixes of the token kinds: most text has none of them."""
    if "-" in text and ("sk-" in text or "xox" in text):
        return True
    if "_" in text and ("sk_" in text or "rk_" in text or "gh" in text or "github" in text):
        return True
    return "AKIA" in text or "ASIA" in text or "AIza" in text or "eyJ" in text or "earer" in text or "EARER" in text


def _may_hold_key_value(text: str) -> bool:
    if ":" not in text and "=" not in text:
        return False
    lower = text.lower()
    return "key" in lower or "token" in lower or "secret" in lower or "passw" in lower or "pwd" in lower or "auth" in lower or "credential" in lower


def _secrets(text: str, spans: list[Span]) -> None:
    if _may_hold_token(text):
        for m in _TOKEN.finditer(text):
            group = "b1" if m.group("b1") else "b2" if m.group("b2") else "b3" if m.group("b3") else None
            if group is not None:
                spans.append(Span(m.start(group), m.end(group), "SECRET"))
                continue
            start, end = m.span()
            if (start and (text[start - 1] in _WORDISH)) or (end < len(text) and text[end] in _WORDISH):
                continue  # part of a longer word: not one of the known token shapes
            spans.append(Span(start, end, "SECRET"))
    if _may_hold_key_value(text):
        for m in _KEY_VALUE.finditer(text):
            before = text[max(0, m.start() - 24) : m.start()].rstrip(" \t\"'").lower()
            if before.endswith(_KEY_SUFFIXES) and _looks_random(m.group("value")):
                start, end = m.span("value")
                rest = text[end : end + 3]
                padding = len(rest) - len(rest.lstrip("="))  # base64 padding belongs to the value
                if padding and (end + padding == len(text) or text[end + padding] in " \t\n\"',;&"):
                    end += padding
                if not _overlaps(spans, start, end):
                    spans.append(Span(start, end, "SECRET"))


# --- e-mail: found from the '@', the local part is then read backwards ----------------------------------------
_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])")
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
    ("nino_spaced", r"(?<=[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] [0-9])(?<![\w][A-Z]{2} [0-9])", r"[0-9] ?[0-9]{2} ?[0-9]{2} ?[A-D](?![\w])", 3),
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
_PHONE_WORDS = re.compile(r"(?:phone|tel|telephone|call|call me|mobile|cell|whatsapp|sms|text me|fax)(?: at| on| number| no\.?)?[^0-9\n\x00]{0,6}$")
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
        kind = m.lastgroup if m.lastgroup != "sep" else "ssn"
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


def find_pii(text: str) -> list[Span]:
    """Every PII span in `text`, sorted by position. Earlier kinds in the scan order win overlaps:
    secrets, e-mail, IBAN, card, national id, phone (a key or an IBAN may contain phone-like digits)."""
    if not text:
        return []
    spans: list[Span] = []
    _secrets(text, spans)
    if "@" in text:
        _emails(text, spans)
    # Every number kind has at least six digits; counting them in bytes costs far less than a scan.
    if _digit_count(text) >= 6:
        _numbers(text, spans)
    if len(spans) > 1:
        spans.sort(key=lambda s: s.start)
    return spans


def may_contain_pii(text: str) -> bool:
    """A cheap test: False means `find_pii` finds nothing."""
    return bool(text) and (
        "@" in text or _may_hold_token(text) or _may_hold_key_value(text) or _digit_count(text) >= 6
    )


def _digit_count(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass").translate(None, _NOT_DIGITS))


class Scrubber:
    """Replaces PII with placeholders and counts what it replaced, per kind."""

    __slots__ = ("counts", "_clean")

    # Long texts seen clean before (system prompts, canned answers, tool schemas repeat in every logged
    # conversation) are not scanned again. Bounded: the cache is dropped when it fills.
    CACHE_MIN_CHARS = 100
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
        if not find_pii(probe):
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
            # {"api_key": "..."}: the value alone has no key= context, so the key name supplies it
            out = {}
            for key, item in value.items():
                name = self.text(key) if isinstance(key, str) else key
                if isinstance(item, str) and len(item) >= 8 and str(key).lower().endswith(_KEY_SUFFIXES) and _looks_random(item):
                    self.counts["SECRET"] += 1
                    out[name] = PLACEHOLDER["SECRET"]
                else:
                    out[name] = self._walk(item)
            return out
        return value


def scrub(text: str) -> str:
    """`text` with every PII span replaced by its placeholder."""
    return Scrubber().text(text)
