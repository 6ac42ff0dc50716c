"""Reading a real/fake label from an answer: training data's assistant turns and generated answers.

``parse_answer(prompt, text)`` returns ``"real"``, ``"fake"`` or ``None`` (no label, or a contradictory
one). The text is lower-cased, hyphens and underscores become spaces, and it is cut into clauses at
punctuation. In each clause:

- label words count: real, natural, nature, authentic, genuine -> real; fake, AI(-generated), generated,
  synthetic, artificial, computer/machine generated, deepfake, forged, manipulated -> fake;
- a negation up to three words before a label word flips it ("not real" -> fake, "isn't AI-generated" -> real);
- a choice between two labels ("real or fake") asserts nothing and is dropped.

When the text holds no label word, a leading yes/no is read against the question: "Is this a real image?"
yes -> real; "Is this an AI-generated image?" yes -> fake; a question naming both labels gives ``None``.
"""

from __future__ import annotations

import re

_TERMS = {
    ("ai", "generated"): "fake",
    ("computer", "generated"): "fake",
    ("machine", "generated"): "fake",
    ("fake",): "fake",
    ("ai",): "fake",
    ("aigc",): "fake",
    ("generated",): "fake",
    ("synthetic",): "fake",
    ("synthesized",): "fake",
    ("artificial",): "fake",
    ("deepfake",): "fake",
    ("forged",): "fake",
    ("manipulated",): "fake",
    ("real",): "real",
    ("natural",): "real",
    ("nature",): "real",
    ("authentic",): "real",
    ("genuine",): "real",
}
_LONGEST_FIRST = sorted(_TERMS, key=len, reverse=True)
_NEGATIONS = {"not", "no", "never", "neither", "nor", "non", "hardly", "cannot"}
_CHOICE = {"or", "vs", "versus"}  # "real or fake": both labels named, none asserted
_FILLER = {"a", "an", "the", "and"}
_YES = {"yes", "yeah", "yep", "yup", "true", "correct", "right", "affirmative"}
_NO = {"no", "nope", "false", "incorrect", "negative"}
_LEAD = {"answer", "the", "my", "final", "is"}  # skipped before a yes/no: "Answer: yes"
_OTHER = {"real": "fake", "fake": "real"}
_CLAUSES = re.compile(r"[.,;:!?\n()\[\]<>\"*]+")
_WORDS = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def parse_answer(prompt: str | None, text: str | None) -> str | None:
    """``"real"``, ``"fake"`` or ``None`` for an answer ``text`` to the question ``prompt``."""
    labels = claims(text or "")
    if len(labels) == 1:
        return labels.pop()
    if labels:
        return None
    yes = _yes_no(text or "")
    asked = claims(prompt or "")
    if yes is None or len(asked) != 1:
        return None
    label = asked.pop()
    return label if yes else _OTHER[label]


def claims(text: str) -> set[str]:
    """The labels ``text`` asserts, negations applied and "X or Y" choices dropped."""
    out: set[str] = set()
    for clause in _clauses(text):
        out |= _clause_claims(clause)
    return out


def _clauses(text: str) -> list[list[str]]:
    """Words per clause; a leading yes/no is left out (in "No it is real" the "no" negates nothing)."""
    text = re.sub(r"[-_/]", " ", text.lower()).replace("\u2019", "'")
    clauses = [words for part in _CLAUSES.split(text) if (words := _WORDS.findall(part))]
    if clauses and clauses[0][0] in _YES | _NO:
        clauses[0] = clauses[0][1:]
    return clauses


def _clause_claims(words: list[str]) -> set[str]:
    found = _find_terms(words)  # (start, end, label)
    dropped = set()
    for a, b in zip(found, found[1:]):
        between = set(words[a[1] : b[0]])
        if a[2] != b[2] and between & _CHOICE and between <= _CHOICE | _FILLER:
            dropped |= {a, b}
    out = set()
    for start, end, label in found:
        if (start, end, label) not in dropped:
            negated = any(w in _NEGATIONS or w.endswith("n't") for w in words[max(0, start - 3) : start])
            out.add(_OTHER[label] if negated else label)
    return out


def _find_terms(words: list[str]) -> list[tuple[int, int, str]]:
    found, i = [], 0
    while i < len(words):
        term = next((t for t in _LONGEST_FIRST if tuple(words[i : i + len(t)]) == t), None)
        if term is None:
            i += 1
            continue
        found.append((i, i + len(term), _TERMS[term]))
        i += len(term)
    return found


def _yes_no(text: str) -> bool | None:
    """A leading yes (True) or no (False), else ``None``."""
    words = _WORDS.findall(text.lower())
    first = next((w for w in words if w not in _LEAD), None)
    return True if first in _YES else False if first in _NO else None
