"""Sparsemax: the Euclidean projection onto the probability simplex.

    sparsemax(θ) = argmin_{p ∈ Δⁿ} ‖p − θ‖²,   Δⁿ = {p ∈ ℝⁿ : p ≥ 0, 1ᵀp = 1}

(Martins & Astudillo, arXiv:1602.02068): the regularized argmax max_{p ∈ Δ} ⟨θ, p⟩ − ½‖p‖²,
the Euclidean sibling of softmax (entropy regularizer). The forward is the closed form
p = max(θ − τ, 0) with the threshold τ found by sorting; the backward is the implicit function
theorem (``structift.implicit.custom_root``, the one IFT mechanism) on the KKT system
restricted to the support S = {i : p_i > 0}, solved in closed form:

    p_S − θ_S + τ 1 = 0,   1ᵀ p_S = 1   ⇒   ∂p/∂θ = diag(s) − s sᵀ / |S|,

with s the 0/1 indicator of S (the Schur complement of the KKT matrix [[I, 1], [1ᵀ, 0]]).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from structift.implicit import (
    AbstractResidual,
    AbstractTreeSolver,
    LinearSolution,
    Status,
    custom_root,
)

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


class SparsemaxPoint(NamedTuple):
    """The KKT point of the projection: ``p`` ``[..., n]``, the threshold ``tau`` ``[..., 1]``."""

    p: Tensor
    tau: Tensor


def _forward(theta: Tensor) -> SparsemaxPoint:
    """The solution ``(p, τ)`` with ``p = max(θ − τ, 0)`` (no graph)."""
    p = _sparsemax_forward(theta)
    on = p > 0
    # τ = θ_i − p_i on the support (the same number for every i there), averaged in the
    # working dtype relative to max θ so that neither the sum nor half precision overflows.
    work = _working_dtype(theta.dtype)
    top = theta.to(work).amax(-1, keepdim=True)
    gap = torch.where(on, theta.to(work) - top - p.to(work), 0.0).sum(-1, keepdim=True)
    tau = top + gap / on.sum(-1, keepdim=True).to(work)
    return SparsemaxPoint(p, tau.to(theta.dtype))


class _Projection(AbstractResidual):
    """The KKT conditions of ``argmin_{p ∈ Δ} ½‖p − θ‖²`` on the support S = {p > 0}.

    ``F_p = p − θ + τ`` on S (``F_p = p`` off it), ``F_τ = Σ_S p − 1``: zero at the solution,
    with the symmetric Jacobian ``K = [[I, 1_S], [1_Sᵀ, 0]]`` (the identity off S), and θ
    entering linearly, so ``−(∂F/∂θ)ᵀ u`` is ``u_p`` on S, 0 elsewhere.
    """

    def __init__(self, support: Tensor) -> None:
        self.support = support

    def __call__(self, z: SparsemaxPoint, *theta: Tensor) -> SparsemaxPoint:
        S = self.support
        F_p = torch.where(S, z.p - torch.where(S, theta[0], 0.0) + z.tau, z.p)
        return SparsemaxPoint(F_p, torch.where(S, z.p, 0.0).sum(-1, keepdim=True) - 1)

    def theta_cotangent(self, u: SparsemaxPoint, z: Any, *theta: Tensor) -> tuple[Tensor]:
        # Off the support the cotangent is selected away (torch.where), never multiplied by 0,
        # so a NaN/inf cotangent there cannot leak in.
        return (torch.where(self.support, u.p, 0.0).to(theta[0].dtype),)


class _ProjectionSolve(AbstractTreeSolver):
    """``K x = r`` in closed form: ``y = (Σ_S r_p − r_τ) / |S|``, ``x_p = r_p − y`` on S.

    (The Schur complement of K: ∂p/∂θ = diag(s) − s sᵀ / |S| with s the indicator of S.)
    """

    def __init__(self, support: Tensor) -> None:
        self.support = support

    def init(self, operator: Any) -> Any:
        """Nothing to prepare: the solve is closed-form."""
        return operator

    def transpose(self, state: Any) -> Any:
        """K is symmetric."""
        return state

    def _solve(self, r_p: Tensor, r_tau: Tensor) -> SparsemaxPoint:
        S = self.support
        size = S.sum(-1, keepdim=True).to(r_p.dtype)
        y = (torch.where(S, r_p, 0.0).sum(-1, keepdim=True) - r_tau) / size
        return SparsemaxPoint(torch.where(S, r_p - y, r_p), y)

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        """Solve for ``rhs`` ``[B, n + 1]``, reporting the true residual ``‖rhs − K x‖``."""
        n = self.support.shape[-1]
        shape = self.support.shape
        x = self._solve(rhs[:, :n].reshape(shape), rhs[:, n:].reshape(*shape[:-1], 1))
        flat = torch.cat([x.p.reshape(-1, n), x.tau.reshape(-1, 1)], -1)
        rnorm = torch.linalg.vector_norm(rhs - state.mv(flat), dim=-1)
        return LinearSolution(flat, rnorm, 0, Status.SUCCESS)

    def solve_tree(self, state: Any, rhs: SparsemaxPoint) -> LinearSolution:
        """Solve for a right-hand side in the layout of the point (residual not measured: NaN).

        The closed form is exact to rounding; ``solve`` measures it where a test wants to.
        """
        x = self._solve(rhs.p, rhs.tau)
        nan = rhs.p.new_full(rhs.p.shape[:-1], float("nan")).reshape(-1)
        return LinearSolution(x, nan, 0, Status.SUCCESS)  # type: ignore[arg-type]


def _sparsemax(theta: Tensor) -> Tensor:
    """sparsemax along the last dim, differentiated by ``custom_root`` (any order)."""
    with torch.no_grad():
        point = _forward(theta)
    if not (torch.is_grad_enabled() and theta.requires_grad):
        return point.p
    support = point.p > 0
    root = custom_root(
        _Projection(support), _ProjectionSolve(support), batch_ndim=theta.ndim - 1,
        symmetric=True,
    )  # fmt: skip
    return root(lambda t: point)(theta).p


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
    return _sparsemax(moved).movedim(-1, dim)


class Sparsemax(nn.Module):
    """Module form of `sparsemax` along ``dim``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, theta: Tensor) -> Tensor:
        """Return ``sparsemax(theta, self.dim)``."""
        return sparsemax(theta, self.dim)
