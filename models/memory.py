"""Memory across conversations: the facts a user states about themselves, as short sentences an LLM reads.

Two extractors behind one shape, `(kind, fact)`:
- `extract_stated_facts` (the CPU profile's): patterns over the user's own utterances, first person only
  ("my name is", "I'm allergic to", "I live in" ...). A 135M model does not extract reliably; these
  patterns do not invent, and `tests/test_memory.py` measures them on paraphrases.
- `llm_extraction_messages` / `parse_llm_facts` (the gpu profile's): the conversation's LLM lists the
  facts as `kind: fact` lines.
"""

from __future__ import annotations

import re

SINGLE_VALUED = {"name", "lives_in", "birthday", "occupation"}  # a newer statement replaces the older
KINDS = ("name", "allergy", "condition", "medication", "lives_in", "occupation", "birthday", "preference")
_NOT_NAMES = {"sorry", "fine", "good", "okay", "ok", "here", "not", "just", "calling", "looking", "trying", "allergic",
              "going", "the", "a", "so", "really", "very", "from", "in", "at", "new", "back", "sure", "glad", "happy"}
_END = r"(?=[.,!?;]|\s+(?:and|but|so|because|which)\b|$)"
_PATTERNS: list[tuple[str, re.Pattern, str]] = [
    ("name", re.compile(r"\b(?i:my name is|my name's|call me|this is|i am|i'm)\s+([A-Z][a-z'-]+(?:\s+[A-Z][a-z'-]+)?)"),
     "The user's name is {}."),
    ("allergy", re.compile(rf"\b(?:i am|i'm|i’m)\s+(?:very\s+|also\s+|severely\s+)?allergic to\s+([\w\s-]+?){_END}", re.I),
     "The user is allergic to {}."),
    ("allergy", re.compile(rf"\bi have an? ([\w\s-]+?) allergy{_END}", re.I), "The user is allergic to {}."),
    ("condition", re.compile(rf"\bi (?:have|suffer from|was diagnosed with)\s+((?:type \d )?(?:diabetes|asthma|"
                             rf"high blood pressure|hypertension|epilepsy|a heart condition|arthritis|migraines?)){_END}",
                             re.I), "The user has {}."),
    ("medication", re.compile(rf"\bi (?:take|am taking|i'm taking|am on|'m on)\s+([\w\s-]+?)\s+(?:every day|daily|"
                              rf"for my [\w\s]+?){_END}", re.I), "The user takes {}."),
    ("lives_in", re.compile(rf"\b(?i:i live in)\s+([A-Z][\w\s-]*?){_END}"), "The user lives in {}."),
    ("occupation", re.compile(rf"\bi(?: am|'m) an? ((?:[a-z]+ )?(?:teacher|nurse|doctor|engineer|student|driver|lawyer|"
                              rf"designer|developer|chef|pilot|accountant|manager|farmer|writer|artist)){_END}", re.I),
     "The user works as a {}."),
    ("birthday", re.compile(rf"\bmy birthday is (?:on )?([\w\s]+?){_END}", re.I), "The user's birthday is {}."),
    ("preference", re.compile(rf"\bi (?:prefer|always prefer|would rather have)\s+([\w\s-]+?){_END}", re.I),
     "The user prefers {}."),
]


def extract_stated_facts(utterances: list[str]) -> list[tuple[str, str]]:
    """(kind, fact) for each thing the user said about themselves, in order, without repeats."""
    found: list[tuple[str, str]] = []
    for text in utterances:
        for kind, pattern, template in _PATTERNS:
            for m in pattern.finditer(text):
                value = m.group(1).strip(" -")
                if not value or (kind == "name" and value.split()[0].lower() in _NOT_NAMES):
                    continue
                if kind != "name" and kind != "lives_in":
                    value = value.lower()
                fact = (kind, template.format(value))
                if fact not in found:
                    found.append(fact)
    # A later statement of a single-valued kind ("Actually, call me Sam") wins.
    last = {k: f for k, f in found if k in SINGLE_VALUED}
    return [(k, f) for k, f in found if k not in SINGLE_VALUED or last[k] == f]


def remembered_name(facts: list[tuple[str, str]]) -> str | None:
    for kind, fact in facts:
        if kind == "name":
            return fact.removeprefix("The user's name is ").rstrip(".")
    return None


def llm_extraction_messages(utterances: list[str]) -> list[dict]:
    said = "\n".join(f"- {u}" for u in utterances)
    return [{"role": "system", "content": (
        "You extract facts a user stated about themselves. Reply with one line per fact, `kind: fact`, where kind "
        f"is one of {', '.join(KINDS)} and fact is a short sentence starting with 'The user'. Only what the user "
        "said about themselves, nothing guessed. Reply `none` if there is nothing.")},
        {"role": "user", "content": f"What the user said:\n{said}"}]


def parse_llm_facts(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*[-*]?\s*([a-z_]+)\s*:\s*(The user .+?)\s*$", line)
        if m and m.group(1) in KINDS and (m.group(1), m.group(2)) not in out:
            out.append((m.group(1), m.group(2) if m.group(2).endswith(".") else m.group(2) + "."))
    return out


_ABOUT_ME = re.compile(r"\b(what|which|who|do you (?:know|remember)|can you tell me|tell me)\b.*\b(i|me|my|mine)\b", re.I)


_PERSONS = (("The user's", "your", "my"), ("The user is", "you are", "I am"), ("The user has", "you have", "I have"),
            ("The user takes", "you take", "I take"), ("The user lives", "you live", "I live"),
            ("The user works", "you work", "I work"), ("The user prefers", "you prefer", "I prefer"),
            ("The user", "you", "I"))


def in_person(fact: str, person: int) -> str:
    """A remembered fact as the user would say it (person 1: "I am allergic to penicillin") or as the
    avatar says it back (person 2: "you are allergic to penicillin")."""
    text = fact.rstrip(".")
    for forms in _PERSONS:
        if text.startswith(forms[0]):
            return forms[3 - person] + text[len(forms[0]):]
    return text


class MemoryRecall:
    """Answers a user's question about themselves ("What am I allergic to?") from the facts remembered about
    them, for an embedded model too small to (SmolLM2-135M answered 0 of 6 with the facts in its system
    message; Qwen 0.5B 6 of 6). Only first-person questions, and only when one remembered fact is near:
    anything else goes to the model."""

    def __init__(self, embed, threshold: float = 0.45) -> None:
        self.embed = embed
        self.threshold = threshold

    def answer(self, words: str, facts: list[str]) -> str | None:
        about_user = [f for f in facts if f.startswith("The user")]
        if not about_user or not _ABOUT_ME.search(words):
            return None
        vecs = self.embed([words, *(in_person(f, 1) for f in about_user)])  # "I am ..." is what a question is near
        scores = vecs[1:] @ vecs[0]
        best = int(scores.argmax())
        if scores[best] < self.threshold:
            return None
        return f"You told me that {in_person(about_user[best], 2)}."
