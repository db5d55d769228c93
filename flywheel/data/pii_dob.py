"""Dates of birth for flywheel.data.pii: a date that a birth word announces.

    birth_date_spans(text) -> [(start, end), ...]

A date counts only after a birth cue in the same sentence, at most 40 characters before it: "born",
"DOB", "D.O.B.", "date of birth", "birth date", "birthday", "née le", "date de naissance",
"Geburtsdatum", "geboren", "fecha de nacimiento", "data di nascita". Every other date (order, delivery,
invoice and renewal dates) is training data and stays. The cue stays too; the span is the date. A second
date right after a birth date ("from 05/06/1990 to 06/05/1990") is one as well.

Date forms: 1985-04-12, 1985/04/12, 12/04/1985, 12.04.1985, 7/4/76, 12 April 1985, 12th of April 1985,
April 12, 1985, Apr 12 1985, 19-Mar-1977, May 1990, and day and month alone after a birthday cue
("June 12th", "9/14"), in English, German, French, Spanish and Italian month names. Numbers are checked
(day 1-31, month 1-12 either way round, year 1900-2099), so "19.99" is no date.
Kept out: a date after "birthday discount valid until", "offer ends", "before" and the like.
"""

from __future__ import annotations

import re

_MONTHS = (
    "january|february|march|april|may|june|july|august|september|october|november|december|"
    "jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec|"
    "januar|februar|märz|mai|juni|juli|oktober|dezember|"  # German (the rest are spelled as in English)
    "janvier|février|mars|avril|juin|juillet|août|septembre|octobre|novembre|décembre|"  # French
    "enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|octubre|noviembre|diciembre|"  # Spanish
    "gennaio|febbraio|aprile|maggio|giugno|luglio|settembre|ottobre|dicembre"  # Italian
)
_ORDINAL = r"(?:st|nd|rd|th|er|º)?"
_MONTH = rf"(?:{_MONTHS})\b"
_DATE = (
    r"(?:(?P<ymd>[12][0-9]{3})[-/.](?P<m1>[0-9]{1,2})[-/.](?P<d1>[0-9]{1,2})(?![0-9])"
    r"|(?P<a>[0-9]{1,2})[-/.](?P<b>[0-9]{1,2})[-/.](?P<y>[0-9]{4}|[0-9]{2})(?![0-9])"
    rf"|[0-9]{{1,2}}-{_MONTH}-[0-9]{{4}}"
    rf"|[0-9]{{1,2}}{_ORDINAL}\.?(?: of)? {_MONTH}\.?,?(?: [12][0-9]{{3}})?(?![0-9])"
    rf"|{_MONTH}\.? [0-9]{{1,2}}{_ORDINAL}(?:,? [12][0-9]{{3}})?(?![0-9])"
    rf"|{_MONTH} [12][0-9]{{3}}(?![0-9])"
    r"|(?P<md_a>[0-9]{1,2})/(?P<md_b>[0-9]{1,2})(?![0-9/.-]))"
)
_CUE = re.compile(
    r"(?:date of birth|birth ?date|birthday(?:'s)?|b-day|\bd\.?o\.?b\b\.?|\bborn|\bnée?|date de naissance|naissance|anniversaire"
    r"|geburtsdatum|geburtstag|geboren|fecha de nacimiento|nacimiento|nacido|nacida|data di nascita|\bnat[oa] il\b)",
    re.IGNORECASE,
)
# Between the cue and the date: no sentence end, and no word that makes the date something else.
# (Nor a placeholder: "birthday as [DOB] but it shows February 1st" must not find a second date once the
# first is scrubbed, or scrubbing twice would differ from scrubbing once.)
_GAP = re.compile(r"[^.!?\n0-9\[\]]{0,40}?(?=[0-9]|(?:the )?(?:" + _MONTHS + r")\b)", re.IGNORECASE)
_NOT_BIRTH = re.compile(
    r"\b(?:until|till|valid|expir\w*|before|ends?|sale|off|coupon|discount|voucher|offer|order\w*|deliver\w*|ship\w*|renew\w*)\b",
    re.IGNORECASE,
)
_DATE_AT = re.compile(_DATE, re.IGNORECASE)
_NEXT = re.compile(r"[^.!?\n0-9\[\]]{1,20}?(?=[0-9])")


def _plausible(m: re.Match[str]) -> bool:
    if m.group("ymd"):
        return 1 <= int(m.group("m1")) <= 12 and 1 <= int(m.group("d1")) <= 31
    if m.group("a"):
        a, b = int(m.group("a")), int(m.group("b"))
        y = m.group("y")
        if len(y) == 4 and not 1900 <= int(y) <= 2099:
            return False
        return 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12)
    if m.group("md_a"):
        a, b = int(m.group("md_a")), int(m.group("md_b"))
        return 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12)
    return True


def is_date(text: str) -> bool:
    """Whether `text` is one date and nothing else (a value under a birth-date key)."""
    m = _DATE_AT.fullmatch(text)
    return m is not None and _plausible(m)


# The English and German cues all hold a 'b' (birth, born, dob, d.o.b, Geburt, geboren): a search for the
# literal 'b' (memchr-fast) that then looks around it costs less than a test per cue word.
_B_CUE = re.compile(r"b(?:irth|orn|-day|(?<=dob)|(?<=o\.b)|(?<=geb))")
_NA_CUE = re.compile(r"na(?:iss|ci|sci|t[oa] il)")  # naissance, nacimiento/nacido, nascita, "nato il"


def may_hold_birth(text: str) -> bool:
    """A cheap test for the cue words: False means `birth_date_spans` finds nothing."""
    lower = text.lower()
    return _B_CUE.search(lower) is not None or "né" in lower or "anniv" in lower or _NA_CUE.search(lower) is not None


def birth_date_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every date of birth in `text`, in order."""
    found: list[tuple[int, int]] = []
    for cue in _CUE.finditer(text):
        gap = _GAP.match(text, cue.end())
        if gap is None or _NOT_BIRTH.search(gap.group()):
            continue
        date = _DATE_AT.match(text, gap.end())
        while date is not None and _plausible(date):
            if not found or date.start() >= found[-1][1]:
                found.append((date.start(), date.end()))
            nxt = _NEXT.match(text, date.end())  # "from 05/06/1990 to 06/05/1990"
            if nxt is None or _NOT_BIRTH.search(nxt.group()):
                break
            date = _DATE_AT.match(text, nxt.end())
            if date is not None and not (date.group("ymd") or date.group("a")):
                break  # only full numeric dates chain on
    return found
