"""Sparsemax: the Euclidean projection onto the probability simplex.

    sparsemax(θ) = argmin_{p ∈ Δⁿ} ‖p − θ‖²,   Δⁿ = {p ∈ ℝⁿ : p ≥ 0, 1ᵀp = 1}

(Martins & Astudillo, arXiv:1602.02068): the regularized argmax max_{p ∈ Δ} ⟨θ, p⟩ − ½‖p‖²,
the Euclidean sibling of softmax (entropy regularizer). The forward is the closed form
p = max(θ − τ, 0) with the threshold τ found by sorting; the backward is the implicit function
theorem on the KKT system restricted to the support S = {i : p_i > 0}:

    p_S − θ_S + τ 1 = 0,   1ᵀ p_S = 1   ⇒   ∂p/∂θ = diag(s) − s sᵀ / |S|,

with s the 0/1 indicator of S (the Schur complement of the KKT matrix [[I, 1], [1ᵀ, 0]]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Sparsemax", "sparsemax"]


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype the threshold is computed in: float32 for half and bfloat16."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _sparsemax_forward(theta: Tensor) -> Tensor:
    """Return ``max(θ − τ, 0)`` along the last dim, with τ such that the result sums to one.

    Works on z = θ − max θ (sparsemax is shift invariant), so z_(1) = 0 exactly and the
    support condition 1 + k z_(k) > Σ_{j≤k} z_(j) holds exactly at k = 1: the support size is
    ≥ 1 by construction, whatever the magnitude of θ. (On θ itself, rounding of the cumsum at
    large |θ| makes even k = 1 fail.) Every support entry lies in (−1, 0], so τ is computed
    from O(1) numbers; entries with z = −inf (including θ − max θ overflowing) are never in
    the support. Half and bfloat16 inputs are computed in float32 and rounded once at the end.
    """
    work = _working_dtype(theta.dtype)
    z = theta.to(work)
    z = z - z.amax(-1, keepdim=True)  # shape: (..., n), max entry exactly 0
    sorted_z, _ = torch.sort(z, dim=-1, descending=True)
    n = z.shape[-1]
    k = torch.arange(1, n + 1, device=z.device)
    cumsum = sorted_z.cumsum(-1)
    # Support size: the largest k with 1 + k z_(k) > Σ_{j≤k} z_(j) (Martins & Astudillo,
    # arXiv:1602.02068, Prop. 1); k = 1 always qualifies (1 > 0), so support >= 1.
    in_support = 1 + k.to(work) * sorted_z > cumsum
    support = torch.where(in_support, k, 0).amax(-1, keepdim=True)  # shape: (..., 1)
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(work)
    return torch.clamp(z - tau, min=0).to(theta.dtype)


class _SparsemaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, theta: Tensor) -> Tensor:
        p = _sparsemax_forward(theta)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        # IFT on the support: vᵀ ∂p/∂θ = s ⊙ (v − ⟨s, v⟩ / |S|). Off the support the cotangent
        # is selected away (torch.where), never multiplied by 0, so a NaN/inf cotangent there
        # cannot leak in. Written with differentiable ops (the support indicator is piecewise
        # constant), so double backward works.
        s = p > 0
        v = grad.to(_working_dtype(grad.dtype))
        mean = torch.where(s, v, 0.0).sum(-1, keepdim=True) / s.sum(-1, keepdim=True).to(v.dtype)
        return torch.where(s, v - mean, 0.0).to(grad.dtype)


def sparsemax(theta: Tensor, dim: int = -1) -> Tensor:
    """Project ``theta`` onto the probability simplex along ``dim``.

    Solves ``argmin_{p ∈ Δ} ‖p − θ‖²`` exactly (sort-based threshold, O(n log n)); the
    result is sparse. Entries equal to ``-inf`` get probability 0; every slice needs at least
    one finite entry. Any finite magnitude works in every dtype (the threshold is computed
    on θ − max θ, in float32 for half and bfloat16 inputs); the result has the dtype of θ.

    Args:
        theta: scores ``[..., n, ...]``, floating point.
        dim: the dimension to normalize over.

    Returns:
        p with the shape of ``theta``, ``p >= 0`` and ``p.sum(dim) == 1``.

    Raises:
        TypeError: if ``theta`` is not floating point.
        ValueError: if ``theta`` contains NaN or ``+inf``, or a slice is entirely ``-inf``.
    """
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {type(theta).__name__}")
    if theta.ndim == 0:
        raise ValueError("theta must have at least one dimension, got a scalar")
    if torch.isnan(theta).any() or torch.isposinf(theta).any():
        raise ValueError("theta contains NaN or +inf; sparsemax needs finite scores or -inf")
    moved = theta.movedim(dim, -1)
    if moved.shape[-1] == 0 or torch.isneginf(moved).all(-1).any():
        raise ValueError(
            f"every slice of theta along dim={dim} needs a finite entry; got shape "
            f"{tuple(theta.shape)} with an all -inf (or empty) slice"
        )
    return _SparsemaxFunction.apply(moved).movedim(-1, dim)


class Sparsemax(nn.Module):
    """Module form of :func:`sparsemax` along ``dim``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, theta: Tensor) -> Tensor:
        """Return ``sparsemax(theta, self.dim)``."""
        return sparsemax(theta, self.dim)
