"""Person names for flywheel.data.pii: a gazetteer of given names and surnames plus the cues around a name.

    names_in_run(text, start, run) -> [(start, end), ...]   each run of capitalised words flywheel.data.pii finds
    lower_case_names(text, found)                            adds names in lower case after "my name is"

A name is a run of capitalised words ("Johanna Mbeki-Larsson", "Pieter van der Berg", "O'Brien") that one of
these confirms, strongest first:
  - a title or a naming phrase before it: "Mr", "Dr.", "Prof.", "my name is", "Full name:", "je m'appelle";
    then any capitalised words count, known or not ("Dear Mrs. Okonkwo", "Cardholder name: Aisha Bello");
  - a greeting or a sign-off before it ("Hi", "Dear", "Thanks,", "Regards,\\n", "... - Maria" at the end),
    an introduction or a role ("I'm", "this is", "agent", "my wife", "spoke to"), or " here" after it:
    then two capitalised words, or one the gazetteer knows, count ("This is Chidi Okeke", "Thanks a lot
    Kofi"); after a greeting or a sign-off one unknown word counts too ("Merci, Émilie");
  - no cue: a known given name followed by more capitalised words ("Mark Jensen approved ..."), capitalised
    words ending in a known surname ("Rajesh Kumar"), a known surname with a known given name after it
    ("Nguyen Van Minh"), or a known given name alone in the middle of a sentence ("I talked to Hannah").
The title and the cue stay; the span is the name. Lower-case names are found only after a naming phrase
("my name is john smith"); a name that does not follow a space, a line break or the start of the text
('"Sarah"', "(Sarah)") is not looked at.

Precision comes from what a name must not be: words the gazetteer lists as given names that are also
ordinary words, months, places or brands (Will, May, Grace, Bill, Mark, Paris, Austin, Victoria, Jordan,
Chase, Max) count only after a title or with a known surname after them ("Will Thompson", not "Will you",
"Chase Bank"); a capitalised word that is a common English word ends the name, and one beside a place,
organisation or product word ("Baker Street", "Santa Clara", "Jade Garden") is no name without a title.

The gazetteer: the given names and surnames of Faker's person providers (every locale written in Latin
script: about 21,000 given names and 21,000 surnames, European, African, South and East Asian, Latin
American), and Faker's list of the ~970 most common English words as the ordinary words. Faker is a
test-data library, MIT licensed and released monthly; its lists are what it generates names from. Loaded
once per process, on the first run of capitalised words (0.17 s CPU, bench/pii.py).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re

# Capitalised word: an upper-case letter (Latin, with the accented and Latin Extended-A capitals), then
# letters; apostrophes and hyphens join parts ("O'Brien", "Mbeki-Larsson", "Dae-jung", "Lindiwe's").
_UPPER = "A-ZÀ-ÖØ-ÞĀĂĄĆĈĊČĎĐĒĔĖĘĚĜĞĠĢĤĦĨĪĬĮİĲĴĶĹĻĽĿŁŃŅŇŊŌŎŐŒŔŖŘŚŜŞŠŢŤŦŨŪŬŮŰŲŴŶŸŹŻŽ"
# Letters as explicit ranges (Latin, Latin-1, Latin Extended-A): the regex engine tests a range in a bitmap,
# a Unicode category (\w) with a lookup per character, and the scan below visits every capital.
_LETTER = "A-Za-zÀ-ÖØ-öø-ÿĀ-ſ"
_WORD_REST = rf"(?:['’][{_UPPER}])?[a-zß-öø-ÿĀ-ſ][{_LETTER}]*(?:[-'’][{_LETTER}]+)*"  # not "I", "ACME", "USB-C"
_WORD = rf"[{_UPPER}]" + _WORD_REST
# Lower-case particles inside a name: "Pieter van der Berg", "Yusuf bin Ahmad", "Maximilian von Hohenberg".
_PARTICLES = frozenset(
    (
        "van",
        "von",
        "der",
        "den",
        "de",
        "del",
        "della",
        "di",
        "da",
        "das",
        "dos",
        "du",
        "le",
        "la",
        "bin",
        "binti",
        "bint",
        "ibn",
        "al",
        "el",
        "ter",
        "ten",
        "zu",
        "y",
    )
)
# A run of capitalised words, after its first capital: flywheel.data.pii scans for a capital (or a digit)
# right after a space or a line break, one scan for names and addresses, and hands each run found here.
# One word alone at the start of the text or after a sentence ("Thanks", "Please", "Your": most capitalised
# words in support chats) is no name whatever precedes it, so the regex engine skips it unless " here"
# follows ("Priya here, ..."); a title's dot ("Mr. Smith") ends no sentence, as the word before it is short.
UPPER = _UPPER
_MORE_WORDS = r"(?:[ ]+(?:(?:" + "|".join(sorted(_PARTICLES)) + r")[ ]+){0,2}" + _WORD + "){1,5}"
RUN_REST = (
    r"(?=[a-zß-öø-ÿĀ-ſ'’])"  # not "I", "ACME", "USB-C"
    rf"(?:(?<![a-z]{{4}}[.!?] .)(?<!^ .){_WORD_REST}(?:{_MORE_WORDS})?"  # not first in its sentence: one word or more
    rf"|{_WORD_REST}(?:{_MORE_WORDS}|(?=,? here\b)))"  # first in its sentence: more words, or " here" after it
)
# A capitalised word after the first character: without one, or a naming phrase, no name is reported.
_CAPITALISED = re.compile(rf"[{_UPPER}][a-zß-öø-ÿ]")

NONE, ROLE, GREET, STRONG = 0, 1, 2, 3

# The cues, as the last words before a name (lower case, punctuation after them stripped).
_CUES: dict[str, int] = {
    **dict.fromkeys(
        """mr mrs ms miss mx dr prof sir dame madam mme mlle herr frau sr sra señor señora name names
        named m'appelle llamo heiße""".split(),
        STRONG,
    ),
    **dict.fromkeys(("name is", "name's", "name was", "name on the card is", "mein name ist", "je m'appelle", "me llamo"), STRONG),
    **dict.fromkeys(
        """dear hi hello hey hiya morning afternoon evening thanks thx cheers regards best wishes sincerely
        yours signed soon merci danke gracias bonjour hola hallo ciao""".split(),
        GREET,
    ),
    **dict.fromkeys(("thank you", "many thanks", "speak soon"), GREET),
    **dict.fromkeys(
        """i'm i’m im it's it’s agent rep representative customer cardholder holder owner contact recipient
        attn attention user member client patient guest passenger subscriber employee technician driver courier
        wife husband partner son daughter brother sister mother father mom mum dad colleague manager boss
        neighbour neighbor accountant assistant friend cfo ceo soy""".split(),
        ROLE,
    ),
    **dict.fromkeys(
        (
            "i am",
            "this is",
            "it is",
            "ask for",
            "spoke to",
            "spoke with",
            "talked to",
            "speak to",
            "speak with",
            "helped by",
            "signed for by",
            "filed by",
            "placed by",
            "called by",
            "message from",
            "fwd from",
            "contact person",
            "wife is",
            "husband is",
            "son is",
            "daughter is",
        ),
        ROLE,
    ),
}
_CUE_WORDS_MAX = max(len(cue.split()) for cue in _CUES)
_CUE_LAST_WORDS = frozenset(cue.split()[-1] for cue in _CUES)
# Cue words inside a run of capitalised words ("Dear Anna", "Agent Fatima", "Hi Sarah").
_CUE_IN_RUN = {word: strength for word, strength in ((w.capitalize(), s) for w, s in _CUES.items() if " " not in w)}
_AFTER_HERE = re.compile(r",? here\b")
_LINE_END = re.compile(r"[.!]?[ \t]*(?:\n|$)")
_NAME_ENDS = re.compile(r"[ \t]*(?:[,.!?;:)\n]|$)")
# A naming phrase followed by a name in lower case ("my name is john smith").
_NAMING_LOWER = re.compile(r"(?:\bmy name is|\bname is|\bname:|\bname's)[ \t]+(?P<name>[a-zà-ÿ]+(?: [a-zà-ÿ]+){0,3})", re.IGNORECASE)

# Words of place, organisation, brand and product names: a capitalised word right beside one belongs to that
# name ("Baker Street", "Santa Clara", "New York", "Jade Garden", "Chase Bank", "Galaxy Tab"), not a person's.
_THING_WORDS = frozenset(
    """
street st road rd avenue ave lane drive boulevard court place square park beach station bank tech energy pay plan
prime pro max plus ultra mini air edition collection series group corp inc ltd llc gmbh plc company co hub center
centre city county university college school hospital hotel airport mall bridge island valley hills hill lake river
garden gardens canyon mountain mountains national central north south east west new san santa saint fort port mount
bay retro secret angel express premium basic standard store shop office team support service services department
london paris berlin austin victoria sydney florence madison charlotte lincoln hamilton chelsea denver dallas houston
phoenix orlando savannah regina aurora kingston chester adelaide alexandria eugene jackson raleigh troy georgia
virginia carolina dakota jordan chad israel kenya india china chase alexa siri cortana tesla mercedes dell ford
lexus jaguar martens clean pepper muscle hilton marriott hyatt visa amex mastercard paypal apple google microsoft
amazon samsung sony galaxy pixel windows android iphone ipad mac macbook chrome firefox safari edge teams slack zoom
excel word outlook app apps cloud online portal dashboard
""".split()
)
# Other capitalised words that are no name without a cue: months, days, greetings, function words. (Faker's
# common English words come on top.)
_NOT_NAME = _THING_WORDS | frozenset(
    """
january february march april may june july august september october november december jan feb mar apr jun jul aug
sep sept oct nov dec monday tuesday wednesday thursday friday saturday sunday mon tue tues wed thu thur thurs fri sat
sun today tomorrow yesterday spring summer autumn fall winter christmas easter customer customers client billing
sales account accounts family business enterprise free trial settings security privacy admin valued everyone all
folks guys there world friend friends sir madam madame monsieur bot assistant ok okay yes no hello hi hey dear
thanks thank please sorry urgent important re fw fwd subject attachment invoice order refund receipt ticket case
error issue problem update version i'm i'd i'll i've does did is are was were has have had here where when why how
what which who whose this that these those my your our their his her its we you they he she it the an and or but so
if then also just still any some every each
""".split()
)


@functools.cache
def _lists() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(given names, surnames, lower-case words that are no name without a cue), from Faker's providers."""
    from faker.providers import person
    from faker.providers.lorem.en_US import Provider as Lorem

    latin = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿĀ-ſ'’ -]+")
    given: set[str] = set()
    surnames: set[str] = set()
    for module in pkgutil.iter_modules(person.__path__):
        provider = importlib.import_module(f"{person.__name__}.{module.name}").Provider
        for attrs, into in (
            (("first_names", "first_names_male", "first_names_female", "first_names_nonbinary", "first_romanized_names"), given),
            (("last_names", "last_romanized_names"), surnames),
        ):
            for attr in attrs:
                values = provider.__dict__.get(attr)
                if isinstance(values, (tuple, list, dict, set, frozenset)):
                    for name in values:  # "Mary Ann", "Jean-Luc": each word counts
                        if latin.fullmatch(name):
                            into.update(word for word in name.split() if len(word) > 1)
    common = frozenset(w.lower() for w in Lorem.word_list) | _NOT_NAME
    return frozenset(given), frozenset(surnames), common


def _known(word: str, names: frozenset[str]) -> bool:
    word = word.removesuffix("'s").removesuffix("’s")
    return word in names or ("-" in word and word.split("-", 1)[0] in names)


class _Segment:
    """Consecutive name words of a run, with what stands around them."""

    __slots__ = ("at_run_start", "by_place", "cue", "words")

    def __init__(self, cue: int, at_run_start: bool, by_place: bool):
        self.words: list[tuple[int, int, str]] = []  # (start, end, word)
        self.cue = cue
        self.at_run_start = at_run_start  # its cue, if any, is in the text before the run
        self.by_place = by_place  # a place, organisation or product word right before or after it


def _segments(run: str, offset: int, given: frozenset[str], surnames: frozenset[str], common: frozenset[str]) -> list[_Segment]:
    """Split a run of capitalised words at cue words and at words that are no name."""
    words = []
    pos = offset
    for word in run.split(" "):
        if word:
            words.append((pos, pos + len(word), word))
        pos += len(word) + 1
    out: list[_Segment] = []
    current = _Segment(NONE, True, False)
    for i, item in enumerate(words):
        word = item[2]
        if word in _PARTICLES:
            if current.words:
                current.words.append(item)
            continue
        if not current.words and word in _CUE_IN_RUN:
            current.cue = max(current.cue, _CUE_IN_RUN[word])
            current.at_run_start = False
            continue
        lower = word.lower()
        if lower in common or lower.removesuffix("'s") in common or word.isupper():
            nxt = words[i + 1][2] if i + 1 < len(words) else ""
            # "Will Thompson", "Mark Jensen": a given name that is also a word, with a known surname after it
            starts_pair = not current.words and word in given and nxt in surnames and nxt.lower() not in _NOT_NAME
            # "Tom Baker", "Hyun-woo Park": a surname that is also a word, after a name (a place word makes
            # the name count after a title or a naming phrase only: "Hyde Park" is no one's name)
            continues = bool(current.words) and word in surnames and (lower not in _NOT_NAME or lower in _THING_WORDS)
            if continues and lower in _THING_WORDS:
                current.by_place = True
            if not (starts_pair or continues):
                place = lower in _THING_WORDS
                if current.words:
                    current.by_place = current.by_place or place
                    out.append(current)
                current = _Segment(NONE, False, place)
                continue
        current.words.append(item)
    if current.words:
        out.append(current)
    return out


def _accept(strength: int, segment: _Segment, initial: bool, alone: bool, given: frozenset[str], surnames: frozenset[str]) -> bool:
    words = [w for _, _, w in segment.words if w not in _PARTICLES]
    first = words[0]
    if strength >= STRONG:
        return True
    if segment.by_place:
        return False
    if strength >= ROLE:
        # after a greeting one unknown word counts when nothing follows it ("Merci, Émilie", "Hi Thabo,"),
        # so that "Hello, Sync fails ..." keeps its product name
        return len(words) >= 2 or _known(first, given) or _known(first, surnames) or (strength >= GREET and alone)
    if len(words) >= 2:  # "Mark Jensen", "Rajesh Kumar", "Nguyen Van Minh"
        return _known(first, given) or _known(words[-1], surnames) or (_known(first, surnames) and any(_known(w, given) for w in words[1:]))
    return not initial and _known(first, given)


# A capitalised word in an instruction is a button or a menu, not a person ("choose Cards, then Link a card",
# "tap Mark as read"), and one after an article is a thing ("the Grace period"): the word before it is a UI
# verb or a determiner, or an article follows it.
_UI_VERBS = frozenset(
    """click tap select choose press open then hit enable disable toggle under via use using the a an
    this that our your their its""".split()
)
_ARTICLE_AFTER = re.compile(r" (?:a|an|the|your|my|as)\b")


def _reads_as_word(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 12) : start].split()
    return bool(before and before[-1].lower() in _UI_VERBS) or _ARTICLE_AFTER.match(text, end) is not None


def _cue_before(text: str, start: int, end: int) -> int:
    """The strength of the cue that ends right where the name at start:end begins: the last words before
    it, looked up in _CUES ("Dear Mr. ", "my name is ", "Regards,\\n"), or a dash that signs the message."""
    window = text[max(0, start - 60) : start]
    stripped = window.rstrip(" \t")
    if stripped.endswith(("-", "–", "—")) and (len(stripped) == 1 or stripped[-2].isspace()):
        return ROLE if _LINE_END.match(text, end) else NONE  # "... - Maria" signs a message; "status - Shipped" does not
    words = stripped.rstrip(",:;.()\"'\n\t -").lower().split()
    if not words:
        return NONE
    # "Thanks for your help, Dmitry": a thank-you, then lower-case words and a comma, then the name
    thanked = stripped.endswith(",") and ("thanks" in words[-6:] or "thank" in words[-6:])
    if words[-1] not in _CUE_LAST_WORDS:
        return GREET if thanked else NONE  # most runs: no cue phrase ends with the word before them
    best = GREET if thanked else NONE
    for n in range(1, min(_CUE_WORDS_MAX, len(words)) + 1):
        if n > 1 and (words[-n].endswith((",", ".", "!", "?"))):
            break  # the cue must be in the same sentence as the name (a title's own dot is stripped above)
        best = max(best, _CUES.get(" ".join(words[-n:]), NONE))
    return best


def may_hold_name(text: str) -> bool:
    """False means no name is found in `text`: no capitalised word after the first character, and no
    naming phrase for a name in lower case."""
    return _CAPITALISED.search(text, 1) is not None or "name" in text


@functools.cache
def never_alone() -> frozenset[str]:
    """Capitalised words that are no name when they stand alone in a run: cue words ("Hi", "Thanks") and the
    common words ("Please", "Settings") that names_in_run would turn down one by one."""
    common = _lists()[2]
    return frozenset(_CUE_IN_RUN) | frozenset(word.capitalize() for word in common)


def names_in_run(text: str, start: int, run: str) -> list[tuple[int, int]]:
    """(start, end) of the person names in the run of capitalised words `run` found at `start` in `text`."""
    given, surnames, common = _lists()  # loaded on the first run of the process
    if " " not in run and (run in _CUE_IN_RUN or run.lower() in common):
        return []  # one word that is no name: "Settings", "Account", "Hi"
    j = start - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    run_initial = j < 0 or text[j] in '.!?\n"“(:;-–•*>'
    found = []
    for segment in _segments(run, start, given, surnames, common):
        strength = segment.cue
        end = segment.words[-1][1]
        if segment.at_run_start and start:
            strength = _cue_before(text, start, end)
        if strength < ROLE and _AFTER_HERE.match(text, end):
            strength = ROLE
        alone = _NAME_ENDS.match(text, end) is not None
        if strength == NONE and len(segment.words) == 1 and _reads_as_word(text, segment.words[0][0], end):
            continue
        if _accept(strength, segment, segment.at_run_start and run_initial, alone, given, surnames):
            if segment.words[-1][2].endswith(("'s", "’s")):
                end -= 2
            found.append((segment.words[0][0], end))
    return found


def lower_case_names(text: str, found: list[tuple[int, int]]) -> None:
    """Add to `found` the names written in lower case after a naming phrase ("my name is john smith")."""
    given, surnames, common = _lists()
    for m in _NAMING_LOWER.finditer(text):
        start = m.start("name")
        words = m.group("name").split(" ")
        if not words[0].islower() or words[0].capitalize() not in given:
            continue
        end = start + len(words[0])
        for word in words[1:]:
            if word in _PARTICLES or (word.capitalize() in surnames and word not in common):
                end += 1 + len(word)
            else:
                break
        if not any(s < end and start < e for s, e in found):
            found.append((start, end))
    found.sort()
