"""When a linear system counts as singular: one rule, and a condition estimate for Dense.

The rule every solver applies: A is numerically singular when ``σ_min(A) <= rcond · ‖A‖``,
with ``rcond`` defaulting to `default_rcond` ``= 10 eps(dtype)``. Forming or applying
A in floating point perturbs it by some E with entries of relative size eps; that moves
σ_min of an exactly singular A by about ``|uᵀ E v| ~ eps ‖A‖`` (u, v its singular vectors),
not by ‖E‖ (which grows like √N): measured, at most 1.5 eps ‖A‖ for random rank-deficient
matrices with N from 5 to 800 in float32 and float64. No computation can tell such a matrix
from a singular one, and its solution is meaningless (relative error bound κ(A) eps >= 1/10).
The factor 10 is the safety margin; it is the test of scipy's MINRES (``Acond >= 0.1/eps``),
an order of magnitude above MATLAB's ``rcond < eps`` warning, and it keeps honest float32
systems (κ up to ~10⁵) solvable.

How each solver measures ``σ_min / ‖A‖``:

- Dense: ``1 / κ₁(S)`` of the equilibrated matrix ``S = D_r A D_c`` (`equilibrate`),
  estimated from its factorization (Hager's method with Higham's refinements, the
  estimator of LAPACK's ``xGECON``/``xPOCON``; `inverse_norm1`). Singularity does not
  change under scaling and rounding perturbs each entry relative to itself, so the rule
  holds for S as for A; but a badly scaled A — a barrier or entropy term γ/z with z → 0,
  diag(1, 10¹⁶) — is not singular, and S shows it. A pivot test is no certificate: LU
  pivots and Cholesky diagonals of a matrix with a rounding-level eigenvalue are often
  10³–10⁶ times larger than it.
- Krylov (norm-wise: they see A only through products; precondition a badly scaled
  system): a pivot (MINRES, GMRES) or curvature ``pᵀAp / ‖p‖²`` (CG) is at least σ_min(A)
  (λ_min for CG), an iterate from x₀ = 0 has norm at most ``‖b‖ / σ_min(A)``, and the running
  estimate of ‖A‖ is at most ‖A‖; so a pivot below ``rcond ·`` that estimate, or an iterate
  longer than ``‖b‖ / (rcond ·`` that estimate), proves ``σ_min(A) < rcond · ‖A‖``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["default_rcond", "equilibrate", "inverse_norm1"]

Solve = Callable[[Tensor], Tensor]


def default_rcond(dtype: torch.dtype) -> float:
    """Return ``10 eps(dtype)``, the default ``σ_min/‖A‖`` at or below which A is singular."""
    return 10.0 * torch.finfo(dtype).eps


def _power_of_two(scale: Tensor) -> Tensor:
    # Scaling by powers of 2 is exact: S has the rounding errors of A, no more.
    return torch.exp2(torch.round(torch.log2(scale)))


def equilibrate(A: Tensor, symmetric: bool = False, max_iter: int = 40) -> tuple[Tensor, Tensor]:
    """Return scalings ``r, c`` [B, N] that equilibrate A: ``S = diag(r) A diag(c)``.

    Every row and column of S gets largest entry of magnitude in (1/2, 2]: Ruiz's iteration
    (``r ← r/√(row max)``, ``c ← c/√(column max)``; Ruiz, RAL-TR-2001-034),
    which halves the log-distance to equilibrium per step and keeps a symmetric A
    symmetric. A single row-then-column pass (LAPACK ``xGEEQU``) leaves ``D A D`` badly
    scaled when D spans many orders of magnitude. With ``symmetric`` (A SPD) it is the
    Jacobi scaling ``r = c = 1/√diag(A)`` (``xPOEQU``), exact for ``D A D``. Scalings are
    rounded to powers of 2; a zero row or column (or a non-positive diagonal) keeps scale 1.

    Args:
        A: ``[B, N, N]``.
        symmetric: use the symmetric (Jacobi) scaling.
        max_iter: Ruiz iterations at most (about log2 of the scale range, plus a few).
    """
    tiny = torch.finfo(A.dtype).tiny
    if symmetric:
        d = torch.diagonal(A, dim1=-2, dim2=-1)
        s = _power_of_two(torch.where(d > 0, d.clamp_min(tiny), 1.0) ** -0.5)
        return s, s
    r, c = torch.ones_like(A[..., 0]), torch.ones_like(A[..., 0])
    absA = A.abs()
    for _ in range(max_iter):
        S = r.unsqueeze(-1) * absA * c.unsqueeze(-2)
        rows, cols = S.amax(-1), S.amax(-2)
        done = ((rows > 0.5) & (rows <= 2)) | (rows == 0)
        if bool((done & (((cols > 0.5) & (cols <= 2)) | (cols == 0))).all()):
            break
        r = torch.where(rows > 0, r / rows.clamp_min(tiny).sqrt(), r)
        c = torch.where(cols > 0, c / cols.clamp_min(tiny).sqrt(), c)
    return _power_of_two(r), _power_of_two(c)


def inverse_norm1(solve: Solve, solve_t: Solve, like: Tensor, max_iter: int = 5) -> Tensor:
    """Estimate ``‖A⁻¹‖₁`` per system from solves with A and Aᵀ (Hager 1984; Higham 1988).

    A lower bound, usually within a factor 3 and exact for nearly singular matrices (their
    inverse is dominated by one rank-one term). Costs at most ``2·max_iter + 1`` solves of
    O(N²) each with a factorization — negligible next to the O(N³) factorization.

    Args:
        solve: ``x [B, N] -> A⁻¹ x``.
        solve_t: ``x [B, N] -> A⁻ᵀ x``.
        like: a ``[B, N]`` tensor giving the shape, dtype and device.
        max_iter: iteration budget (LAPACK's ``xLACN2`` uses 5).

    Returns:
        ``[B]``, a lower bound on ``‖A⁻¹‖₁``; ``inf`` where a solve overflowed.
    """
    B, N = like.shape
    x = torch.full_like(like, 1.0 / N)
    est = like.new_zeros(B)
    for k in range(max_iter):
        y = solve(x)
        est = torch.maximum(est, y.abs().sum(-1))
        z = solve_t(torch.where(y >= 0, 1.0, -1.0).to(like.dtype))
        # Stationary point of the convex maximization of ‖A⁻¹x‖₁ over the unit 1-ball.
        if k > 0 and bool((z.abs().amax(-1) <= (z * x).sum(-1)).all()):
            break
        x = torch.nn.functional.one_hot(z.abs().argmax(-1), N).to(like.dtype)
    # Higham's extra vector guards against the rare matrices that fool the iteration.
    i = torch.arange(N, dtype=like.dtype, device=like.device)
    alt = torch.where(i % 2 == 0, 1.0, -1.0) * (1 + i / max(N - 1, 1))
    y = solve(alt.expand(B, N).contiguous())
    est = torch.maximum(est, 2 * y.abs().sum(-1) / (3 * N))
    return torch.where(torch.isnan(est), torch.inf, est)
