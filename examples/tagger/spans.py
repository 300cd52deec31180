"""Span tagging schemes: detect BIO / IOB1 / BIOUL / BMES tags and score spans as conlleval does.

Detection: every tag must be ``O`` or ``<prefix>-<type>`` (``-`` or ``_``) with prefixes of one
scheme, and every training sequence must be well formed under that scheme
(``structift.layers.allowed_transitions``); otherwise the tags are treated as plain labels.

Span scoring follows conlleval.pl's chunk rules (a chunk ends before a ``B``, an ``O`` or a type
change and after an ``E``/``S``; it starts at a ``B``/``S``, at an ``I``/``E`` after ``O`` or
``E``/``S``, or at a type change), with BIOUL's ``L``/``U`` read as ``E``/``S`` and BMES's ``M``
as ``I``. A predicted chunk is correct when its type, start and end all match a gold chunk;
precision, recall and F1 are over chunks, not tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from structift.layers import allowed_transitions

_TAG = re.compile(r"^([A-Z])[-_](.+)$")
_SCHEME_PREFIXES = [("BIO", "BIO"), ("IOB1", "BIO"), ("BIOUL", "BIOUL"), ("BMES", "BMES")]
_AS_IOBES = {"L": "E", "U": "S", "M": "I"}


def _split(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    m = _TAG.match(tag)
    return (m.group(1), m.group(2)) if m else ("?", tag)


def detect_scheme(tags: Sequence[str], sentences: Sequence[Sequence[str]]) -> str | None:
    """The scheme the tag set and every training sequence fit (BIO before IOB1), or ``None``."""
    parts = [_split(t) for t in tags]
    prefixes = {p for p, _ in parts}
    if "?" in prefixes or prefixes <= {"O"}:
        return None
    index = {t: i for i, t in enumerate(tags)}
    for scheme, letters in _SCHEME_PREFIXES:
        if not prefixes <= set(letters):
            continue
        allowed = set(allowed_transitions(scheme, tags))
        Z = len(tags)
        if all(_well_formed(allowed, Z, [index[t] for t in s]) for s in sentences if s):
            return scheme
    return None


def _well_formed(allowed: set[tuple[int, int]], Z: int, path: list[int]) -> bool:
    steps = [(Z, path[0]), *pairwise(path), (path[-1], Z + 1)]
    return all(s in allowed for s in steps)


def _ends(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != type_


def _starts(prev: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def chunks(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The chunks ``(type, first, last)`` of one tag sequence (conlleval's rules)."""
    out: set[tuple[str, int, int]] = set()
    prev, prev_type, begin = "O", "", 0
    for i, raw in enumerate([*tags, "O"]):  # a final O closes the last chunk
        tag, type_ = _split(raw)
        tag = _AS_IOBES.get(tag, tag)
        if prev != "O" and _ends(prev, tag, prev_type, type_):
            out.add((prev_type, begin, i - 1))
        if tag != "O" and _starts(prev, tag, prev_type, type_):
            begin = i
        prev, prev_type = tag, type_
    return out


@dataclass
class SpanScores:
    """Chunk counts and precision / recall / F1 over them."""

    correct: int = 0
    guessed: int = 0
    gold: int = 0

    def add(self, gold: Sequence[str], guess: Sequence[str]) -> None:
        g, p = chunks(gold), chunks(guess)
        self.correct += len(g & p)
        self.guessed += len(p)
        self.gold += len(g)

    @property
    def precision(self) -> float:
        return self.correct / self.guessed if self.guessed else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0
