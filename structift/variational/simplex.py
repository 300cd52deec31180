"""Softmax as the entropy-regularized argmax over the simplex, differentiated by the IFT.

The worked example of the seed (§4): for logits θ ∈ ℝⁿ and temperature τ > 0,

    z*(θ) = argmax_{z ∈ Δⁿ} ⟨θ, z⟩ + τ H(z),   H(z) = −Σᵢ zᵢ log zᵢ,

whose solution is softmax(θ/τ). The code never uses that closed form to solve: the forward is
Newton's method on the one-dimensional dual (or entropic mirror descent), and the derivative
comes from :func:`structift.implicit.custom_root` on the KKT system (seed eq. 4). With ν the
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

Public API: :func:`entropic_argmax` (differentiable z), :func:`solve_kkt` (differentiable
(z, ν)), :func:`kkt_residual`, :func:`kkt_matrix`, :func:`softmax_jacobian`,
:func:`schur_jacobian`, :func:`dense_kkt_jacobian`, :func:`dual_newton`,
:func:`mirror_descent`. Tensors are ``[..., n]`` with the simplex on the last dim (except
where ``dim`` is taken).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from structift.implicit import AbstractLinearSolver, ConvergenceError, custom_root

__all__ = [
    "SimplexKKT",
    "dense_kkt_jacobian",
    "dual_newton",
    "entropic_argmax",
    "kkt_matrix",
    "kkt_residual",
    "mirror_descent",
    "schur_jacobian",
    "softmax_jacobian",
    "solve_kkt",
]

Temperature = float | Tensor


class SimplexKKT(NamedTuple):
    """A primal-dual point of the simplex problem: ``z`` ``[..., n]``, ``nu`` ``[..., 1]``."""

    z: Tensor
    nu: Tensor


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


def kkt_residual(
    point: SimplexKKT, theta: Tensor, temperature: Temperature = 1.0, *, scaled: bool = False
) -> SimplexKKT:
    """Return the KKT residual (F_z, F_ν) of the entropy-regularized argmax (seed eq. 4).

    On the support S = {i : zᵢ > 0}: ``F_z = τ log z + ν − θ`` (or, with ``scaled=True``,
    ``D (τ log z + ν − θ)`` with D = diag(z) held constant (detached): the same equations
    left-preconditioned, whose Jacobian [[τI, z], [1ᵀ, 0]] is well conditioned however small
    z gets — GMRES converges in about 3 iterations — and whose IFT derivative equals the
    unscaled one at every point); off the support ``F_zᵢ = zᵢ``; ``F_ν = Σ_{i∈S} zᵢ − 1``.
    Zero exactly at ``(softmax(θ/τ), τ logsumexp(θ/τ))``.

    Args:
        point: ``SimplexKKT(z [..., n], nu [..., 1])``.
        theta: logits ``[..., n]`` (−inf where zᵢ = 0).
        temperature: τ > 0, a float or a tensor broadcastable to ``[..., 1]``.
        scaled: use the row-scaled (non-symmetric, well-conditioned) form.

    Returns:
        ``SimplexKKT(F_z [..., n], F_nu [..., 1])``.
    """
    z, nu = point
    support = z > 0
    safe_z = torch.where(support, z, torch.ones_like(z))
    safe_theta = torch.where(support, theta, torch.zeros_like(theta))
    stationarity = temperature * torch.log(safe_z) + nu - safe_theta
    if scaled:
        # A constant (detached) row scaling is a left preconditioner: (D ∂F/∂z)⁻¹ D ∂F/∂θ is
        # the same IFT derivative at every point, and D ∂F/∂z = [[τI, z], [1ᵀ, 0]] stays well
        # conditioned even at an unconverged iterate.
        stationarity = safe_z.detach() * stationarity
    F_z = torch.where(support, stationarity, z)
    F_nu = torch.where(support, z, torch.zeros_like(z)).sum(-1, keepdim=True) - 1
    return SimplexKKT(F_z, F_nu)


def kkt_matrix(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return K = ∂F/∂(z, ν) ``[..., n+1, n+1]`` of the symmetric residual at ``z``.

    ``K = [[τ diag(1/z), 1], [1ᵀ, 0]]`` on the support; a row and column of the identity for
    each zᵢ = 0 (so K stays symmetric and invertible).
    """
    support = z > 0
    n = z.shape[-1]
    tau = torch.as_tensor(temperature, dtype=z.dtype, device=z.device)
    diag = torch.where(support, tau / torch.where(support, z, 1.0), 1.0)
    edge = support.to(z.dtype)  # shape: (..., n) — the constraint row, zero off the support
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
    h_inv = torch.where(z > 0, z, torch.zeros_like(z)) / temperature  # diagonal of H⁻¹
    schur = h_inv.sum(-1, keepdim=True)  # 1ᵀH⁻¹1 (= 1/τ on the simplex)
    return torch.diag_embed(h_inv) - h_inv.unsqueeze(-1) * h_inv.unsqueeze(-2) / schur.unsqueeze(-1)


def dense_kkt_jacobian(z: Tensor, temperature: Temperature = 1.0) -> Tensor:
    """Return dz/dθ ``[..., n, n]`` by a dense solve of K [dz; dν] = [I; 0]."""
    n = z.shape[-1]
    K = kkt_matrix(z, temperature)
    rhs = torch.zeros_like(K[..., :, :n])
    rhs[..., :n, :n] = torch.diag_embed((z > 0).to(z.dtype))  # −∂F/∂θ = [I; 0] on the support
    return torch.linalg.solve(K, rhs)[..., :n, :]


def dual_newton(
    theta: Tensor, temperature: Temperature = 1.0, max_iters: int = 100, tol: float | None = None
) -> SimplexKKT:
    """Solve the problem by Newton's method on its one-dimensional dual.

    The optimal ν solves φ(ν) = Σᵢ exp((θᵢ − ν)/τ) − 1 = 0, a convex decreasing function.
    Newton from ν₀ = max θ (where φ ≥ 0) increases ν monotonically to the root:
    ν ← ν + τ φ/(1 + φ). Then zᵢ = exp((θᵢ − ν)/τ). No graph is built (use
    :func:`solve_kkt` for gradients).

    Args:
        theta: ``[..., n]`` logits (−inf allowed, one finite per row).
        temperature: τ > 0 (float or tensor broadcastable to ``[..., 1]``).
        max_iters: Newton budget (about log n + 10 steps are needed).
        tol: stop when every step is below ``tol · τ`` (default 4·eps).

    Returns:
        ``SimplexKKT(z, nu)`` satisfying :func:`kkt_residual` ≈ 0.

    Raises:
        ConvergenceError: if the budget is spent first.
    """
    tol = 4 * torch.finfo(theta.dtype).eps if tol is None else tol
    with torch.no_grad():
        theta = theta.detach()
        if isinstance(temperature, Tensor):
            temperature = temperature.detach()
        nu = theta.amax(-1, keepdim=True)
        for _ in range(max_iters):
            phi = torch.exp((theta - nu) / temperature).sum(-1, keepdim=True) - 1
            step = temperature * phi / (1 + phi)
            nu = nu + step
            if bool((step.abs() <= tol * temperature * (1 + nu.abs())).all()):
                break
        else:
            raise ConvergenceError(
                f"dual_newton did not converge in {max_iters} steps (last step "
                f"{float(step.abs().max()):.3g}); raise max_iters or loosen tol"
            )
        return SimplexKKT(torch.exp((theta - nu) / temperature), nu)


def mirror_descent(
    theta: Tensor, temperature: Temperature = 1.0, steps: int = 100, step_size: float = 0.5
) -> Tensor:
    """Run ``steps`` iterations of entropic mirror descent (exponentiated gradient).

    With η = step_size/τ the update is log z ← (1 − ρ) log z + ρ θ/τ, renormalized, with
    ρ = step_size: the error of log z contracts by |1 − ρ| per step (ρ = 1 would jump to the
    solution). Differentiable by autograd if ``theta`` requires grad — the unrolled baseline
    of ``benchmarks/unrolled_vs_ift.py``; its memory grows with ``steps``.

    Args:
        theta: ``[..., n]`` logits.
        temperature: τ > 0.
        steps: number of iterations K.
        step_size: ρ ∈ (0, 2).

    Returns:
        z ``[..., n]`` on the simplex.
    """
    if not 0 < step_size < 2:
        raise ValueError(f"step_size must be in (0, 2), got {step_size}")
    log_z = torch.where(torch.isfinite(theta), 0.0, float("-inf")).to(theta.dtype)
    log_z = log_z - torch.logsumexp(log_z, -1, keepdim=True)
    target = theta / temperature
    for _ in range(steps):
        log_z = (1 - step_size) * log_z + step_size * target
        log_z = log_z - torch.logsumexp(log_z, -1, keepdim=True)
    return torch.exp(log_z)


def point_from_primal(z: Tensor, theta: Tensor, temperature: Temperature = 1.0) -> SimplexKKT:
    """Complete a primal z to a KKT point: ν = Σ_S zᵢ (θᵢ − τ log zᵢ) (exact at the optimum)."""
    support = z > 0
    gap = torch.where(support, theta - temperature * torch.log(torch.where(support, z, 1.0)), 0.0)
    return SimplexKKT(z, (z * gap).sum(-1, keepdim=True))


def solve_kkt(
    theta: Tensor,
    temperature: Temperature = 1.0,
    *,
    method: Literal["newton", "mirror_descent"] = "newton",
    steps: int = 100,
    step_size: float = 0.5,
    linear_solver: AbstractLinearSolver | None = None,
    scaled: bool = True,
) -> SimplexKKT:
    """Solve the entropy-regularized argmax; return a differentiable ``(z, ν)``.

    The forward runs ``method`` without a graph; gradients come from
    :func:`structift.implicit.custom_root` on :func:`kkt_residual` (so memory does not grow
    with the number of iterations). ``dν/dθ = z``.

    Args:
        theta: logits ``[..., n]`` (−inf allowed; one finite entry per row).
        temperature: τ > 0 (a float, or a tensor to differentiate with respect to τ).
        method: ``"newton"`` (dual Newton, to machine precision) or ``"mirror_descent"``
            (``steps`` iterations with ``step_size``: a truncated solve, whose IFT gradient is
            only as accurate as the iterate).
        steps: Newton budget or number of mirror-descent iterations.
        step_size: mirror-descent ρ.
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
            return dual_newton(theta, temperature, max_iters=steps)
        z = mirror_descent(theta, temperature, steps=steps, step_size=step_size)
        return point_from_primal(z, theta, temperature)

    def residual(point: SimplexKKT, theta: Tensor, temperature: Temperature) -> SimplexKKT:
        return kkt_residual(point, theta, temperature, scaled=scaled)

    solve = custom_root(residual, linear_solver, batch_ndim=theta.ndim - 1, symmetric=not scaled)(
        forward
    )
    return solve(theta, temperature)


def entropic_argmax(
    theta: Tensor,
    dim: int = -1,
    temperature: Temperature = 1.0,
    *,
    method: Literal["newton", "mirror_descent"] = "newton",
    steps: int = 100,
    step_size: float = 0.5,
    linear_solver: AbstractLinearSolver | None = None,
    scaled: bool = True,
) -> Tensor:
    """Return argmax_{z ∈ Δ} ⟨θ, z⟩ + τ H(z) along ``dim`` (= softmax(θ/τ)), via the IFT.

    See :func:`solve_kkt` for the keyword arguments; this returns only z, moved back to
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
        steps=steps,
        step_size=step_size,
        linear_solver=linear_solver,
        scaled=scaled,
    )
    return point.z.movedim(-1, dim)
