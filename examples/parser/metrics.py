"""Attachment scores and tree well-formedness of predicted head vectors.

A head vector lists, for words ``1 … n`` in order, the head of each word (0 = ROOT), as
`structift.datasets.DependencySentence.heads` does.

* UAS: the share of words whose predicted head is the gold head; "without punctuation"
  leaves out the words whose gold UPOS is ``PUNCT``.
* Root accuracy (Yamada & Matsumoto 2003): the share of sentences whose gold root word(s)
  are attached to ROOT in the prediction.
* Well-formed: exactly one word on ROOT and no cycle (every word reaches ROOT), i.e. a
  single-root dependency tree. Greedy head selection need not give one; MST decoding does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AttachmentScores", "has_cycle", "is_well_formed", "n_roots"]


def n_roots(heads: Sequence[int]) -> int:
    """Return the number of words attached to ROOT."""
    return sum(1 for h in heads if h == 0)


def has_cycle(heads: Sequence[int]) -> bool:
    """Whether following heads from some word never reaches ROOT. O(n).

    Args:
        heads: ``heads[i]`` is the head of word ``i + 1``, each in ``0 … n``.

    Raises:
        ValueError: A head outside ``0 … n``.
    """
    n = len(heads)
    for m, h in enumerate(heads, start=1):
        if not 0 <= h <= n:
            raise ValueError(f"heads[{m - 1}]={h} (head of word {m}) is outside 0..{n}")
    state = [0] * (n + 1)  # 0 unvisited, 1 on the current path, 2 reaches ROOT
    state[0] = 2
    for start in range(1, n + 1):
        path, node = [], start
        while state[node] == 0:
            state[node] = 1
            path.append(node)
            node = heads[node - 1]
        if state[node] == 1:  # came back onto the current path
            return True
        for p in path:
            state[p] = 2
    return False


def is_well_formed(heads: Sequence[int]) -> bool:
    """Whether ``heads`` is a single-root tree: one word on ROOT, no cycle."""
    return n_roots(heads) == 1 and not has_cycle(heads)


@dataclass
class AttachmentScores:
    """Running counts; `add` one sentence at a time, read the shares as properties."""

    words: int = 0
    correct: int = 0
    words_no_punct: int = 0
    correct_no_punct: int = 0
    sentences: int = 0
    root_correct: int = 0
    well_formed: int = 0

    def add(self, gold: Sequence[int], pred: Sequence[int], punct: Sequence[bool]) -> None:
        """Count one sentence.

        Args:
            gold: The gold heads of words ``1 … n``.
            pred: The predicted heads, same length.
            punct: Whether each word's gold UPOS is ``PUNCT``.

        Raises:
            ValueError: The three lengths differ.
        """
        if not len(gold) == len(pred) == len(punct):
            raise ValueError(
                f"gold, pred and punct must have one entry per word; got lengths {len(gold)}, "
                f"{len(pred)} and {len(punct)}"
            )
        for g, p, is_punct in zip(gold, pred, punct):
            self.words += 1
            self.correct += g == p
            if not is_punct:
                self.words_no_punct += 1
                self.correct_no_punct += g == p
        self.sentences += 1
        self.root_correct += all(p == 0 for g, p in zip(gold, pred) if g == 0)
        self.well_formed += is_well_formed(pred)

    @property
    def uas(self) -> float:
        return self.correct / max(self.words, 1)

    @property
    def uas_no_punct(self) -> float:
        return self.correct_no_punct / max(self.words_no_punct, 1)

    @property
    def root_accuracy(self) -> float:
        return self.root_correct / max(self.sentences, 1)

    @property
    def well_formed_share(self) -> float:
        return self.well_formed / max(self.sentences, 1)
