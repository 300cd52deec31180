"""CoNLL-U files (Universal Dependencies): sentences with word forms, UPOS tags and trees.

A CoNLL-U sentence is a block of lines ended by a blank line: ``#`` comment lines, then one
line per token with ten tab-separated columns ``ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL
DEPS MISC``. `read_conllu` keeps FORM, UPOS, HEAD and DEPREL of the syntactic words (IDs
``1 … n``), plus what is needed to rebuild the surface text:

* multiword-token lines (IDs ``a-b``, a surface word split into the syntactic words ``a … b``)
  are not words of the tree; their ranges and surface forms are kept in
  `DependencySentence.multiword`;
* ``SpaceAfter=No`` in MISC is kept per word in `DependencySentence.space_after` (treebanks
  that split surface words without range lines, such as the Turkish Web Treebank's
  inflectional groups, mark the joins this way);
* empty nodes (IDs ``a.b``, enhanced dependencies only) are skipped.

``heads`` follow the file: ``heads[i]`` is the HEAD of word ``i + 1``, 0 is ROOT.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DependencySentence", "is_projective", "read_conllu"]

_N_COLUMNS = 10
_WORD_ID = re.compile(r"[1-9][0-9]*")
_RANGE_ID = re.compile(r"([1-9][0-9]*)-([1-9][0-9]*)")
_EMPTY_ID = re.compile(r"[0-9]+\.[1-9][0-9]*")


@dataclass
class DependencySentence:
    """One CoNLL-U sentence of ``n`` syntactic words.

    Attributes:
        words: FORM of words ``1 … n``.
        upos: UPOS tag of each word.
        heads: HEAD of each word (``0`` = ROOT, else a word ID in ``1 … n``).
        deprels: DEPREL of each word.
        space_after: False where MISC holds ``SpaceAfter=No`` (the next word is joined on).
        multiword: ``(first, last, form)`` of each multiword-token line ``first-last``: words
            ``first … last`` (1-based, inclusive) are the surface word ``form``.
        sent_id: The ``# sent_id = …`` comment, if any.
        text: The ``# text = …`` comment, if any.
    """

    words: list[str] = field(default_factory=list)
    upos: list[str] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    deprels: list[str] = field(default_factory=list)
    space_after: list[bool] = field(default_factory=list)
    multiword: list[tuple[int, int, str]] = field(default_factory=list)
    sent_id: str | None = None
    text: str | None = None

    def __len__(self) -> int:
        return len(self.words)


def read_conllu(path: str | os.PathLike[str]) -> list[DependencySentence]:
    """Read every sentence of a CoNLL-U file, in file order.

    Args:
        path: The file (UTF-8).

    Returns:
        The sentences; see `DependencySentence`.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: A malformed line, as ``file:line: what is wrong``: not ten tab-separated
            columns, an ID that is not ``k``, ``a-b`` or ``a.b``, words not numbered
            ``1, 2, …``, a HEAD that is not a word of the sentence or ROOT, a multiword range
            that is not ``a <= b`` starting at the next word.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path={str(p)!r} is not a file")
    with p.open(encoding="utf-8") as f:
        return parse_conllu(f, source=str(p))


def parse_conllu(lines: Iterable[str], *, source: str = "<conllu>") -> list[DependencySentence]:
    """Parse CoNLL-U text given as lines; `read_conllu` without the file.

    Args:
        lines: The lines (with or without their newlines).
        source: The name error messages give for the text.

    Returns:
        The sentences.

    Raises:
        ValueError: See `read_conllu`.
    """
    sents: list[DependencySentence] = []
    current = DependencySentence()
    where: dict[str, list[int]] = {"words": [], "ranges": []}  # line numbers, for errors
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if current.words or current.multiword:
                _finish(current, where, source)
                sents.append(current)
            current, where = DependencySentence(), {"words": [], "ranges": []}
            continue
        if line.startswith("#"):
            _comment(current, line)
            continue
        _token_line(current, line, f"{source}:{lineno}")
        for key, added in (("words", current.words), ("ranges", current.multiword)):
            if len(where[key]) < len(added):
                where[key].append(lineno)
    if current.words or current.multiword:
        _finish(current, where, source)
        sents.append(current)
    return sents


def _comment(sent: DependencySentence, line: str) -> None:
    key, sep, value = line[1:].partition("=")
    if not sep:
        return
    key = key.strip()
    if key == "sent_id":
        sent.sent_id = value.strip()
    elif key == "text":
        sent.text = value.strip()


def _token_line(sent: DependencySentence, line: str, where: str) -> None:
    """Add one token line's word (or multiword range) to ``sent``; ``where`` is ``file:line``."""
    cols = line.split("\t")
    if len(cols) != _N_COLUMNS:
        raise ValueError(
            f"{where}: expected {_N_COLUMNS} tab-separated columns (ID FORM LEMMA UPOS XPOS "
            f"FEATS HEAD DEPREL DEPS MISC), got {len(cols)} in {line!r}; CoNLL-U separates "
            "columns by single tabs"
        )
    token_id, form, _, upos, _, _, head, deprel, _, misc = cols
    expected = len(sent.words) + 1
    if _EMPTY_ID.fullmatch(token_id):
        return
    match = _RANGE_ID.fullmatch(token_id)
    if match:
        first, last = int(match.group(1)), int(match.group(2))
        if first != expected or last < first:
            raise ValueError(
                f"{where}: multiword token ID {token_id!r} must be a-b with a = {expected} "
                "(the next word) and b >= a"
            )
        sent.multiword.append((first, last, form))
        return
    if not _WORD_ID.fullmatch(token_id):
        raise ValueError(
            f"{where}: ID {token_id!r} is not a word ID (1, 2, …), a multiword range (1-2) or "
            "an empty node (1.1)"
        )
    if int(token_id) != expected:
        raise ValueError(f"{where}: word ID {token_id} out of order; expected {expected}")
    if not _WORD_ID.fullmatch(head) and head != "0":
        raise ValueError(
            f"{where}: HEAD {head!r} of word {token_id} is not an integer; expected 0 (ROOT) "
            "or the ID of a word of the sentence"
        )
    sent.words.append(form)
    sent.upos.append(upos)
    sent.heads.append(int(head))
    sent.deprels.append(deprel)
    sent.space_after.append("SpaceAfter=No" not in misc.split("|"))


def _finish(sent: DependencySentence, lines: dict[str, list[int]], source: str) -> None:
    """Check what needs the whole sentence: HEADs in range, multiword ranges inside it.

    ``lines["words"]`` and ``lines["ranges"]`` are the line numbers of the words and of the
    multiword ranges.
    """
    n = len(sent.words)
    for i, head in enumerate(sent.heads):
        if head > n or head == i + 1:
            what = "itself" if head == i + 1 else f"word {head}, but the sentence has {n} words"
            raise ValueError(
                f"{source}:{lines['words'][i]}: HEAD of word {i + 1} points to {what}; expected 0 "
                f"(ROOT) or another word in 1..{n}"
            )
    for (first, last, form), lineno in zip(sent.multiword, lines["ranges"]):
        if last > n:
            raise ValueError(
                f"{source}:{lineno}: multiword token {first}-{last} ({form!r}) reaches beyond "
                f"the sentence's last word {n}; expected a range of words in 1..{n}"
            )


def is_projective(heads: Sequence[int]) -> bool:
    """Whether a dependency tree has no crossing arcs when drawn above the sentence.

    ROOT is position 0, so an arc crossing the root word's arc counts as crossing; for a
    single-root tree this is the usual definition (every word between a head and its
    modifier descends from the head). O(n²).

    Args:
        heads: ``heads[i]`` is the head of word ``i + 1`` (0 = ROOT); a tree.

    Returns:
        True when no two arcs ``(h, m)``, ``(h', m')`` cross.
    """
    import torch

    from structift.structures.tree import is_projective as crossing_free

    row = torch.tensor([-1, *heads], dtype=torch.long)[None]  # the tree space's head vector
    return bool(crossing_free(row, torch.tensor([len(heads)]))[0])
