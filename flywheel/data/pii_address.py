"""Postal addresses for flywheel.data.pii: a street with its house number, then what follows it.

    address_at_number(text, start, end)     the address around a house number flywheel.data.pii found
    address_at_postcode(text, start, end)   the address ending in a UK postcode it found

Every street address found has a house number (or a UK postcode), so the scan (in flywheel.data.pii)
starts from numbers, and this module looks at the words on either side of each:
  - number first (US, UK, Irish, Australian, French): "742 Evergreen Terrace", "300 W Main St",
    "221B Baker Street", "12 rue de la Paix", "3 bis boulevard Saint-Michel": capitalised words ending in a
    street type (Street, St, Road, Avenue, Lane, Drive, Terrace, Close, Crescent, Way, ...), or a French
    street type followed by its name;
  - number after the street (German, Dutch, Nordic, Italian, Spanish, Portuguese, Polish):
    "Hauptstraße 5", "Musterstr. 12a", "Keizersgracht 123", "Via Roma 15", "Calle de Alcalá 45",
    "ul. Marszałkowska 84": a word ending in a street suffix (-straße, -weg, -gasse, -allee, -platz,
    -gracht, -straat, -laan, ...), or a street-type word and the name after it;
  - "PO Box 4521".
Then, as long as they follow: a flat or suite ("Apt 4B", "Suite 3300", "#210", "2nd Floor"), cities,
a US state with its ZIP code, a UK, Canadian, Dutch, Portuguese or Polish postcode, a 4-5 digit postcode
with its city ("10115 Berlin"), an Australian state and postcode. A flat, unit or building name just
before the number ("Flat 3, 14 Kings Road") belongs to the address too. A full UK postcode alone
("SW1A 2AA") is an address (it narrows down to a few houses); cities, streets without a number, and ZIP
codes alone are not.

Kept out: a number of things bought ("order 3 Garden Way planters"), numbers inside dates, amounts and
versions (the number must stand alone), and capitalised words after a street that are a greeting. Missed:
an address that does not follow a space, a line break or the start of the text ("(742 Evergreen ...").
"""

from __future__ import annotations

import re

_CAP = r"[A-ZÀ-ÖØ-ÞĀ-Ž][\w'’.-]*"
# What flywheel.data.pii scans for, after a space or a line break (one scan for addresses and names): a house
# number that stands alone (not part of a date, amount, version or time: "2026-02-01", "4.2.1", "3pm";
# "221B", "12a" and "2/45" are house numbers), and a UK postcode ("SW1A 2AA", "M1 1AE"). Each pattern is
# what follows its first character (a digit, a capital). Classes are explicit ASCII ranges: a bitmap test
# costs less than the Unicode category behind \w.
HOUSE_REST = r"[0-9]{0,4}(?:[A-Za-z](?![0-9A-Za-z_]))?(?:/[0-9]{1,5}[A-Za-z]?)?(?![0-9A-Za-z_]|[-/.:,][0-9])"
POSTCODE_REST = r"[A-Z]?[0-9][A-Z0-9]? ?[0-9][ABD-HJLNP-UW-Z]{2}(?![A-Za-z0-9])"
_UK_POSTCODE = "[A-Z]" + POSTCODE_REST

# Number first, English street types: up to four capitalised words, the type last, then a compass suffix.
_EN_TYPES = (
    "Street|St|Road|Rd|Avenue|Ave|Av|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Place|Pl|Terrace|Terr|Way|Close|"
    "Crescent|Cres|Square|Sq|Parkway|Pkwy|Highway|Hwy|Circle|Cir|Trail|Trl|Gardens|Grove|Hill|View|Row|Walk|"
    "Mews|Estate|Green|Rise|Parade|Loop|Alley|Path|Quay|Wharf|Broadway|Heights|Gate|Walkway|Expressway|Pike"
)
_NUMBER_FIRST_EN = re.compile(
    rf" (?:(?:N|S|E|W|North|South|East|West)\.? )?(?:{_CAP} ){{0,4}}(?:{_EN_TYPES})\b\.?(?: (?:N|S|E|W|NE|NW|SE|SW)\b)?"
)
# The same in lower case, two words at most and no little words: "12 church street".
_NUMBER_FIRST_LOWER = re.compile(
    r" (?!(?:the|a|an|on|in|at|of|to|my|your|our|and|or|for|from|with|by) )[a-z]+ (?:street|road|avenue|lane|drive)\b"
)
# Number first, French (also Swiss and Belgian) street types, then the street's name: "12 rue de la Paix".
_NUMBER_FIRST_FR = re.compile(
    r"(?: (?:bis|ter))?,? (?i:rue|avenue|av\.|boulevard|bd|place|allée|chemin|impasse|quai|cours|route|passage|square|voie)"
    rf"(?: (?:de|du|des|de la|d'|l'|la|le|les|aux?)?{_CAP}|(?: (?:de|du|des|la|le|les|aux?))(?= )){{1,5}}"
)
# Street before the number: the word just before it ends in one of these ("Hauptstraße", "Keizersgracht").
_SUFFIXES = (
    "straße",
    "strasse",
    "str.",
    "weg",
    "gasse",
    "allee",
    "platz",
    "damm",
    "ufer",
    "chaussee",
    "gracht",
    "straat",
    "laan",
    "kade",
    "plein",
    "singel",
    "dijk",
    "kai",
    "markt",
    "steig",
    "pfad",
    "vej",
    "vägen",
    "gatan",
    "gata",
    "veien",
)
# ... or is a whole street word of its own, after a name ("Wiener Straße 18", "Nordre gate 14").
_SUFFIX_WORDS = frozenset(("straße", "strasse", "str.", "weg", "gasse", "allee", "platz", "gate", "gata", "vej", "vei", "ring"))
# ... or the street's name follows one of these types ("Via Roma 15", "Calle de Alcalá 45", "Rua Augusta 120").
_TYPES_BEFORE = frozenset(
    (
        "via",
        "viale",
        "piazza",
        "corso",
        "largo",
        "calle",
        "avenida",
        "av.",
        "plaza",
        "paseo",
        "carrer",
        "rua",
        "travessa",
        "praça",
        "ul.",
        "ulica",
        "al.",
        "aleja",
        "boulevard",
        "rue",
        "avenue",
        "chemin",
        "place",
        "box",
    )
)
_GERMAN_PREFIX = frozenset(("Am", "An", "Auf", "Im", "In", "Zum", "Zur", "Unter", "Hinter"))
_NAME_PARTICLES = frozenset(("de", "da", "del", "della", "di", "do", "dos", "das", "la", "las", "los", "le", "des", "du", "y", "e"))
# A quantity, not a house number: "order 3 Garden Way planters" (unless a city or postcode follows).
_QUANTITY_WORDS = frozenset(
    (
        "order",
        "ordered",
        "buy",
        "bought",
        "need",
        "want",
        "get",
        "got",
        "add",
        "added",
        "have",
        "has",
        "had",
        "x",
        "qty",
        "quantity",
        "pack",
        "set",
        "sets",
        "with",
    )
)

_US_STATES = frozenset(
    """AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ
NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR""".split()
)
# A city's words are letters only, so that a postcode after it ("London NW1 6XE") is not taken for a word.
_CITY_WORD = r"[A-ZÀ-ÖØ-ÞĀ-Ž][a-zß-öø-ÿĀ-ž'’.]+(?:-[A-ZÀ-ÖØ-ÞĀ-Ža-z][a-zß-öø-ÿĀ-ž'’.]+)*"
_CITY = rf"{_CITY_WORD}(?: (?:(?:am|an|der|de|la|le|sur|upon|on|del|di) )?{_CITY_WORD}){{0,2}}"
# What may follow the street, part by part.
_TAIL = re.compile(
    r"(?P<unit>,? (?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Fl\.?|Floor|Level|Room|Bldg\.?|Building) ?#?[0-9][0-9A-Za-z-]*|,? #[0-9][0-9A-Za-z-]*"
    r"|, [0-9]{1,2}(?:st|nd|rd|th) Floor|, [0-9]{1,2}º ?[a-z]+\.?)"
    rf"|(?P<state>,? (?P<st>[A-Z]{{2}}) [0-9]{{5}}(?:-[0-9]{{4}})?(?![\w])|,? (?:ON|QC|BC|AB|MB|SK|NS|NB|NL|PE) [A-Z][0-9][A-Z] ?[0-9][A-Z][0-9](?![\w])"
    r"|,? (?:NSW|VIC|QLD|WA|SA|TAS|ACT|NT) [0-9]{4}(?![\w]))"
    rf"|(?P<postcode>,? {_UK_POSTCODE}"
    rf"|,? (?:[0-9]{{4,5}}|[0-9]{{4}} ?[A-Z]{{2}}|[0-9]{{4}}-[0-9]{{3}}|[0-9]{{2}}-[0-9]{{3}}) {_CITY})"
    rf"|(?P<city>, {_CITY}(?: [0-9]{{1,4}}(?![\w.,/:-]))?)"
)
_NOT_CITY = frozenset(
    (
        "Thanks",
        "Thank",
        "Please",
        "Regards",
        "Cheers",
        "Best",
        "Hi",
        "Hello",
        "Dear",
        "The",
        "I",
        "We",
        "My",
        "Our",
        "It",
        "This",
        "That",
        "Is",
        "Was",
        "Can",
        "Could",
        "Would",
        "Will",
        "And",
        "But",
        "Or",
        "So",
        "Also",
        "Not",
        "No",
        "Yes",
        "If",
        "When",
        "Since",
        "As",
        "Sent",
        "Kind",
        "Ok",
        "OK",
    )
)
# Before the number: "Flat 3, ", "Apartment 5, ", "Level 4, ", "Flat 12B, Marlowe House, ".
_UNIT_BEFORE = re.compile(
    r"(?:(?:Flat|Unit|Apt\.?|Apartment|Suite|Level|Floor|Room) [0-9A-Za-z]+, )?(?:[A-Z][\w'’-]+ (?:House|Court|Building|Tower|Mansions|Lodge|Hall|Centre|Center|Estate), )?$"
)
# Before a postcode found alone: capitalised places and a unit ("Unit 3, Riverside Industrial Estate, Dartford").
_PLACES_BEFORE = re.compile(
    rf"(?:(?:Flat|Unit|Apt\.?|Apartment|Suite) [0-9A-Za-z]+, )?(?:{_CAP}(?: {_CAP}){{0,3}}, ){{0,2}}(?:{_CAP}(?: {_CAP}){{0,2}} )?$"
)


def _street_before(text: str, start: int) -> int:
    """Start of a street name that ends just before the house number at `start`, or -1."""
    words = text[max(0, start - 48) : start].split(" ")
    if len(words) < 2 or words[-1] != "":
        return -1  # the number must follow a space
    words.pop()
    last = words[-1].rstrip(",")
    if not last or last != words[-1]:
        return -1
    lower = last.lower()
    n = len(words)
    first = -1
    if lower.endswith(_SUFFIXES) and len(lower) > 5 and last[0].isupper():
        first = n - 1
        if lower in _SUFFIX_WORDS:  # "Wiener Straße", "Nordre gate": the name is the word before
            first = n - 2 if n >= 2 and words[n - 2][:1].isupper() else -1
        elif n >= 2 and words[n - 2] in _GERMAN_PREFIX:
            first = n - 2
    elif lower in _SUFFIX_WORDS and n >= 2 and words[n - 2][:1].isupper():
        first = n - 2
    else:
        # "Via Roma", "Calle de Alcalá", "Avenida da Liberdade", "PO Box": a type, then capitalised words
        for i in range(n - 1, max(-1, n - 6), -1):
            word = words[i]
            if word.lower() in _TYPES_BEFORE and i < n - 1 or word.lower() == "box" and i == n - 1:
                if word.lower() == "box":
                    if i >= 1 and words[i - 1].replace(".", "").upper() == "PO":
                        first = i - 1
                elif word[:1].isupper() or word in ("ul.", "al."):
                    first = i
                break
            if not (word[:1].isupper() or word in _NAME_PARTICLES) or word.endswith((",", ".", ":", ";")):
                break
    if first < 0:
        return -1
    return start - sum(len(w) + 1 for w in words[first:])


def _tail(text: str, end: int) -> tuple[int, bool]:
    """Where the address ends after the street at `end`, and whether a city, state or postcode followed."""
    cities = 0
    placed = False
    for _ in range(6):
        m = _TAIL.match(text, end)
        if m is None:
            break
        if m.group("city") is not None:
            if cities == 2 or m.group("city")[2:].split(" ", 1)[0] in _NOT_CITY:
                break
            cities += 1
        elif m.group("state") is not None and m.group("st") is not None and m.group("st") not in _US_STATES:
            break
        if m.group("unit") is None:
            placed = True
        end = m.end()
    return end, placed


def address_at_number(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The address around the house number at start:end, if a street goes with it."""
    street_end = -1
    after = text[end : end + 3].lstrip(" ,")
    if after[:1].isalpha() and after != text[end : end + 3]:  # a word after a space: "742 Evergreen", "12, rue"
        for pattern in (_NUMBER_FIRST_EN, _NUMBER_FIRST_FR, _NUMBER_FIRST_LOWER):
            s = pattern.match(text, end)
            if s is not None and s.end() > street_end:
                street_end = s.end()
    if street_end > 0:
        street_start = start
        if text.endswith(", ", 0, start):  # "Flat 3, 14 Kings Road": only then is the regex worth its scan
            prefix = _UNIT_BEFORE.search(text, max(0, start - 60), start)
            street_start = prefix.start() if prefix is not None and prefix.end() == start else start
    elif start > 1 and text[start - 1] == " " and (text[start - 2].isalpha() or text[start - 2] == "."):  # "Hauptstraße 5", "Str. 5"
        street_start = _street_before(text, start)
        if street_start < 0:
            return None
        street_end = end
    else:
        return None
    stop, placed = _tail(text, street_end)
    if not placed and street_start == start:
        before = text[max(0, start - 16) : start].split()
        if before and before[-1].lower() in _QUANTITY_WORDS:
            return None
    return street_start, stop


def address_at_postcode(text: str, start: int, end: int) -> tuple[int, int]:
    """The address that ends with the UK postcode at start:end: the places and unit written before it."""
    before = _PLACES_BEFORE.search(text, max(0, start - 90), start)
    if before is not None and before.end() == start and before.start() < start:
        start = before.start()
    return start, end
