"""``allowed_transitions``: the tag-scheme rules by hand (AllenNLP's semantics) and the errors."""

from __future__ import annotations

import pytest

from structift.layers import allowed_transitions
from structift.layers.tagging import transition_masks

PREFIXES = {"BIO": "BIO", "IOB1": "BIO", "BIOUL": "BIOUL", "BMES": "BMES"}


def _named(scheme: str, labels: list[str]) -> set[tuple[str, str]]:
    names = [*labels, "START", "END"]
    return {(names[i], names[j]) for i, j in allowed_transitions(scheme, labels)}


def test_bio_by_hand() -> None:
    got = _named("BIO", ["O", "B-PER", "I-PER", "B-LOC"])
    inside = {("B-PER", "I-PER"), ("I-PER", "I-PER")}
    free = {(a, b) for a in ("O", "B-PER", "I-PER", "B-LOC") for b in ("O", "B-PER", "B-LOC")}
    edges = {("START", t) for t in ("O", "B-PER", "B-LOC")}
    edges |= {(t, "END") for t in ("O", "B-PER", "I-PER", "B-LOC")}
    assert got == inside | free | edges


def test_iob1_by_hand() -> None:
    got = _named("IOB1", ["O", "I-PER", "B-PER", "I-LOC"])
    assert ("START", "I-PER") in got and ("START", "B-PER") not in got
    assert ("I-PER", "B-PER") in got and ("B-PER", "B-PER") in got
    assert ("I-LOC", "B-PER") not in got and ("O", "B-PER") not in got
    assert ("O", "I-LOC") in got and ("I-LOC", "END") in got


def test_bioul_by_hand() -> None:
    got = _named("BIOUL", ["O", "B-X", "I-X", "L-X", "U-X", "B-Y"])
    assert {("START", "O"), ("START", "B-X"), ("START", "U-X")} <= got
    assert ("START", "I-X") not in got and ("B-X", "END") not in got
    assert {("B-X", "I-X"), ("B-X", "L-X"), ("I-X", "L-X"), ("L-X", "O"), ("U-X", "B-Y")} <= got
    assert ("B-X", "O") not in got and ("B-Y", "I-X") not in got and ("O", "I-X") not in got
    assert {("L-X", "END"), ("U-X", "END"), ("O", "END")} <= got


def test_bmes_by_hand() -> None:
    got = _named("BMES", ["B-X", "M-X", "E-X", "S-X", "S-Y"])
    assert {("START", "B-X"), ("START", "S-Y"), ("E-X", "END"), ("S-X", "END")} <= got
    assert {("B-X", "M-X"), ("M-X", "E-X"), ("B-X", "E-X"), ("E-X", "S-Y"), ("S-X", "B-X")} <= got
    assert ("B-X", "S-X") not in got and ("E-X", "M-X") not in got and ("B-X", "END") not in got


def test_indices_and_mapping_input() -> None:
    labels = ["O", "B-A", "I-A"]
    pairs = allowed_transitions("bio", dict(enumerate(labels)))  # case-insensitive, mapping
    assert pairs == allowed_transitions("BIO", labels) == sorted(pairs)
    assert (3, 0) in pairs and (2, 4) in pairs  # START = Z = 3, END = Z + 1 = 4
    assert all(j != 3 and i != 4 for i, j in pairs)  # nothing into START or out of END
    start, end, trans = transition_masks(pairs, 3)
    assert start.tolist() == [True, True, False] and end.tolist() == [True, True, True]
    assert not bool(trans[0, 2]) and bool(trans[1, 2])


def test_errors() -> None:
    with pytest.raises(ValueError, match="scheme must be one of"):
        allowed_transitions("IOBES", ["O"])
    with pytest.raises(ValueError, match=r"label 'PER' .* is not a BIO tag"):
        allowed_transitions("BIO", ["O", "PER"])
    with pytest.raises(ValueError, match=r"'O' .* is not a BMES tag"):
        allowed_transitions("BMES", ["O", "B-X"])
    with pytest.raises(ValueError, match=r"keys 0 \.\. n-1"):
        allowed_transitions("BIO", {1: "O", 2: "B-X"})
    with pytest.raises(TypeError, match="not a str"):
        allowed_transitions("BIO", "OBI")
