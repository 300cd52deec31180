"""Softmax as the entropy-regularized argmax over the simplex, differentiated by the IFT.

The worked example of the seed (§4): for logits θ ∈ ℝⁿ and temperature τ > 0,

    z*(θ) = argmax_{z ∈ Δⁿ} ⟨θ, z⟩ + τ H(z),   H(z) = −Σᵢ zᵢ log zᵢ,

whose solution is softmax(θ/τ). The code never uses that closed form to solve: the forward is
Newton's method on the one-dimensional dual (or entropic mirror descent), and the derivative
comes from `structift.implicit.custom_root` on the KKT system (seed eq. 4). With ν the
multiplier of 1ᵀz = 1 (shifted to absorb the constant from ∂H), the KKT residual is

    F_z = τ log z + ν 1 − θ = 0,   F_ν = 1ᵀz − 1 = 0,                           (KKT)

(z ≻ 0 makes the multipliers of z ≥ 0 vanish). Its Jacobian in (z, ν) is the symmetric
saddle-point (KKT) matrix

    K = [[τ diag(1/z), 1], [1ᵀ, 0]],   and ∂F/∂θ = [−I; 0],

so dz/dθ is the top-left block of K⁻¹. Eliminating z (Schur complement s = −1ᵀH⁻¹1 with
H = τ diag(1/z)) gives the closed form

    dz/dθ = H⁻¹ − H⁻¹1 (1ᵀH⁻¹1)⁻¹ 1ᵀH⁻¹ = (diag(z) − z zᵀ) / τ.

Logits equal to −inf give zᵢ = 0: the residual restricts to the support S = {i : zᵢ > 0}
(as the seed restricts to z ≻ 0) and uses F_zᵢ = zᵢ off the support, so those rows of the
Jacobian are zero. Also dν/dθ = z: ν = τ logsumexp(θ/τ), the log-partition.

Public API: `entropic_argmax` (differentiable z), `solve_kkt` (differentiable
(z, ν)), `kkt_residual`, `kkt_matrix`, `softmax_jacobian`,
`schur_jacobian`, `dense_kkt_jacobian`, `dual_newton`,
`mirror_descent`. Tensors are ``[..., n]`` with the simplex on the last dim (except
where ``dim`` is taken).
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from structift.implicit import AbstractLinearSolver, custom_root
from structift.implicit._deprecation import renamed_kwargs
from structift.structures.simplex import (
    SimplexKKT,
    dual_newton,
    kkt_residual,
    mirror_descent,
    point_from_primal,
    support,
)

__all__ = [
    "SimplexKKT",
    "dense_kkt_jacobian",
    "dual_newton",
    "entropic_argmax",
    "kkt_matrix",
    "kkt_residual",
    "mirror_descent",
    "schur_jacobian",
    "simplex_mirror_descent",
    "softmax_jacobian",
    "solve_kkt",
]

Temperature = float | Tensor


def _check_theta(theta: Tensor, temperature: Temperature) -> None:
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(f"theta must be a floating-point tensor, got {type(theta).__name__}")
    if theta.ndim == 0 or theta.shape[-1] == 0:
        raise ValueError(f"theta must have shape [..., n] with n >= 1, got {tuple(theta.shape)}")
    if torch.isnan(theta).any() or torch.isposinf(theta).any():
        raise ValueError("theta contains NaN or +inf; logits must be finite or -inf")
    if torch.isneginf(theta).all(-1).any():
        raise ValueError("every row of theta needs a finite logit; got a row of all -inf")
    if not bool(torch.all(torch.as_tensor(temperature) > 0)):
        raise ValueError(f"temperature must be positive, got {temperature}")


def kkt_matrix(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return K = ∂F/∂(z, ν) ``[..., n+1, n+1]`` of the symmetric residual at ``z``.

    ``K = [[τ diag(1/z), 1], [1ᵀ, 0]]`` on the support; a row and column of the identity for
    each zᵢ = 0 (so K stays symmetric and invertible).
    """
    on = support(z)
    n = z.shape[-1]
    tau = torch.as_tensor(temperature, dtype=z.dtype, device=z.device)
    diag = torch.where(on, tau / torch.where(on, z, 1.0), 1.0)
    edge = on.to(z.dtype)  # shape: (..., n) — the constraint row, zero off the support
    K = torch.zeros(*z.shape[:-1], n + 1, n + 1, dtype=z.dtype, device=z.device)
    K[..., :n, :n] = torch.diag_embed(diag)
    K[..., :n, n] = edge
    K[..., n, :n] = edge
    return K


def softmax_jacobian(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return the closed form dz/dθ = (diag(z) − z zᵀ) / τ ``[..., n, n]``."""
    return (torch.diag_embed(z) - z.unsqueeze(-1) * z.unsqueeze(-2)) / temperature


def schur_jacobian(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return dz/dθ ``[..., n, n]`` by eliminating z from K (Schur complement).

    With H = τ diag(1/z) restricted to the support (H⁻¹ = diag(z)/τ, zero off it):
    dz/dθ = H⁻¹ − H⁻¹1 (1ᵀH⁻¹1)⁻¹ 1ᵀH⁻¹. Only a diagonal inverse and a scalar Schur
    complement are needed — O(n²) to form, O(n) to apply.
    """
    h_inv = torch.where(support(z), z, torch.zeros_like(z)) / temperature  # diagonal of H⁻¹
    schur = h_inv.sum(-1, keepdim=True)  # 1ᵀH⁻¹1 (= 1/τ on the simplex)
    return torch.diag_embed(h_inv) - h_inv.unsqueeze(-1) * h_inv.unsqueeze(-2) / schur.unsqueeze(-1)


def dense_kkt_jacobian(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return dz/dθ ``[..., n, n]`` by a dense solve of K [dz; dν] = [I; 0]."""
    n = z.shape[-1]
    K = kkt_matrix(z, temperature)
    rhs = torch.zeros_like(K[..., :, :n])
    rhs[..., :n, :n] = torch.diag_embed(support(z).to(z.dtype))  # −∂F/∂θ = [I; 0] on the support
    return torch.linalg.solve(K, rhs)[..., :n, :]


@renamed_kwargs(steps="max_iter", step_size="damping")
def solve_kkt(
    theta: Tensor,
    temperature: Temperature = 1.0,
    *,
    method: Literal["newton", "mirror_descent"] = "newton",
    max_iter: int = 100,
    damping: float = 0.5,
    linear_solver: AbstractLinearSolver | None = None,
    scaled: bool = True,
) -> SimplexKKT:
    """Solve the entropy-regularized argmax; return a differentiable ``(z, ν)``.

    The forward runs ``method`` without a graph; gradients come from
    `structift.implicit.custom_root` on `kkt_residual` (so memory does not grow
    with the number of iterations). ``dν/dθ = z``.

    Args:
        theta: logits ``[..., n]`` (−inf allowed; one finite entry per row).
        temperature: τ > 0 (a float, or a tensor to differentiate with respect to τ).
        method: ``"newton"`` (dual Newton, to machine precision) or ``"mirror_descent"``
            (``max_iter`` iterations with ``damping``: a truncated solve, whose IFT gradient is
            only as accurate as the iterate).
        max_iter: Newton budget or number of mirror-descent iterations (was ``steps``).
        damping: mirror-descent ρ (was ``step_size``).
        linear_solver: for the backward; default Dense for n <= 1023, else GMRES.
        scaled: differentiate the row-scaled residual (well conditioned, non-symmetric;
            default). Use ``scaled=False`` for the symmetric KKT matrix (MINRES, or CG-type
            solvers on reduced forms).

    Returns:
        ``SimplexKKT(z [..., n], nu [..., 1])``.
    """
    _check_theta(theta, temperature)
    if method not in ("newton", "mirror_descent"):
        raise ValueError(f"method must be 'newton' or 'mirror_descent', got {method!r}")

    def forward(theta: Tensor, temperature: Temperature) -> SimplexKKT:
        if method == "newton":
            return dual_newton(theta, temperature, max_iter=max_iter)
        with torch.no_grad():
            z = mirror_descent(theta, temperature, max_iter=max_iter, damping=damping)
        return point_from_primal(z, theta, temperature)

    def residual(point: SimplexKKT, theta: Tensor, temperature: Temperature) -> SimplexKKT:
        return kkt_residual(point, theta, temperature, scaled=scaled)

    solve = custom_root(residual, linear_solver, batch_ndim=theta.ndim - 1, symmetric=not scaled)(
        forward
    )
    return solve(theta, temperature)


@renamed_kwargs(steps="max_iter", step_size="damping")
def entropic_argmax(
    theta: Tensor,
    dim: int = -1,
    temperature: Temperature = 1.0,
    *,
    method: Literal["newton", "mirror_descent"] = "newton",
    max_iter: int = 100,
    damping: float = 0.5,
    linear_solver: AbstractLinearSolver | None = None,
    scaled: bool = True,
) -> Tensor:
    """Return argmax_{z ∈ Δ} ⟨θ, z⟩ + τ H(z) along ``dim`` (= softmax(θ/τ)), via the IFT.

    See `solve_kkt` for the keyword arguments; this returns only z, moved back to
    ``dim``.

    Args:
        theta: logits ``[..., n, ...]``.
        dim: the simplex dimension.
        temperature: τ > 0.
    """
    moved = theta.movedim(dim, -1)
    point = solve_kkt(
        moved,
        temperature,
        method=method,
        max_iter=max_iter,
        damping=damping,
        linear_solver=linear_solver,
        scaled=scaled,
    )
    return point.z.movedim(-1, dim)


class MirrorDescentResult(NamedTuple):
    """Output of the deprecated `simplex_mirror_descent`: ``mu`` ``[B, n]``."""

    mu: Tensor


def simplex_mirror_descent(
    theta: Tensor,
    temperature: float = 1.0,
    tol: float = 1e-12,
    max_iter: int = 10_000,
    damping: float = 0.5,
) -> MirrorDescentResult:
    """Deprecated: `mirror_descent` with ``tol`` (the one simplex solver)."""
    warnings.warn(
        "simplex_mirror_descent is deprecated: use structift.variational.simplex.mirror_descent"
        "(theta, temperature, max_iter, damping, tol); it goes away in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    with torch.no_grad():
        return MirrorDescentResult(mirror_descent(theta, temperature, max_iter, damping, tol))
