"""BiLSTM encoder and biaffine arc scorer (Dozat & Manning 2017, arXiv:1611.01734).

Each position (ROOT, then the words) is the concatenation of a lower-cased word embedding, a
character CNN and the sum of its suffix embeddings; a BiLSTM reads the sequence; two MLPs
give each position a head view ``a_h`` and a modifier view ``d_m``; the biaffine scorer is

    arc_scores[b, h, m] = a_h · U d_m + a_h · u            (head h -> modifier m, 0 = ROOT)

Three training objectives share this scorer (``config.model``):

* ``crf``: the negative log-likelihood of the gold tree under the non-projective,
  single-root `structift.DependencyCRF` (matrix-tree theorem); decoded by its MST argmax;
* ``projective``: the same with ``projective=True`` (Eisner's inside algorithm and argmax);
* ``local``: head selection, a softmax over the heads of each word separately; decoded
  greedily (each word's best head: not always a tree) or by MST over the log-probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tagger.model import CharCNN
from torch import nn

from parser.features import Batch

MODELS = ("crf", "projective", "local")
#: The decoders each model is reported with; the first one selects the dev epoch.
DECODERS = {"crf": ("mst",), "projective": ("eisner",), "local": ("greedy", "mst")}


def dependency_crf() -> type:
    """Return `structift.DependencyCRF`, imported when first needed.

    Raises:
        RuntimeError: This structift has no ``DependencyCRF`` yet.
    """
    import structift

    cls = getattr(structift, "DependencyCRF", None)
    if cls is None:
        raise RuntimeError(
            "this model or decoder needs structift.DependencyCRF (the dependency-tree CRF of "
            "issue 12), which the installed structift does not have; use --model local "
            "(head selection, greedy decoding) until it exists"
        )
    return cls


def have_dependency_crf() -> bool:
    """Whether `structift.DependencyCRF` exists (MST and CRF paths available)."""
    import structift

    return hasattr(structift, "DependencyCRF")


@dataclass
class ParserConfig:
    """Model sizes; the defaults are the configuration the example reports."""

    n_words: int
    n_chars: int
    n_suffixes: int
    model: str = "crf"
    word_dim: int = 100
    char_dim: int = 32
    char_filters: int = 64
    suffix_dim: int = 32
    hidden: int = 128
    layers: int = 2
    arc_dim: int = 128
    dropout: float = 0.33
    word_dropout: float = 0.1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def word_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, N+1]`` bool, True at the words ``1 … n`` (not ROOT, not padding)."""
    pos = torch.arange(size, device=lengths.device)
    return (pos >= 1) & (pos <= lengths.unsqueeze(1))


class Parser(nn.Module):
    """Arc-factored parser; ``forward(batch)`` returns the training loss per word."""

    def __init__(self, config: ParserConfig) -> None:
        super().__init__()
        if config.model not in MODELS:
            raise ValueError(f"model={config.model!r}; expected one of {MODELS}")
        self.config = config
        c = config
        self.word_embed = nn.Embedding(c.n_words, c.word_dim, padding_idx=0)
        self.char_cnn = CharCNN(c.n_chars, c.char_dim, c.char_filters)
        self.suffix_embed = nn.EmbeddingBag(c.n_suffixes, c.suffix_dim, mode="sum", padding_idx=0)
        self.lstm = nn.LSTM(
            c.word_dim + c.char_filters + c.suffix_dim,
            c.hidden,
            num_layers=c.layers,
            batch_first=True,
            bidirectional=True,
            dropout=c.dropout if c.layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(c.dropout)
        self.head_mlp = nn.Sequential(nn.Linear(2 * c.hidden, c.arc_dim), nn.LeakyReLU(0.1))
        self.dep_mlp = nn.Sequential(nn.Linear(2 * c.hidden, c.arc_dim), nn.LeakyReLU(0.1))
        # Zero init: all trees start equally likely (Dozat & Manning initialise U to 0 too).
        self.U = nn.Parameter(torch.zeros(c.arc_dim, c.arc_dim))
        self.u = nn.Parameter(torch.zeros(c.arc_dim))

    def encode(self, batch: Batch) -> torch.Tensor:
        """Return BiLSTM states ``[B, N+1, 2 * hidden]`` (position 0 = ROOT)."""
        B, T = batch.words.shape
        words = batch.words
        if self.training and self.config.word_dropout > 0:
            # <unk> (index 1) stands in for words never seen in training; ROOT (2) is kept.
            drop = torch.rand(words.shape, device=words.device) < self.config.word_dropout
            words = torch.where(drop & (words > 2), torch.ones_like(words), words)
        chars = self.char_cnn(batch.chars.reshape(B * T, -1)).view(B, T, -1)
        sufs = self.suffix_embed(batch.suffixes.reshape(B * T, -1)).view(B, T, -1)
        x = self.dropout(torch.cat([self.word_embed(words), chars, sufs], dim=-1))
        packed = nn.utils.rnn.pack_padded_sequence(
            x, (batch.lengths + 1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        return self.dropout(h)

    def arc_scores(self, batch: Batch) -> torch.Tensor:
        """Return ``arc_scores [B, N+1, N+1]``: ``[b, h, m]`` scores head h -> modifier m."""
        h = self.encode(batch)
        a = self.dropout(self.head_mlp(h))  # shape: (B, N+1, arc_dim), head view
        d = self.dropout(self.dep_mlp(h))  # shape: (B, N+1, arc_dim), modifier view
        return torch.einsum("bhi,ij,bmj->bhm", a, self.U, d) + (a @ self.u).unsqueeze(-1)

    def head_log_probs(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-word head log-probabilities ``[B, N+1 (m), N+1 (h)]``; -inf where impossible.

        A head must be ROOT or another word of the sentence.
        """
        T = scores.shape[-1]
        heads_ok = word_mask(lengths, T) | (torch.arange(T, device=scores.device) == 0)
        ok = heads_ok.unsqueeze(1) & ~torch.eye(T, dtype=torch.bool, device=scores.device)
        logits = scores.transpose(1, 2).masked_fill(~ok, float("-inf"))
        return logits.log_softmax(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Return the training loss: the gold tree's negative log-likelihood per word."""
        scores = self.arc_scores(batch)
        n_words = batch.lengths.sum()
        if self.config.model == "local":
            logp = self.head_log_probs(scores, batch.lengths)
            nll = F.nll_loss(
                logp.reshape(-1, logp.shape[-1]),
                batch.heads.reshape(-1),
                ignore_index=-1,
                reduction="sum",
            )
            return nll / n_words
        dist = dependency_crf()(
            scores, lengths=batch.lengths, projective=self.config.model == "projective"
        )
        return -dist.log_prob(batch.heads).sum() / n_words

    @torch.no_grad()
    def decode(self, batch: Batch, decoder: str) -> torch.Tensor:
        """Return predicted heads ``[B, N+1]`` (-1 at ROOT and padding).

        Args:
            batch: The sentences.
            decoder: ``greedy`` (each word's best head), ``mst`` (best non-projective
                single-root tree) or ``eisner`` (best projective single-root tree).
        """
        scores = self.arc_scores(batch)
        mask = word_mask(batch.lengths, scores.shape[-1])
        if decoder == "greedy":
            heads = self.head_log_probs(scores, batch.lengths).argmax(-1)
            return torch.where(mask, heads, -1)
        if decoder not in ("mst", "eisner"):
            raise ValueError(f"decoder={decoder!r}; expected 'greedy', 'mst' or 'eisner'")
        if self.config.model == "local":
            # The tree maximising the product of the per-word head probabilities; impossible
            # entries (padding, the diagonal) are ignored by the CRF, so any finite value does.
            logp = self.head_log_probs(scores, batch.lengths).transpose(1, 2)
            scores = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
        dist = dependency_crf()(scores, lengths=batch.lengths, projective=decoder == "eisner")
        return torch.where(mask, dist.argmax, -1)
