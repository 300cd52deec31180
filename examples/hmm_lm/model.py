"""HMM language models: dense, low-rank and blocked parameterizations, scalar or neural.

Every model scores a batch by the HMM's evidence, ``log p(x) = st.HMM(...).log_partition``
(the log-partition of the posterior over hidden states), and trains on its mean per token.

* ``dense``: ``transition_logits [Z, Z]`` (``O(T Z^2)`` per sequence).
* ``lowrank``: ``st.LowRankTransition(u, v)`` with ``u, v [Z, r]`` (Chiu, Deng & Rush,
  arXiv:2201.02715; ``O(T Z r)``).
* ``blocked``: dense transitions with ``st.BlockedEmission`` over a word -> cluster partition
  (Chiu & Rush, arXiv:2011.04640 §3; ``O(T S^2)`` with ``S = Z / M`` states per cluster).
* ``blocked-lowrank``: both, ``st.LowRankTransition(u, v)`` with blocked emissions: a step
  costs ``O(S^2 r)`` and no ``Z x Z`` or ``Z x V`` array exists (the emission parameters are
  the ``[M, S, W]`` blocks of ``st.BlockedEmission.from_blocks``), so ``Z = 2^14`` trains in
  minutes per epoch on a CPU.

``neural=True`` is the neural parameterization of Chiu & Rush 2020 (§3): state embeddings
``E [Z, d]`` pass through residual MLPs and meet word embeddings or "next state" embeddings in
a dot product, so the parameter count grows as ``(Z + V) d`` instead of ``Z V + Z^2``.

Emission logits are offset by the log unigram distribution of the training words (a fixed
buffer), so at initialization every state emits the unigram distribution and training starts
from the unigram perplexity rather than from ``V``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import structift as st
from structift.families.blocked import state_dropout


@dataclass
class ModelConfig:
    """What to build; ``rank`` is for the low-rank kinds, ``clusters`` for the blocked ones."""

    kind: str
    states: int
    vocab_size: int
    rank: int = 0
    clusters: int = 0
    neural: bool = False
    dim: int = 256
    dropout: float = 0.0  # state dropout: the fraction of states dropped per batch


KINDS = ("dense", "lowrank", "blocked", "blocked-lowrank")


class ResidualMLP(nn.Module):
    """``x + W2 relu(W1 x)`` then LayerNorm (the residual layers of Chiu & Rush 2020)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin1, self.lin2, self.norm = (
            nn.Linear(dim, dim),
            nn.Linear(dim, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.lin2(torch.relu(self.lin1(x))))


class HMMLM(nn.Module):
    """An HMM language model over ``V`` symbols with ``Z`` hidden states.

    Args:
        config: the parameterization (see `ModelConfig`).
        log_unigram: ``[V]`` log unigram probabilities of the training tokens (the emission
            offset).
        clusters: LongTensor ``[V]`` word -> cluster (the blocked kinds only).
    """

    def __init__(
        self, config: ModelConfig, log_unigram: Tensor, clusters: Tensor | None = None
    ) -> None:
        super().__init__()
        c, Z, V = config, config.states, config.vocab_size
        if c.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {c.kind!r}.")
        self.low_rank, self.blocked = c.kind in ("lowrank", "blocked-lowrank"), "blocked" in c.kind
        if self.low_rank and not 1 <= c.rank <= Z:
            raise ValueError(f"{c.kind} needs 1 <= rank <= states = {Z}; got rank {c.rank}.")
        if self.blocked and (clusters is None or c.clusters < 1 or Z % c.clusters):
            raise ValueError(
                f"{c.kind} needs clusters [V] and a cluster count dividing Z = {Z}; got "
                f"{c.clusters} clusters."
            )
        self.config = c
        self.register_buffer("log_unigram", log_unigram.float().reshape(V))
        self.register_buffer("clusters", clusters if clusters is not None else torch.zeros(0))
        # Words of each cluster in id order, padded with word 0 to the largest cluster [M, W].
        words = torch.zeros(0, 0, dtype=torch.long)
        if self.blocked:
            assert clusters is not None
            members = [(clusters == k).nonzero().squeeze(-1) for k in range(c.clusters)]
            words = nn.utils.rnn.pad_sequence(members, batch_first=True)
        self.register_buffer("cluster_words", words)
        self.init_logits = nn.Parameter(torch.zeros(Z))
        out = c.rank if self.low_rank else Z
        if c.neural:
            d = c.dim
            self.state_emb = nn.Parameter(torch.randn(Z, d) * d**-0.5)
            self.word_emb = nn.Parameter(torch.randn(V, d) * d**-0.5)
            self.emit_mlp, self.from_mlp = ResidualMLP(d), ResidualMLP(d)
            if self.low_rank:
                self.to_mlp = ResidualMLP(d)
                self.u_out, self.v_out = nn.Linear(d, out), nn.Linear(d, out)
            else:
                self.next_emb = nn.Parameter(torch.randn(Z, d) * d**-0.5)
        else:
            shape = (c.clusters, Z // c.clusters, words.shape[1]) if self.blocked else (Z, V)
            self.emission = nn.Parameter(torch.randn(shape) * 0.5)
            if self.low_rank:
                self.u = nn.Parameter(torch.randn(Z, c.rank))
                self.v = nn.Parameter(torch.randn(Z, c.rank))
            else:
                self.transition = nn.Parameter(torch.randn(Z, Z))

    def parameter_count(self) -> int:
        """Trainable scalars."""
        return sum(p.numel() for p in self.parameters())

    def hmm_parameters(self) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor], Tensor]:
        """``(init [Z], transition [Z, Z] or (u, v) [Z, r], emission logits)``.

        The emission logits are ``[Z, V]``, or the ``[M, S, W]`` blocks for the blocked kinds
        (``blocks[c, s, i]``: state ``c S + s``, the ``i``-th word of cluster ``c``).
        """
        c = self.config
        M = c.clusters
        offset = self.log_unigram[self.cluster_words][:, None, :] if self.blocked else None
        if c.neural:
            h = self.from_mlp(self.state_emb)  # shape: (Z, d)
            states = self.emit_mlp(self.state_emb)  # shape: (Z, d)
            if self.blocked:  # shape: (M, S, W), one [S, d] @ [d, W] product per cluster
                words = self.word_emb[self.cluster_words]  # shape: (M, W, d)
                emission = torch.bmm(states.reshape(M, -1, states.shape[1]), words.mT)
            else:
                emission = states @ self.word_emb.T  # shape: (Z, V)
            if self.low_rank:
                g = self.to_mlp(self.state_emb)
                transition: Tensor | tuple[Tensor, Tensor] = (self.u_out(h), self.v_out(g))
            else:
                transition = h @ self.next_emb.T  # shape: (Z, Z)
        else:
            emission = self.emission
            transition = (self.u, self.v) if self.low_rank else self.transition
        return (
            self.init_logits,
            transition,
            emission + (offset if offset is not None else self.log_unigram),
        )

    def forward(
        self, x: Tensor, lengths: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """``log p(x)`` ``[B]`` of observations ``x [B, T]`` with ``lengths [B]``.

        In training mode with ``config.dropout > 0``, a random ``1 - dropout`` share of the
        states (per cluster for ``blocked``) is kept for the whole batch (state dropout,
        Chiu & Rush 2020 §4); evaluation uses every state.
        """
        c = self.config
        init, transition, emission = self.hmm_parameters()
        drop = self.training and c.dropout > 0
        if self.blocked:
            blocked = st.BlockedEmission.from_blocks(emission, self.clusters)
            if self.low_rank:
                transition = st.LowRankTransition(*transition)
            if drop:
                keep = max(1, round((1 - c.dropout) * blocked.block_size))
                init, transition, blocked, _ = state_dropout(
                    init, transition, blocked, keep, generator
                )
            return st.HMM(init, transition, blocked, x, lengths, validate_args=False).log_partition
        if drop:
            keep = max(1, round((1 - c.dropout) * c.states))
            kept = torch.randperm(c.states, generator=generator)[:keep].sort().values
            init, emission = init[kept], emission[kept]
            if self.low_rank:
                transition = (transition[0][kept], transition[1][kept])
            else:
                transition = transition[kept][:, kept]  # type: ignore[index]
        if self.low_rank:
            transition = st.LowRankTransition(*transition)
        return st.HMM(init, transition, emission, x, lengths, validate_args=False).log_partition
