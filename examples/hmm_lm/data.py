"""Brown corpus as word-level language-model data: file split, vocabulary, batches.

The split is by file in corpus order (the 500 files ``ca01`` … ``cr09`` sorted by id, index
``i`` from 0):

* test: ``i % 10 == 9`` (every 10th file: ``ca10``, ``ca20``, …; 50 files);
* valid: ``i % 10 == 0 and i > 0`` (the file right after each test file; 49 files);
* train: every other file (401 files, including ``ca01`` at ``i = 0``).

Words are lower-cased; the vocabulary is the ``vocab_size`` (10,000) most frequent training
words (ties broken alphabetically) plus ``<unk>`` and the end token ``</s>`` appended to every
sentence, so a model predicts ``V = vocab_size + 2`` symbols and perplexity counts ``</s>``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from structift.datasets import brown_root
from structift.datasets.brown import brown_categories, split_tagged_token

UNK, EOS = "<unk>", "</s>"
SPLIT_RULE = (
    "by file in corpus order (ca01..cr09, index i from 0): test i % 10 == 9, "
    "valid i % 10 == 0 and i > 0, train the rest"
)

Sentence = list[str]


def split_of(index: int) -> str:
    """The split (``"train"``, ``"valid"`` or ``"test"``) of the file at ``index``."""
    if index % 10 == 9:
        return "test"
    if index % 10 == 0 and index > 0:
        return "valid"
    return "train"


def read_brown_files(
    path: str | os.PathLike[str] | None = None, max_files: int | None = None
) -> list[tuple[str, list[Sentence]]]:
    """``[(fileid, sentences)]`` in corpus order, words lower-cased, tags dropped.

    Args:
        path: the corpus folder (see `structift.datasets.brown_root`).
        max_files: read only the first this many files (``--smoke``).
    """
    root = brown_root(path)
    ids = sorted(brown_categories(root))[:max_files]
    files = []
    for fileid in ids:
        sents = []
        for line in (root / fileid).read_text(encoding="utf-8").splitlines():
            tokens = line.split()
            if tokens:
                sents.append([split_tagged_token(t)[0].lower() for t in tokens])
        files.append((fileid, sents))
    return files


def split_files(
    files: Sequence[tuple[str, list[Sentence]]],
) -> dict[str, list[Sentence]]:
    """Pool the sentences of each split by `split_of` the file index."""
    out: dict[str, list[Sentence]] = {"train": [], "valid": [], "test": []}
    for i, (_, sents) in enumerate(files):
        out[split_of(i)].extend(sents)
    return out


@dataclass
class Vocab:
    """Word <-> id; ids ``0 .. n-1`` are words by decreasing training frequency, then
    ``<unk>`` and ``</s>``."""

    words: list[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, train: Sequence[Sentence], size: int) -> Vocab:
        """The ``size`` most frequent training words (ties alphabetical), ``<unk>``, ``</s>``."""
        counts = Counter(w for s in train for w in s)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in ranked[:size]] + [UNK, EOS])

    def __len__(self) -> int:
        return len(self.words)

    @property
    def unk(self) -> int:
        return self.index[UNK]

    @property
    def eos(self) -> int:
        return self.index[EOS]

    def encode(self, sent: Sentence) -> list[int]:
        """Ids of the words and a final ``</s>``."""
        unk = self.unk
        return [self.index.get(w, unk) for w in sent] + [self.eos]


def batches(
    seqs: Sequence[Sequence[int]],
    max_tokens: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Length-bucketed batches ``(observations [B, T] (-100 padding), lengths [B])``.

    Sequences are sorted by length (stable) and cut into batches of at most ``max_tokens``
    padded tokens (at least one sequence each); with ``shuffle`` the batch order is drawn from
    ``generator``.
    """
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * len(seqs[i]) <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    if shuffle:
        perm = torch.randperm(len(groups), generator=generator).tolist()
        groups = [groups[p] for p in perm]
    out = []
    for g in groups:
        T = max(len(seqs[i]) for i in g)
        x = torch.full((len(g), T), -100, dtype=torch.long)
        for row, i in enumerate(g):
            x[row, : len(seqs[i])] = torch.tensor(seqs[i])
        out.append((x, torch.tensor([len(seqs[i]) for i in g])))
    return out


def frequency_clusters(vocab_size: int, num_clusters: int) -> Tensor:
    """Word -> cluster for blocked emissions: rank ``k`` (by training frequency) goes to
    cluster ``k % num_clusters``, ``[V]``.

    Round-robin over the frequency ranking gives every cluster a similar share of frequent and
    rare words, so each block of states carries a similar token mass (a cheap stand-in for the
    Brown clusters of Chiu & Rush 2020, which group words by distribution instead).
    """
    if not 1 <= num_clusters <= vocab_size:
        raise ValueError(
            f"num_clusters must be in [1, V] with V = {vocab_size}; got {num_clusters}."
        )
    return torch.arange(vocab_size) % num_clusters
