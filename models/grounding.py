"""What a persona's facts do not cover: the words of a user's question that no fact mentions, and the
replies that answer them anyway.

A small grounded model answers "Yes, we do laser eye surgery" to a clinic whose facts never mention
it: it echoes the question instead of noticing the facts are silent. (A note after the question naming
those words did not make Qwen 0.5B decline, and cost it facts it had answered.) So a reply to such a question is checked
as it streams (models.llm.ReplyShaper): a first clause that says yes, or any clause that talks about
a word the facts do not mention, is not spoken; the persona's fallback (`DECLINE`) is, or the reply
ends before that clause; a first clause with a number is not spoken either when what the question
asks about (its last content word) is unmentioned. A right answer phrased with a word the facts lack ("Dr. Novak treats
children" where the facts say "children") is lost to the fallback: the safe failure for a
receptionist, where the other one is an invented yes (benchmarks/llm_eval.py counts both).

Words are compared by a crude stem (plural, -ing, -ed and a final e dropped) on both sides, so that
"parking" meets "park" and "rides" meets "ride". Function words and the words a question is framed
with at any front desk (what time, how much, the name, open, close, cost...) are never named: they
say what is asked, not what about."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Function words, conversational words, and the frame of a front-desk question. Generic English:
# nothing here names a persona's subject.
FRAME_WORDS = frozenset("""
a an the and or but if then so to of in on at by for with from up down out over under about into onto
than as is are was were be been being am do does did doing done have has had having can could will
would shall should may might must i me my mine we us our ours you your yours he him his she her it its
they them their this that these those there here what which who whom whose when where why how all any
some no not yes please thanks thank just also too very much many more most less get got go going come
tell know need want like okay ok hi hello hey bye goodbye again still ever really bit lot one ones
else other another same own each every both either only even anything something everything nothing
thing things way kind sort someone anyone somebody anybody people place question questions information
info list help make take give put use run keep let say ask call talk speak hear see look find work
happen sure right well good great nice fine time times today tonight tomorrow yesterday now soon
later early late long day days week weeks weekday weekdays weekend month hour hours minute
minutes morning afternoon evening night without within open opening opened close closing closed name number address
contact cost costs price prices charge charges fee fees pay paying paid much cheap expensive free
available availability located location near far around book booking offer offers need needs
bring buy visit somewhere anywhere everywhere sorry wait oh um uh hmm actually anyway excuse pardon
alright awesome perfect cool wonder wondering exactly usually normally currently probably possibly maybe
perhaps already always never often sometimes phone telephone
""".split())
# After these a word names the user's own things ("park my car", "bring my dog"): the user's situation,
# not what they ask the persona for.
_OWNERS = frozenset({"my", "our", "his", "her", "their"})

DECLINE = "I'm sorry, I don't have that information, but I can have someone call you back."
_DIGIT = re.compile(r"\d")
_AFFIRMS = re.compile(r"\s*(yes|yeah|yep|sure|of course|absolutely|certainly|definitely)\b", re.I)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*")
_WORDS_AND_BREAKS = re.compile(r"([A-Za-z][A-Za-z'\u2019-]*)|[,.;:!?]")


def stem(word: str) -> str:
    """A crude stem, the same on both sides of a comparison: lower case, no possessive, no plural,
    -ing or -ed, no final e."""
    w = word.lower().replace("\u2019", "'")
    if w.endswith("'s"):
        w = w[:-2]
    w = w.strip("'-")
    if len(w) > 4 and w.endswith("ies"):
        w = w[:-3] + "y"
    elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    for suffix in ("ing", "ed"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def is_question(text: str) -> bool:
    """Whether the user asked something (a transcript's question mark, or a question's first word)."""
    t = text.strip().lower()
    return "?" in t or bool(re.match(r"(do|does|did|is|are|was|were|can|could|will|would|should|have|has|"
                                     r"what|which|who|whom|whose|when|where|why|how)\b", t))


@dataclass(frozen=True)
class Unmentioned:
    """What of a question the facts do not mention: its `words` (as said, in order), and whether the
    thing it asks about (its last content word, the head of "a root canal") is one of them."""

    words: tuple[str, ...] = ()
    topic: bool = False

    def __bool__(self) -> bool:
        return bool(self.words)


@dataclass(frozen=True)
class FactCoverage:
    """The stems of every word in a persona's facts."""

    stems: frozenset[str]

    @classmethod
    def of(cls, facts: str) -> FactCoverage:
        return cls(frozenset(stem(w) for w in _WORD.findall(facts)))

    def _covers(self, s: str) -> bool:
        # "rent" is covered by "rentals", "treats" by "treatment": one stem a prefix of the other.
        return s in self.stems or (len(s) >= 4 and any(f.startswith(s) or (len(f) >= 4 and s.startswith(f))
                                                       for f in self.stems))

    def unmentioned(self, text: str) -> Unmentioned:
        """The words of `text` (as said, in order, once each) that are neither frame words nor in the
        facts, and whether its last content word is one of them; nothing for anything but a question:
        small talk and statements need no facts."""
        if not self.stems or not is_question(text):
            return Unmentioned()
        out: list[str] = []
        last_covered = True  # the last content word so far was in the facts
        owned = 0  # words left in a noun phrase after "my", "our"...
        for m in _WORDS_AND_BREAKS.finditer(text):
            w = m.group(1)
            if w is None:  # punctuation ends a noun phrase
                owned = 0
                continue
            low = w.lower().replace("\u2019", "'")
            if low in _OWNERS:
                owned = 2
                continue
            s = stem(w)
            if len(low) < 2 or low in FRAME_WORDS or s in _FRAME_STEMS:
                owned = 0
                continue
            if owned:
                owned -= 1
                continue
            last_covered = self._covers(s)
            if not last_covered and w not in out:
                out.append(w)
        return Unmentioned(tuple(out), topic=bool(out) and not last_covered)


_FRAME_STEMS = frozenset(stem(w) for w in FRAME_WORDS)


def unsupported(clause: str, unmentioned: Unmentioned, first: bool) -> bool:
    """Whether a reply's clause answers what the facts do not cover: it talks about one of the question's
    `unmentioned` words; or it is the reply's first clause and opens with yes, or gives a number for
    a thing the facts do not mention ("How much is a root canal?" "95 dollars.")."""
    if not unmentioned:
        return False
    if first and (_AFFIRMS.match(clause) or (unmentioned.topic and _DIGIT.search(clause))):
        return True
    topics = {stem(w) for w in unmentioned.words}
    return any(stem(w) in topics for w in _WORD.findall(clause))
