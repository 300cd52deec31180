"""The tagger: sparse features + a small word/character BiLSTM, with a CRF or softmax output.

Emission scores are the sum of two parts, both ``[B, T, Z]``:

* a linear model over sparse crfsuite-style features (an ``nn.EmbeddingBag`` whose rows are
  per-feature tag weights; summing the rows of a token's features is a sparse dot product);
* a neural part: lower-cased word embeddings and a character CNN, a BiLSTM, a linear layer.

With ``head="crf"`` the emissions go into `structift.layers.CRF` (learned start, end
and transition scores; span-scheme constraints when ``config.constraints`` lists the allowed
transitions), the loss is its negative log-likelihood (``loss="nll"``) or the SparseMAP
Fenchel–Young loss (``loss="sparsemap"``, `structift.variational.sparsemap_loss`: gradient
μ* − φ(y) with μ* a sparse mix of a few tag sequences, found by Viterbi calls only) and decoding
is Viterbi. With ``head="softmax"`` each token is classified independently (the ablation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import structift as st
from structift.layers import CRF
from structift.variational import sparsemap_loss
from tagger.features import Batch


@dataclass
class TaggerConfig:
    """Model sizes; defaults are the configuration the README reports."""

    n_words: int
    n_chars: int
    n_feats: int
    n_tags: int
    head: str = "crf"
    loss: str = "nll"  # CRF head: "nll" or "sparsemap"
    sparse: bool = True
    neural: bool = True
    word_dim: int = 64
    char_dim: int = 24
    char_filters: int = 48
    hidden: int = 96
    dropout: float = 0.3
    word_dropout: float = 0.05
    feature_dropout: float = 0.0
    constraints: list[tuple[int, int]] | None = None  # allowed (from, to), START = Z, END = Z+1
    observed_pairs: bool = False  # sparse weights only for (feature, tag) pairs seen in training

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class CharCNN(nn.Module):
    """Max-pooled width-3 convolution over a word's characters: ``[N, C] → [N, filters]``."""

    def __init__(self, n_chars: int, dim: int, filters: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_chars, dim, padding_idx=0)
        self.conv = nn.Conv1d(dim, filters, kernel_size=3, padding=1)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.embed(chars).transpose(1, 2)  # shape: (N, dim, C)
        h = self.conv(x)  # shape: (N, filters, C)
        # Padding characters must not win the max: push them to -inf first.
        h = h.masked_fill((chars == 0).unsqueeze(1), float("-inf"))
        h = h.amax(dim=2)
        return torch.where(torch.isfinite(h), h, torch.zeros_like(h))


class Tagger(nn.Module):
    """Sequence tagger; ``forward(batch)`` returns the mean per-token training loss."""

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        if config.head not in ("crf", "softmax"):
            raise ValueError(f"head={config.head!r}; expected 'crf' or 'softmax'")
        if not (config.sparse or config.neural):
            raise ValueError("at least one of sparse and neural features must be on")
        self.config = config
        # Stage 1 of --sparse-init lbfgs trains the sparse linear model alone (see
        # tagger.training.fit_sparse_lbfgs); the neural part is skipped while this is set.
        self.sparse_only = False
        Z = config.n_tags
        if config.sparse:
            # Rows are per-feature tag weights; zero init = the empty linear model.
            self.feat_weights = nn.EmbeddingBag(config.n_feats, Z, mode="sum", padding_idx=0)
            nn.init.zeros_(self.feat_weights.weight)
            # crfsuite's default: a weight exists only for pairs seen in training (set by
            # `observe_pairs`); the others stay 0. All ones = every pair (the dense default).
            self.register_buffer("pair_mask", torch.ones(config.n_feats, Z, dtype=torch.bool))
        if config.neural:
            self.word_embed = nn.Embedding(config.n_words, config.word_dim, padding_idx=0)
            self.char_cnn = CharCNN(config.n_chars, config.char_dim, config.char_filters)
            self.lstm = nn.LSTM(
                config.word_dim + config.char_filters,
                config.hidden,
                batch_first=True,
                bidirectional=True,
            )
            self.dropout = nn.Dropout(config.dropout)
            self.proj = nn.Linear(2 * config.hidden, Z)
        if config.head == "crf":
            constraints = (
                None if config.constraints is None else list(map(tuple, config.constraints))
            )
            self.crf = CRF(Z, batch_first=True, constraints=constraints)
            for p in self.crf.parameters():  # start from the empty model, as the features do
                nn.init.zeros_(p)

    def emissions(self, batch: Batch) -> torch.Tensor:
        """Return per-token tag scores ``[B, T, Z]``."""
        B, T = batch.words.shape
        scores = torch.zeros(B, T, self.config.n_tags, device=batch.words.device)
        if self.config.sparse:
            flat = batch.feats.reshape(B * T, -1)
            if self.training and self.config.feature_dropout > 0:
                # Dropping sparse features at random (index 0 = the zero padding row) keeps
                # the linear part from leaning on a few rare features that fit the training
                # set exactly, and makes it use suffix and shape features on every word.
                keep = torch.rand(flat.shape, device=flat.device) >= self.config.feature_dropout
                flat = flat * keep
            weight = self.feat_weights.weight
            if self.config.observed_pairs:
                weight = weight * self.pair_mask
            bag = F.embedding_bag(flat, weight, mode="sum", padding_idx=0)
            scores = scores + bag.view(B, T, -1)
        if self.config.neural and not self.sparse_only:
            words = batch.words
            if self.training and self.config.word_dropout > 0:
                # Replace words by <unk> at random so the <unk> embedding learns to stand in
                # for words never seen in training.
                drop = torch.rand(words.shape, device=words.device) < self.config.word_dropout
                words = torch.where(drop & (words > 0), torch.ones_like(words), words)
            chars = self.char_cnn(batch.chars.reshape(B * T, -1)).view(B, T, -1)
            x = self.dropout(torch.cat([self.word_embed(words), chars], dim=-1))
            packed = nn.utils.rnn.pack_padded_sequence(
                x, batch.lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, _ = self.lstm(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
            scores = scores + self.proj(self.dropout(h))
        return scores

    @torch.no_grad()
    def observe_pairs(self, items: list) -> None:
        """Allow only the (feature, tag) pairs that occur in ``items`` (``observed_pairs``)."""
        self.pair_mask.zero_()
        self.pair_mask[0] = True  # the padding row (its weights stay 0 anyway)
        for item in items:
            for feats, tag in zip(item.feats, item.tags):
                if tag >= 0:
                    self.pair_mask[feats, tag] = True

    def distribution(self, batch: Batch) -> st.LinearChainCRF:
        """Return the chain CRF over the batch (CRF head only)."""
        return self.crf.distribution(self.emissions(batch), lengths=batch.lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Return the training loss: NLL (CRF) or cross-entropy (softmax) per token."""
        n_tokens = batch.lengths.sum()
        if self.config.head == "crf" and self.config.loss == "sparsemap":
            tags = batch.tags.clamp(min=0)
            return sparsemap_loss(self.distribution(batch), tags, tol=1e-6).sum() / n_tokens
        if self.config.head == "crf":
            tags = batch.tags.clamp(min=0)
            llh = self.crf(self.emissions(batch), tags, lengths=batch.lengths, reduction="sum")
            return -llh / n_tokens
        scores = self.emissions(batch)
        return (
            F.cross_entropy(
                scores.reshape(-1, scores.shape[-1]),
                batch.tags.reshape(-1),
                ignore_index=-1,
                reduction="sum",
            )
            / n_tokens
        )

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        """Return predicted tags ``[B, T]`` (Viterbi for the CRF head), 0 beyond lengths."""
        if self.config.head == "crf":
            return self.distribution(batch).argmax
        return self.emissions(batch).argmax(dim=-1)
