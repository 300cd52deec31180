"""Turn dependency sentences into index tensors: words, characters, suffixes, gold heads.

Position 0 of every encoded sentence is the ROOT token (its own word, character and suffix
index), so the encoder sees ``n + 1`` positions and the arc scorer's index 0 is ROOT, as
`structift.DependencyCRF` expects. Words are lower-cased; a word (or suffix) gets an index
when seen ``min_count`` times in training, else it is ``<unk>``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

PAD, UNK, ROOT = "<pad>", "<unk>", "<root>"
MAX_WORD_CHARS = 16
SUFFIX_LENGTHS = (1, 2, 3)


def suffixes(word: str) -> list[str]:
    """The suffix features of a word: ``"2:ar"`` is its last two lower-cased letters."""
    lw = word.lower()
    return [f"{k}:{lw[-k:]}" for k in SUFFIX_LENGTHS if len(lw) >= k]


def _index(counts: Counter[str], min_count: int) -> dict[str, int]:
    kept = sorted(w for w, c in counts.items() if c >= min_count)
    return {w: i for i, w in enumerate([PAD, UNK, ROOT, *kept])}


@dataclass
class Vocab:
    """String → index maps for words, characters and suffixes (0 pad, 1 unknown, 2 ROOT)."""

    words: dict[str, int] = field(default_factory=dict)
    chars: dict[str, int] = field(default_factory=dict)
    suffixes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, sents: Iterable[Sequence[str]], min_count: int = 2) -> Vocab:
        """Index the training words and suffixes seen ``min_count`` times, every character."""
        sents = list(sents)
        return cls(
            words=_index(Counter(w.lower() for s in sents for w in s), min_count),
            chars=_index(Counter(c for s in sents for w in s for c in w), 1),
            suffixes=_index(Counter(x for s in sents for w in s for x in suffixes(w)), min_count),
        )

    def state_dict(self) -> dict[str, object]:
        return {"words": self.words, "chars": self.chars, "suffixes": self.suffixes}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> Vocab:
        return cls(**state)  # type: ignore[arg-type]


@dataclass
class Encoded:
    """One sentence of n words as n + 1 positions (0 = ROOT)."""

    words: list[int]
    chars: list[list[int]]
    suffixes: list[list[int]]
    heads: list[int]  # -1 at ROOT (and everywhere when there are no gold heads)
    punct: list[bool]


def encode(
    vocab: Vocab,
    words: Sequence[str],
    heads: Sequence[int] | None = None,
    upos: Sequence[str] | None = None,
) -> Encoded:
    """Encode words (and their gold heads and UPOS, when known) behind a ROOT token."""
    unk_w, unk_c, unk_s = (vocab.words[UNK], vocab.chars[UNK], vocab.suffixes[UNK])
    root = vocab.words[ROOT]
    return Encoded(
        words=[root, *(vocab.words.get(w.lower(), unk_w) for w in words)],
        chars=[[vocab.chars[ROOT]]]
        + [[vocab.chars.get(c, unk_c) for c in w[:MAX_WORD_CHARS]] for w in words],
        suffixes=[[vocab.suffixes[ROOT]]]
        + [[vocab.suffixes.get(x, unk_s) for x in suffixes(w)] for w in words],
        heads=[-1, *(heads if heads is not None else [-1] * len(words))],
        punct=[
            False,
            *((u == "PUNCT" for u in upos) if upos is not None else [False] * len(words)),
        ],
    )


@dataclass
class Batch:
    """Padded tensors for B sentences of at most N words (N + 1 positions with ROOT)."""

    words: torch.Tensor  # shape: (B, N+1)
    chars: torch.Tensor  # shape: (B, N+1, C), 0 = padding
    suffixes: torch.Tensor  # shape: (B, N+1, S), 0 = padding
    heads: torch.Tensor  # shape: (B, N+1), -1 at ROOT and padding
    punct: torch.Tensor  # shape: (B, N+1) bool
    lengths: torch.Tensor  # shape: (B,), words per sentence (ROOT not counted)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, k).to(device) for k in self.__dataclass_fields__))


def collate(items: Sequence[Encoded]) -> Batch:
    """Pad a list of encoded sentences into a `Batch`."""
    B = len(items)
    T = max(len(e.words) for e in items)
    C = max(len(c) for e in items for c in e.chars)
    S = max(len(s) for e in items for s in e.suffixes)
    words = torch.zeros(B, T, dtype=torch.long)
    chars = torch.zeros(B, T, max(C, 1), dtype=torch.long)
    sufs = torch.zeros(B, T, max(S, 1), dtype=torch.long)
    heads = torch.full((B, T), -1, dtype=torch.long)
    punct = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(items):
        n = len(e.words)
        words[b, :n] = torch.tensor(e.words)
        heads[b, :n] = torch.tensor(e.heads)
        punct[b, :n] = torch.tensor(e.punct)
        for t in range(n):
            chars[b, t, : len(e.chars[t])] = torch.tensor(e.chars[t])
            sufs[b, t, : len(e.suffixes[t])] = torch.tensor(e.suffixes[t])
    lengths = torch.tensor([len(e.words) - 1 for e in items], dtype=torch.long)
    return Batch(words, chars, sufs, heads, punct, lengths)
