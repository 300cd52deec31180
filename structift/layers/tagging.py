"""Tag-scheme constraints for sequence labelling: which tag may follow which.

Span-labelling schemes encode chunks in per-token tags ``<prefix><entity>`` (``B-PER``,
``I-PER``, ``O``) and allow only some neighbours: under BIO an ``I-PER`` continues a ``PER``
chunk, so it can follow ``B-PER`` or ``I-PER`` but not ``O`` or ``I-LOC``. A CRF that knows this
never decodes an ill-formed tag sequence. The rules, with ``START`` before the first token and
``END`` after the last (the same semantics as AllenNLP's ``allowed_transitions``):

| scheme | prefixes | first tag | last tag | inside the sequence |
|---|---|---|---|---|
| BIO | B, I, O | O, B | O, B, I | anything to O or B; I-x only after B-x or I-x |
| IOB1 | B, I, O | O, I | O, B, I | anything to O or I; B-x only after B-x or I-x |
| BIOUL | B, I, O, U, L | O, B, U | O, L, U | O, L, U to O, B, U; B-x, I-x to I-x or L-x |
| BMES | B, M, E, S | B, S | E, S | E, S to B, S; B-x, M-x to M-x or E-x |

A label is split into its first character (the prefix) and the rest (the entity, compared as
a string, separator included), so ``B-PER``/``I-PER`` share the entity ``-PER``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["SCHEMES", "allowed_transitions", "transition_masks"]

SCHEMES = ("BIO", "IOB1", "BIOUL", "BMES")

# Per scheme: the prefixes, the prefixes a sequence may start or end with, the prefixes that may
# follow any tag, and for the prefixes that continue a chunk, the prefixes (of the same entity)
# they may follow. "free" pairs restrict the source too for BIOUL and BMES.
_RULES: dict[str, dict[str, object]] = {
    "BIO": {
        "prefixes": "BIO",
        "first": "OB",
        "last": "OBI",
        "free": {"": "OB"},
        "same": {"I": "BI"},
    },
    "IOB1": {
        "prefixes": "BIO",
        "first": "OI",
        "last": "OBI",
        "free": {"": "OI"},
        "same": {"B": "BI"},
    },
    "BIOUL": {
        "prefixes": "BIOUL",
        "first": "OBU",
        "last": "OLU",
        "free": {"O": "OBU", "L": "OBU", "U": "OBU"},
        "same": {"I": "BI", "L": "BI"},
    },
    "BMES": {
        "prefixes": "BMES",
        "first": "BS",
        "last": "ES",
        "free": {"E": "BS", "S": "BS"},
        "same": {"M": "BM", "E": "BM"},
    },
}


def _split(scheme: str, index: int, label: object) -> tuple[str, str]:
    prefixes = str(_RULES[scheme]["prefixes"])
    if not isinstance(label, str) or not label or label[0] not in prefixes:
        raise ValueError(
            f"allowed_transitions: label {label!r} (index {index}) is not a {scheme} tag: "
            f"{scheme} labels start with one of {', '.join(prefixes)} (e.g. "
            f"'{prefixes[0]}-PER'). Check the scheme, or map other labels first."
        )
    return label[0], label[1:]


def _allowed(scheme: str, src: tuple[str, str], dst: tuple[str, str]) -> bool:
    rules = _RULES[scheme]
    free: dict[str, str] = rules["free"]  # type: ignore[assignment]
    same: dict[str, str] = rules["same"]  # type: ignore[assignment]
    (p, e), (q, f) = src, dst
    targets = free.get("", free.get(p, ""))
    if q in targets:
        return True
    return q in same and p in same[q] and e == f


def _labels(labels: Mapping[int, str] | Sequence[str]) -> list[str]:
    if isinstance(labels, Mapping):
        n = len(labels)
        if sorted(labels) != list(range(n)):
            raise ValueError(
                "allowed_transitions: a labels mapping must have the keys 0 .. n-1 (tag "
                f"indices); got keys {sorted(labels)[:10]}."
            )
        return [labels[i] for i in range(n)]
    if isinstance(labels, str):
        raise TypeError("allowed_transitions: labels must be a sequence of strings, not a str.")
    return list(labels)


def allowed_transitions(
    scheme: str, labels: Mapping[int, str] | Sequence[str]
) -> list[tuple[int, int]]:
    """List the allowed ``(from, to)`` tag transitions of a span-labelling scheme.

    The rules are the table of the module docstring. With ``Z = len(labels)``, index ``Z`` stands
    for START and ``Z + 1`` for END, so ``(Z, j)`` means "a sequence may begin with tag j" and
    ``(i, Z + 1)`` "may end with tag i" (AllenNLP's convention: the list can be passed to
    ``structift.layers.CRF(constraints=...)`` or to AllenNLP's ``ConditionalRandomField``).

    Args:
        scheme: ``"BIO"``, ``"IOB1"``, ``"BIOUL"`` or ``"BMES"`` (case-insensitive).
        labels: the tag strings by index: a sequence (``labels[i]`` is tag i) or a mapping
            ``{index: label}`` with keys ``0 .. Z-1``.

    Returns:
        The allowed pairs, sorted.

    Raises:
        ValueError: an unknown scheme, or a label whose prefix is not one of the scheme's.
    """
    name = scheme.upper() if isinstance(scheme, str) else scheme
    if name not in _RULES:
        raise ValueError(f"allowed_transitions: scheme must be one of {SCHEMES}; got {scheme!r}.")
    tags = [_split(name, i, label) for i, label in enumerate(_labels(labels))]
    Z = len(tags)
    first, last = str(_RULES[name]["first"]), str(_RULES[name]["last"])
    pairs = [(Z, j) for j, (q, _) in enumerate(tags) if q in first]
    pairs += [(i, Z + 1) for i, (p, _) in enumerate(tags) if p in last]
    pairs += [
        (i, j)
        for i, src in enumerate(tags)
        for j, dst in enumerate(tags)
        if _allowed(name, src, dst)
    ]
    return sorted(pairs)


def transition_masks(
    constraints: Iterable[tuple[int, int]], num_tags: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Turn allowed ``(from, to)`` pairs into bool masks ``(start [Z], end [Z], trans [Z, Z])``.

    Args:
        constraints: pairs as ``allowed_transitions`` returns them (START = Z, END = Z + 1).
        num_tags: Z.

    Raises:
        ValueError: a pair out of range, into START or out of END, or masks that allow no first
            tag or no last tag (every sequence would be impossible).
    """
    Z = num_tags
    start = torch.zeros(Z, dtype=torch.bool)
    end = torch.zeros(Z, dtype=torch.bool)
    transitions = torch.zeros(Z, Z, dtype=torch.bool)
    for pair in constraints:
        try:
            i, j = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise ValueError(
                f"constraints must be (from, to) pairs of ints; got {pair!r}."
            ) from None
        if not (0 <= i <= Z and (0 <= j < Z or j == Z + 1)) or (i, j) == (Z, Z + 1):
            raise ValueError(
                f"constraints: pair {(i, j)} is out of range for {Z} tags: from must be a tag "
                f"0..{Z - 1} or START = {Z}, to a tag 0..{Z - 1} or END = {Z + 1} (see "
                "structift.layers.allowed_transitions)."
            )
        if i == Z:
            start[j] = True
        elif j == Z + 1:
            end[i] = True
        else:
            transitions[i, j] = True
    for name, mask, hint in (("first", start, f"({Z}, j)"), ("last", end, f"(i, {Z + 1})")):
        if not bool(mask.any()):
            raise ValueError(
                f"constraints allow no {name} tag, so no tag sequence is possible: include "
                f"pairs {hint} (START = {Z}, END = {Z + 1}; allowed_transitions adds them)."
            )
    return start, end, transitions
