"""Attention weight functions, one object per kind, sharing one attend step.

Each maps query–key scores ``[*batch, T]`` to weights of the same shape, exactly zero on padded
keys, and holds only the options that apply to it:

* ``SoftmaxWeights()``: ``argmax_{w ∈ Δ} ⟨w, s⟩ + H(w)``, the softmax;
* ``SparsemaxWeights()``: ``argmin_{w ∈ Δ} ‖w − s‖²`` (Martins & Astudillo, arXiv:1602.02068);
* ``SelectionWeights(binary, gradient, normalize)``: ``w_t = p(z_t = 1)`` under the
  binary-selection chain CRF with unary potentials (0, s_t) and pairwise potentials
  ``binary`` (Kim et al., arXiv:1702.00887), i.e. ``w = ∇_s A(s, binary)``.

``structift.layers.attend`` (and the layers) take any of them; ``weights_for(kind, ...)`` is the
one table from the names ``"softmax"``, ``"sparsemax"``, ``"structured"``, ``"sparsemap"`` to
these objects.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

from structift.layers._attention_checks import check_binary, check_choice, check_scores

__all__ = [
    "GRADIENTS",
    "KINDS",
    "AbstractWeights",
    "SelectionWeights",
    "SoftmaxWeights",
    "SparseMAPWeights",
    "SparsemaxWeights",
    "weights_for",
]

KINDS = ("softmax", "sparsemax", "structured", "sparsemap")
"""Names accepted by ``kind=`` (see ``weights_for``)."""

GRADIENTS = ("autograd", "ift")
"""Names accepted by ``SelectionWeights(gradient=...)``."""


class AbstractWeights(abc.ABC):
    """Scores to attention weights (see the module docstring)."""

    kind: str

    @abc.abstractmethod
    def weigh(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        """Weights ``[*batch, T]`` of checked scores, ``lengths [*batch]``, ``valid [*batch,T]``."""

    def __call__(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        check_scores(scores, valid, self.kind)
        return self.weigh(scores, lengths, valid)

    def for_one_query(self) -> AbstractWeights:
        """The same weights for ``[B, 1, T]`` scores of one query per sequence."""
        return self


@dataclass(frozen=True)
class SoftmaxWeights(AbstractWeights):
    """Softmax over the valid keys."""

    kind = "softmax"

    def weigh(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)


@dataclass(frozen=True)
class SparsemaxWeights(AbstractWeights):
    """Sparsemax over the valid keys (sparse weights summing to one)."""

    kind = "sparsemax"

    def weigh(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        from structift.layers.sparsemax import sparsemax

        return sparsemax(scores.masked_fill(~valid, float("-inf")), dim=-1)


@dataclass(frozen=True, eq=False)
class SelectionWeights(AbstractWeights):
    """CRF selection marginals ``p(z_t = 1)`` of a binary chain over the keys.

    Args:
        binary: Pairwise potentials θ(z_t, z_{t+1}) laid out [from, to], broadcastable to
            ``[*batch, T-1, 2, 2]`` (e.g. ``[2, 2]`` shared, ``[B, 1, 2, 2]`` per sequence);
            default zeros (independent Bernoulli selections, ``w = sigmoid(s)``).
        gradient: ``"autograd"`` (double backward through the log-partition, an analytic
            Hessian-vector product) or ``"ift"`` (implicit function theorem on the variational
            problem, ``structift.variational.regularized_argmax``).
        normalize: divide the marginals by their sum, so the weights sum to one.
    """

    binary: Tensor | None = None
    gradient: str = "autograd"
    normalize: bool = False
    kind = "structured"

    def __post_init__(self) -> None:
        check_choice("gradient", self.gradient, GRADIENTS)

    def for_one_query(self) -> SelectionWeights:
        b = self.binary
        if b is not None and b.dim() >= 4:  # per-sequence [B, T-1, 2, 2] -> [B, 1, T-1, 2, 2]
            return SelectionWeights(b.unsqueeze(1), self.gradient, self.normalize)
        return self

    def weigh(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        binary = scores.new_zeros(2, 2) if self.binary is None else self.binary
        crf = _selection_crf(scores, check_binary(binary, scores), lengths, valid)
        if self.gradient == "autograd":
            mu = crf.marginals.unary
        else:
            from structift.variational import regularized_argmax

            mu = regularized_argmax(crf).unary
        weights = mu[..., 1].reshape(scores.shape).masked_fill(~valid, 0.0)
        if self.normalize:
            total = weights.sum(-1, keepdim=True)
            weights = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
        return weights


@dataclass(frozen=True, eq=False)
class SparseMAPWeights(AbstractWeights):
    """SparseMAP selection marginals ``μ*_t(1)`` of the binary chain over the keys.

    μ* = argmax_{μ ∈ M} ⟨θ, μ⟩ − (τ/2)‖μ_U‖² over the marginal polytope of the selection chain
    (unary potentials (0, s_t), pairwise ``binary``): `structift.variational.sparsemap`, an
    active-set solve differentiated by the implicit function theorem on its restricted KKT
    system. The weights are a convex combination of a few binary selections.

    Args:
        binary: Pairwise potentials as for `SelectionWeights` (default zeros).
        temperature: τ > 0 (smaller: closer to the single best selection).
        normalize: divide the weights by their sum, so they sum to one.
    """

    binary: Tensor | None = None
    temperature: float = 1.0
    normalize: bool = False
    kind = "sparsemap"

    def for_one_query(self) -> SparseMAPWeights:
        b = self.binary
        if b is not None and b.dim() >= 4:
            return SparseMAPWeights(b.unsqueeze(1), self.temperature, self.normalize)
        return self

    def weigh(self, scores: Tensor, lengths: Tensor, valid: Tensor) -> Tensor:
        from structift.variational import sparsemap

        binary = scores.new_zeros(2, 2) if self.binary is None else self.binary
        crf = _selection_crf(scores, check_binary(binary, scores), lengths, valid)
        mu = sparsemap(crf, self.temperature).marginals.unary
        weights = mu[..., 1].reshape(scores.shape).masked_fill(~valid, 0.0)
        if self.normalize:
            total = weights.sum(-1, keepdim=True)
            weights = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
        return weights


def _selection_crf(scores: Tensor, binary: Tensor, lengths: Tensor, valid: Tensor):
    """Build the binary-selection LinearChainCRF over flattened batch dims."""
    import structift as st

    T = scores.shape[-1]
    flat = scores.masked_fill(~valid, 0.0).reshape(-1, T)
    # shape: (N, T, 2) — potential 0 for "not selected", the score for "selected"
    unary = torch.stack([torch.zeros_like(flat), flat], dim=-1)
    N = flat.shape[0]
    # Everything the family would check is checked already, except feasibility: with finite
    # pairwise potentials the all-zero selection always has a finite score, so only -inf
    # pairwise potentials need the family's check (it raises for sequences with A = -inf).
    feasible = bool(torch.isfinite(binary).all())
    return st.LinearChainCRF(
        unary, binary.reshape(N, T - 1, 2, 2), lengths.reshape(N), validate_args=not feasible
    )


def weights_for(
    kind: str,
    binary: Tensor | None = None,
    gradient: str = "autograd",
    normalize: bool = False,
) -> AbstractWeights:
    """The weights object of ``kind`` (one of ``KINDS``).

    ``binary`` and ``normalize`` belong to the chain kinds (``"structured"``, ``"sparsemap"``),
    ``gradient`` to ``"structured"`` (SparseMAP is always differentiated by the IFT); giving
    them for another kind is an error (they would be ignored).
    """
    check_choice("kind", kind, KINDS)
    check_choice("gradient", gradient, GRADIENTS)
    if kind == "structured":
        return SelectionWeights(binary, gradient, normalize)
    if kind == "sparsemap" and gradient == "autograd":
        return SparseMAPWeights(binary, normalize=normalize)
    if binary is not None or normalize or gradient != "autograd":
        raise ValueError(
            f"binary and normalize apply to kind='structured' or 'sparsemap' only and gradient "
            f"to kind='structured' only; got them with kind={kind!r}."
        )
    return SoftmaxWeights() if kind == "softmax" else SparsemaxWeights()
