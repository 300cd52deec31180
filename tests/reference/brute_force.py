"""Brute-force references: enumerate every structure on tiny shapes, in float64.

Slow and obviously correct. Each builder returns an :class:`Enumeration` of one distribution
(one batch element): every structure, its unnormalized log-probability (score) and its
sufficient statistics, from which every exponential-family quantity follows by definition.
The scores are differentiable functions of the parameters, so gradients of these references
(e.g. of KL) are references too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Enumeration",
    "categorical",
    "chain",
    "dependency_trees",
    "heads",
    "hmm_joint",
    "hmm_posterior",
    "segmentations",
    "semi_markov",
    "sequences",
]


@dataclass(frozen=True)
class Enumeration:
    """The full support of one distribution.

    Attributes:
        structures: LongTensor ``[N, *event]``, every outcome (padding positions hold 0).
        scores: ``[N]`` unnormalized log-probabilities ⟨θ, φ(x)⟩ (``-inf`` allowed).
        features: tuple of ``[N, *theta_i]`` sufficient statistics φ(x), aligned with θ.
    """

    structures: Tensor
    scores: Tensor
    features: tuple[Tensor, ...]

    @property
    def log_partition(self) -> Tensor:
        return torch.logsumexp(self.scores, 0)

    @property
    def log_probs(self) -> Tensor:
        return self.scores - self.log_partition

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.scores, 0)

    @property
    def marginals(self) -> tuple[Tensor, ...]:
        """E_p[φ(x)] = Σ_x p(x) φ(x)."""
        p = self.probs
        return tuple(torch.einsum("n,n...->...", p, f) for f in self.features)

    @property
    def entropy(self) -> Tensor:
        """−Σ_x p(x) log p(x), with 0 log 0 = 0."""
        p, logp = self.probs, self.log_probs
        keep = p > 0
        return -(p[keep] * logp[keep]).sum()

    @property
    def max_score(self) -> Tensor:
        return self.scores.max()

    def kl(self, other: Enumeration) -> Tensor:
        """Σ_x p(x) (log p(x) − log q(x)); ``other`` must enumerate the same structures."""
        assert torch.equal(self.structures, other.structures)
        p = self.probs
        keep = p > 0
        return (p[keep] * (self.log_probs[keep] - other.log_probs[keep])).sum()


def sequences(num_states: int, length: int, total: int) -> Tensor:
    """All sequences in ``{0..Z-1}^length``, right-padded with 0 to ``total``: ``[Z^L, T]``."""
    rows = list(itertools.product(range(num_states), repeat=length))
    out = torch.zeros(len(rows), total, dtype=torch.long)
    out[:, :length] = torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
    return out


def categorical(logits: Tensor) -> Enumeration:
    """Enumerate a categorical distribution with ``logits`` ``[n]``."""
    n = logits.shape[-1]
    outcomes = torch.arange(n)
    return Enumeration(outcomes, logits.clone(), (torch.eye(n, dtype=logits.dtype),))


def _chain_features(seqs: Tensor, length: int, num_states: int, dtype: torch.dtype):
    N, T = seqs.shape
    unary = torch.zeros(N, T, num_states, dtype=dtype)
    binary = torch.zeros(N, max(T - 1, 0), num_states, num_states, dtype=dtype)
    for n in range(N):
        for t in range(length):
            unary[n, t, seqs[n, t]] = 1.0
        for t in range(length - 1):
            binary[n, t, seqs[n, t], seqs[n, t + 1]] = 1.0
    return unary, binary


def chain(unary: Tensor, binary: Tensor, length: int) -> Enumeration:
    """Enumerate a linear-chain CRF (one batch element).

    Args:
        unary: ``[T, Z]``.
        binary: ``[T-1, Z, Z]`` laid out ``[from, to]``.
        length: L in ``[1, T]``; positions ``t >= L`` are padding.
    """
    T, Z = unary.shape
    seqs = sequences(Z, length, T)
    steps = torch.arange(length)
    scores = unary[steps, seqs[:, :length]].sum(-1)
    if length > 1:
        pairs = torch.arange(length - 1)
        scores = scores + binary[pairs, seqs[:, : length - 1], seqs[:, 1:length]].sum(-1)
    return Enumeration(seqs, scores, _chain_features(seqs, length, Z, unary.dtype))


def hmm_posterior(
    init_logits: Tensor,
    transition_logits: Tensor,
    emission_logits: Tensor,
    observations: Tensor,
    length: int,
) -> Enumeration:
    """Enumerate p(z | x) of an HMM (one sequence) from the generative definition.

    Scores are log p(x, z) = log π(z_0) + Σ log A(z_t, z_{t+1}) + Σ log E(z_t, x_t) with the
    softmax-normalised tables, summed in log space (products underflow for large logit
    spreads), so the log-partition is log p(x).

    Args:
        init_logits: ``[Z]``; transition_logits ``[Z, Z]`` (from, to); emission_logits
            ``[Z, V]``; observations LongTensor ``[T]``; length L.
    """
    log_pi = torch.log_softmax(init_logits, -1)
    log_A = torch.log_softmax(transition_logits, -1)
    log_E = torch.log_softmax(emission_logits, -1)
    Z = log_pi.shape[0]
    T = observations.shape[0]
    seqs = sequences(Z, length, T)
    scores = []
    for z in seqs.tolist():
        s = log_pi[z[0]] + log_E[z[0], observations[0]]
        for t in range(1, length):
            s = s + log_A[z[t - 1], z[t]] + log_E[z[t], observations[t]]
        scores.append(s)
    return Enumeration(
        seqs, torch.stack(scores), _chain_features(seqs, length, Z, init_logits.dtype)
    )


def hmm_joint(
    init_logits: Tensor, transition_logits: Tensor, emission_logits: Tensor, T: int, length: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Enumerate the joint p(x, z) of an HMM over sequences of length L padded to T.

    Returns:
        ``(observations [N, T], states [N, T], probs [N])`` over all (x, z) pairs.
    """
    pi = torch.softmax(init_logits, -1)
    A = torch.softmax(transition_logits, -1)
    E = torch.softmax(emission_logits, -1)
    Z, V = E.shape
    xs, zs, ps = [], [], []
    for z in sequences(Z, length, T).tolist():
        for x in sequences(V, length, T).tolist():
            p = pi[z[0]] * E[z[0], x[0]]
            for t in range(1, length):
                p = p * A[z[t - 1], z[t]] * E[z[t], x[t]]
            xs.append(x)
            zs.append(z)
            ps.append(p)
    return torch.tensor(xs), torch.tensor(zs), torch.stack(ps)


# ---- dependency trees ------------------------------------------------------------------------


def _reaches_root(head: tuple[int, ...]) -> bool:
    """Whether every word 1..n reaches ROOT (0) by following heads (no cycle)."""
    for m in range(1, len(head) + 1):
        seen, node = set(), m
        while node != 0:
            if node in seen:
                return False
            seen.add(node)
            node = head[node - 1]
    return True


def _projective(head: tuple[int, ...]) -> bool:
    """Whether no two arcs cross (ROOT at position 0, words at 1..n)."""
    arcs = [(min(h, m), max(h, m)) for m, h in enumerate(head, start=1)]
    for a, b in arcs:
        for c, d in arcs:
            if a < c < b < d:
                return False
    return True


def heads(n: int, total: int, projective: bool, multi_root: bool) -> Tensor:
    """Every dependency tree over ``n`` words as head vectors ``[M, total + 1]``.

    ``out[i, m]`` is the head (0 = ROOT) of word m for m in 1..n; index 0 and padding hold -1.
    Trees: every word has one head, no cycles; ``multi_root=False`` keeps those with exactly
    one word on ROOT; ``projective`` keeps those without crossing arcs.
    """
    rows = []
    for head in itertools.product(range(n + 1), repeat=n):
        if any(h == m for m, h in enumerate(head, start=1)) or not _reaches_root(head):
            continue
        if not multi_root and sum(h == 0 for h in head) != 1:
            continue
        if projective and not _projective(head):
            continue
        rows.append([-1, *head, *([-1] * (total - n))])
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), total + 1)


def dependency_trees(
    arc_scores: Tensor, n: int, projective: bool = False, multi_root: bool = False
) -> Enumeration:
    """Enumerate a dependency-tree CRF (one batch element).

    Args:
        arc_scores: ``[N+1, N+1]``, ``arc_scores[h, m]`` scores head h -> modifier m (0 = ROOT).
        n: the number of words (``<= N``); words beyond n are padding.
        projective: only projective trees.
        multi_root: allow several words on ROOT.
    """
    total = arc_scores.shape[-1] - 1
    values = heads(n, total, projective, multi_root)
    words = torch.arange(1, n + 1)
    scores = arc_scores[values[:, 1 : n + 1], words].sum(-1)
    feats = torch.zeros(values.shape[0], total + 1, total + 1, dtype=arc_scores.dtype)
    for i, row in enumerate(values.tolist()):
        for m in range(1, n + 1):
            feats[i, row[m], m] = 1.0
    return Enumeration(values, scores, (feats,))


# ---- semi-Markov segmentations ---------------------------------------------------------------


def segmentations(length: int, total: int, max_len: int, num_labels: int) -> Tensor:
    """Every labelled segmentation of positions ``0..length-1`` as label vectors ``[M, total]``.

    torch-struct's encoding: ``out[i, 0]`` is the initial label; a segment of ``k`` steps
    (``1 <= k <= max_len``) from boundary s ends at s + k, where the vector holds its label;
    positions inside a segment and padding hold -1. The last position always ends a segment.
    """
    rows: list[list[int]] = []

    def grow(prefix: list[int], at: int) -> None:
        if at == length - 1:
            rows.append(prefix + [-1] * (total - length))
            return
        for k in range(1, min(max_len, length - 1 - at) + 1):
            for c in range(num_labels):
                grow(prefix + [-1] * (k - 1) + [c], at + k)

    for c0 in range(num_labels):
        grow([c0], 0)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), total)


def semi_markov(scores: Tensor, length: int) -> Enumeration:
    """Enumerate a semi-Markov CRF (one batch element).

    Args:
        scores: ``[N-1, K, C, C]``: ``scores[s, k, a, c]`` scores a segment of k steps from
            boundary s to s + k with label c after label a (laid out [from, to]; k = 0 unused).
        length: the number of positions L in ``[1, N]``.
    """
    N_1, K, C, _ = scores.shape
    values = segmentations(length, N_1 + 1, K - 1, C)
    feats = torch.zeros(values.shape[0], *scores.shape, dtype=scores.dtype)
    for i, row in enumerate(values.tolist()):
        start, label = 0, row[0]
        for t in range(1, length):
            if row[t] >= 0:
                feats[i, start, t - start, label, row[t]] = 1.0
                start, label = t, row[t]
    total = (feats * torch.where(feats > 0, scores, 0.0)).flatten(1).sum(-1)
    forbidden = ((feats > 0) & (scores == float("-inf"))).flatten(1).any(-1)
    scores_out = torch.where(forbidden, float("-inf"), total)
    return Enumeration(values, scores_out, (feats,))
