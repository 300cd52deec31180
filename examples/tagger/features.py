"""Turn tagged sentences into index tensors: words, characters and sparse crfsuite-style features.

Sparse features follow the usual python-crfsuite recipe for POS tagging: the lower-cased word,
its 1–4-letter suffixes and 1–3-letter prefixes, its shape, case and digit flags, and the
lower-cased words and suffixes in a ±2 window (with begin/end-of-sentence markers). A feature
gets an index when it occurs at least ``min_count`` times in the training data; unseen
features are dropped at test time (index 0, the padding row of the ``EmbeddingBag``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

PAD, UNK = "<pad>", "<unk>"
MAX_WORD_CHARS = 16


def word_shape(word: str) -> str:
    """Map characters to X/x/d and squeeze runs: ``Atlanta's`` → ``Xx'x``, ``1,119`` → ``d,d``."""
    shape = re.sub(r"[A-Z]", "X", word)
    shape = re.sub(r"[a-z]", "x", shape)
    shape = re.sub(r"[0-9]", "d", shape)
    return re.sub(r"(.)\1+", r"\1", shape)


def token_features(words: Sequence[str], i: int) -> list[str]:
    """Return the sparse feature strings of token ``i`` of a sentence."""
    w = words[i]
    lw = w.lower()
    feats = [
        "bias",
        "w=" + lw,
        "shape=" + word_shape(w),
        f"title={int(w[:1].isupper())}",
        f"upper={int(w.isupper())}",
        f"digit={int(any(c.isdigit() for c in w))}",
        f"hyphen={int('-' in w)}",
    ]
    feats += [f"suf{k}={lw[-k:]}" for k in range(1, 5) if len(lw) >= k]
    feats += [f"pre{k}={lw[:k]}" for k in range(1, 4) if len(lw) >= k]
    for off in (-2, -1, 1, 2):
        j = i + off
        if 0 <= j < len(words):
            nw = words[j].lower()
            feats += [f"w[{off}]={nw}", f"suf3[{off}]={nw[-3:]}"]
            if off in (-1, 1):
                feats += [f"title[{off}]=%d" % words[j][:1].isupper(), f"w|w[{off}]={lw}|{nw}"]
        else:
            feats.append(f"w[{off}]=" + ("<s>" if j < 0 else "</s>"))
    return feats


@dataclass
class Vocab:
    """String ↔ index maps for words, characters, sparse features and tags."""

    words: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)
    feats: dict[str, int] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, sents: Iterable[Sequence[tuple[str, str]]], min_feature_count: int = 2) -> Vocab:
        """Index every training word (lower-cased), character, frequent feature and tag."""
        sents = list(sents)
        word_counts = Counter(w.lower() for s in sents for w, _ in s)
        char_counts = Counter(c for s in sents for w, _ in s for c in w)
        feat_counts: Counter[str] = Counter()
        for s in sents:
            words = [w for w, _ in s]
            for i in range(len(words)):
                feat_counts.update(token_features(words, i))
        tags = sorted({t for s in sents for _, t in s})
        return cls(
            words={w: i for i, w in enumerate([PAD, UNK, *sorted(word_counts)])},
            chars={c: i for i, c in enumerate([PAD, UNK, *sorted(char_counts)])},
            feats={
                f: i
                for i, f in enumerate(
                    [PAD, *sorted(f for f, c in feat_counts.items() if c >= min_feature_count)]
                )
            },
            tags=tags,
        )

    def state_dict(self) -> dict[str, object]:
        return {"words": self.words, "chars": self.chars, "feats": self.feats, "tags": self.tags}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> Vocab:
        return cls(**state)  # type: ignore[arg-type]


@dataclass
class Encoded:
    """One sentence as index lists (tags are -1 when unknown, e.g. tagging new text)."""

    words: list[int]
    chars: list[list[int]]
    feats: list[list[int]]
    tags: list[int]
    known: list[bool]


def encode(vocab: Vocab, sent: Sequence[tuple[str, str | None]]) -> Encoded:
    """Encode one sentence; words outside the training vocabulary are marked unknown."""
    words = [w for w, _ in sent]
    tag_index = {t: i for i, t in enumerate(vocab.tags)}
    unk_w, unk_c = vocab.words[UNK], vocab.chars[UNK]
    word_ids = [vocab.words.get(w.lower(), unk_w) for w in words]
    return Encoded(
        words=word_ids,
        chars=[[vocab.chars.get(c, unk_c) for c in w[:MAX_WORD_CHARS]] for w in words],
        feats=[
            [vocab.feats[f] for f in token_features(words, i) if f in vocab.feats]
            for i in range(len(words))
        ],
        tags=[tag_index.get(t, -1) if t is not None else -1 for _, t in sent],
        known=[i != unk_w for i in word_ids],
    )


@dataclass
class Batch:
    """Padded tensors for a minibatch of B sentences of length at most T."""

    words: torch.Tensor  # shape: (B, T)
    chars: torch.Tensor  # shape: (B, T, C)
    feats: torch.Tensor  # shape: (B, T, F), 0 = no feature
    tags: torch.Tensor  # shape: (B, T), -1 = padding or unknown tag
    known: torch.Tensor  # shape: (B, T) bool
    lengths: torch.Tensor  # shape: (B,)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))


def collate(items: Sequence[Encoded]) -> Batch:
    """Pad a list of encoded sentences into a `Batch`."""
    B = len(items)
    T = max(len(e.words) for e in items)
    C = max(len(c) for e in items for c in e.chars)
    F = max(len(f) for e in items for f in e.feats)
    words = torch.zeros(B, T, dtype=torch.long)
    chars = torch.zeros(B, T, max(C, 1), dtype=torch.long)
    feats = torch.zeros(B, T, max(F, 1), dtype=torch.long)
    tags = torch.full((B, T), -1, dtype=torch.long)
    known = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(items):
        n = len(e.words)
        words[b, :n] = torch.tensor(e.words)
        tags[b, :n] = torch.tensor(e.tags)
        known[b, :n] = torch.tensor(e.known)
        for t in range(n):
            chars[b, t, : len(e.chars[t])] = torch.tensor(e.chars[t])
            feats[b, t, : len(e.feats[t])] = torch.tensor(e.feats[t])
    lengths = torch.tensor([len(e.words) for e in items], dtype=torch.long)
    return Batch(words, chars, feats, tags, known, lengths)


def length_sorted_batches(
    items: Sequence[Encoded], batch_size: int, generator: torch.Generator | None = None
) -> list[list[int]]:
    """Group indices into batches of similar length (less padding), in shuffled batch order.

    Sentences are sorted by length with random tie-breaking, cut into consecutive batches, and
    the batch order is shuffled; without a generator the order is deterministic.
    """
    n = len(items)
    if generator is not None:
        noise = torch.rand(n, generator=generator).tolist()
    else:
        noise = [0.0] * n
    order = sorted(range(n), key=lambda i: (len(items[i].words), noise[i]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if generator is not None:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[p] for p in perm]
    return batches
