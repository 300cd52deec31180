"""Reduced KKT systems of a batch of convex QPs: factorizations and solves (private).

Every linear system of the QP layer, the interior point's Newton steps, the polishing solve
and the backward pass alike, has the form

    [ Q   Gᵀ   Aᵀ ] [x]   [rz]
    [ G   −W   0  ] [y] = [rl]        W = diag(w) ≥ 0 (w = s/λ, or 0 / ∞ on an active set)
    [ A   0    0  ] [w]   [rn]

and is solved through the Schur complement on the multipliers,

    K = [G; A] Q⁻¹ [G; A]ᵀ + diag(W, 0)      (k × k, k = m + p).

With Q positive definite, [G; A] Q⁻¹ [G; A]ᵀ is computed once per solve (`prepare`), and so
is the elimination of its constant equality block: C̃ = C_GG − C_GA C_AA⁻¹ C_AG. Each new W
then costs one m × m Cholesky factorization of C̃ + W (`factor_schur`, `factor_active`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class QPData(NamedTuple):
    """A batch of QPs with the factorization of Q and the constraint Gram matrix.

    Attributes:
        Q: [B, n, n] symmetric positive definite.
        q: [B, n].
        GA: [B, k, n], G stacked over A (k = m + p).
        QGAt: [B, n, n + k], [Q, [G; A]ᵀ] contiguous: one row-vector product gives Qz and
            [G; A]z (row-vector products are faster than matrix-vector ones in torch).
        h: [B, m].
        b: [B, p].
        coef: [B, n + k], the largest modulus of a coefficient of each z_l in Qz (‖Q_l‖∞)
            and of each multiplier in Gᵀλ + Aᵀν (‖[G; A]_i‖∞): with |z|, |λ|, |ν| it gives
            the largest term of the dual residual, which scales it (`_ipm._residuals`).
        Lq: [B, n, n], lower Cholesky factor of Q.
        M: [B, n, k], Lq⁻¹ [G; A]ᵀ.
        Mt: [B, k, n], its transpose, contiguous.
        UA: [B, p, p], upper triangular with UAᵀUA = C_AA = A Q⁻¹ Aᵀ, the equality block of
            C = [G; A] Q⁻¹ [G; A]ᵀ (the R of a QR factorization of Lq⁻¹Aᵀ, see `prepare`).
        X: [B, p, m], C_AA⁻¹ C_AG.
        CGA: [B, m, p], the block C_GA = G Q⁻¹ Aᵀ.
        Ct: [B, m, m], C_GG − C_GA C_AA⁻¹ C_AG: the equalities eliminated once per solve,
            so that every new W costs an m × m factorization, not a k × k one.
    """

    Q: Tensor
    q: Tensor
    GA: Tensor
    QGAt: Tensor
    h: Tensor
    b: Tensor
    coef: Tensor
    Lq: Tensor
    M: Tensor
    Mt: Tensor
    UA: Tensor
    X: Tensor
    CGA: Tensor
    Ct: Tensor


def rmv(x: Tensor, Mt: Tensor) -> Tensor:
    """Return M x for x [B, c] given Mt = Mᵀ [B, c, r] (a row-vector product, fast in torch)."""
    return (x.unsqueeze(-2) @ Mt).squeeze(-2)


def prepare(Q: Tensor, q: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, Lq: Tensor) -> QPData:
    """Precompute [G; A] Q⁻¹ [G; A]ᵀ from the Cholesky factor Lq of Q.

    The equality block is factored by a QR factorization of M_A = Lq⁻¹Aᵀ = Q_A R, never by a
    Cholesky factorization of C_AA = M_Aᵀ M_A = RᵀR: that would square cond(M_A) (in float32 a
    cond(A) of 1e3 already costs all digits). The eliminated block is then the Gram matrix of
    M_G's component orthogonal to range(M_A), C̃ = (M_G − Q_A Q_Aᵀ M_G)ᵀ(M_G − Q_A Q_Aᵀ M_G),
    positive semidefinite by construction instead of a difference of two large matrices.

    Args:
        Q: [B, n, n]; q: [B, n]; G: [B, m, n]; h: [B, m]; A: [B, p, n]; b: [B, p].
        Lq: [B, n, n], lower Cholesky factor of Q.

    Returns:
        The batch with its factorization data.
    """
    GA = torch.cat([G, A], dim=-2)  # shape: (B, k, n)
    QGAt = torch.cat([Q, GA.mT], dim=-1)  # shape: (B, n, n + k)
    M = torch.linalg.solve_triangular(Lq, GA.mT, upper=False)  # shape: (B, n, k)
    m = G.shape[-2]
    MG, MA = M[..., :m], M[..., m:]
    if A.shape[-2] == 0:
        B = M.shape[0]
        UA, X, CGA = M.new_zeros(B, 0, 0), M.new_zeros(B, 0, m), M.new_zeros(B, m, 0)
        Ct = MG.mT @ MG
    else:
        # A full row rank (checked by the caller) makes R invertible.
        QA, UA = torch.linalg.qr(MA)  # shape: (B, n, p), (B, p, p)
        P = QA.mT @ MG  # shape: (B, p, m)
        X = torch.linalg.solve_triangular(UA, P, upper=True)  # R⁻¹Q_AᵀM_G = C_AA⁻¹ C_AG
        CGA = P.mT @ UA
        MG_perp = MG - QA @ P
        Ct = MG_perp.mT @ MG_perp
    # Q is symmetric: its column norms are its row norms (reduced along contiguous rows).
    coef = torch.cat([Q.abs().amax(-1), GA.abs().amax(-1)], dim=-1)  # shape: (B, n + k)
    return QPData(Q, q, GA, QGAt, h, b, coef, Lq, M, M.mT.contiguous(), UA, X, CGA, Ct)


def _cholesky_(K: Tensor) -> tuple[Tensor, Tensor]:
    """Factor K = UᵀU in place (K is overwritten by U); return U and LAPACK's info [B]."""
    # LAPACK factors column-major matrices. K is symmetric, so its column-major view K.mT holds
    # the same matrix; factoring that view in place (lower, L = Uᵀ) leaves U in K's row-major
    # storage with no layout copy. A row-major `out` costs cholesky_ex two full copies: 11–14 ms
    # vs 7.0 ms for 128 × 100 × 100 float64 on one CPU core (torch 2.13).
    info = torch.empty(K.shape[:-2], dtype=torch.int32, device=K.device)
    Kt = K.mT
    torch.linalg.cholesky_ex(Kt, upper=False, out=(Kt, info))
    return K, info


def factor_schur(data: QPData, W: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Factor C̃ + diag(W) = Uᵀ U, the Schur complement of K = C + diag(W, 0) on its A-block.

    Args:
        data: the batch.
        W: [B, m] nonnegative.
        out: optional [B, m, m] buffer to factor in (its content is overwritten): an
            iteration loop reuses one instead of allocating a new matrix every step.

    Returns:
        The upper Cholesky factor U [B, m, m] and a BoolTensor [B] that is False where it is
        not numerically positive definite (that element gets an identity factor so NaNs never
        reach the rest of the batch).
    """
    k, m = data.Ct.shape[-1], W.shape[-1]
    K = data.Ct.clone() if out is None else out.copy_(data.Ct)
    K.diagonal(dim1=-2, dim2=-1).add_(W)
    UK, info = _cholesky_(K)
    ok = (info == 0) & UK.diagonal(dim1=-2, dim2=-1).isfinite().all(-1)
    if not bool(ok.all()) and m > 0:
        # Dependent active inequalities (a degenerate vertex) make K singular as W → 0 on
        # them: retry with W + δ, δ = √eps · scale. The Newton step is then slightly inexact,
        # which the next iteration's exact residuals correct.
        diag_C = data.Ct.diagonal(dim1=-2, dim2=-1)
        delta = torch.finfo(W.dtype).eps ** 0.5 * (1.0 + diag_C.amax(-1, keepdim=True))
        K = data.Ct.clone()
        K.diagonal(dim1=-2, dim2=-1).add_(W + delta)
        UK2, info2 = _cholesky_(K)
        ok2 = ~ok & (info2 == 0) & UK2.diagonal(dim1=-2, dim2=-1).isfinite().all(-1)
        UK = torch.where(ok2[:, None, None], UK2, UK)
        ok = ok | ok2
    if not bool(ok.all()):
        UK = torch.where(ok[:, None, None], UK, torch.eye(k, dtype=W.dtype, device=W.device))
    return UK, ok


def kkt_solve(
    data: QPData,
    UK: Tensor,
    rz: Tensor,
    rl: Tensor,
    rn: Tensor,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve Qx + Gᵀy + Aᵀw = rz, Gx − Wy = rl, Ax = rn.

    Args:
        data: the batch.
        UK: [B, m, m] from `factor_schur` or `factor_active`.
        rz: [B, n]; rl: [B, m]; rn: [B, p].
        keep: optional BoolTensor [B, k]; rows outside it are dropped (their y is 0), which
            is W = ∞ exactly; UK must then come from `factor_active` with the same mask.

    Returns:
        x [B, n], y [B, m], w [B, p].
    """
    u, Mtu = reduce_rz(data, rz)
    y, w, yw = solve_multipliers(data, UK, Mtu, rl, rn, keep)
    return recover_x(data, u, yw), y, w


def reduce_rz(data: QPData, rz: Tensor) -> tuple[Tensor, Tensor]:
    """Return u = Lq⁻¹ rz [B, n, 1] and [G; A] Q⁻¹ rz = Mᵀu [B, k, 1]."""
    u = torch.linalg.solve_triangular(data.Lq, rz.unsqueeze(-1), upper=False)
    return u, (u.mT @ data.M).mT


def chol_solve(r: Tensor, U: Tensor) -> Tensor:
    """Solve UᵀU x = r for an upper factor U [B, c, c] and r [B, c, 1]."""
    # Two triangular solves: torch.cholesky_solve copies U into LAPACK's layout every call,
    # which costs more than the solves on CPU.
    y = torch.linalg.solve_triangular(U.mT, r, upper=False)
    return torch.linalg.solve_triangular(U, y, upper=True)


def solve_multipliers(
    data: QPData, UK: Tensor, Mtu: Tensor, rl: Tensor, rn: Tensor, keep: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve K [y; w] = [G; A] Q⁻¹ rz − [rl; rn]; return y [B, m], w [B, p], [y; w] [B, k, 1].

    Block elimination of the constant A-block: with t = C_AA⁻¹ r_A,
    (C̃ + W) y = r_G − C_GA t and w = t − C_AA⁻¹ C_AG y.
    """
    m = rl.shape[-1]
    rhs = Mtu - torch.cat([rl, rn], dim=-1).unsqueeze(-1)
    r_g, r_a = rhs[:, :m], rhs[:, m:]
    if r_a.shape[-2] > 0:
        t = chol_solve(r_a, data.UA)  # shape: (B, p, 1)
        r_g = r_g - data.CGA @ t
    if keep is not None:
        r_g = r_g * keep[:, :m].unsqueeze(-1)
    y = chol_solve(r_g, UK) if m > 0 else r_g  # shape: (B, m, 1)
    w = t - data.X @ y if r_a.shape[-2] > 0 else r_a
    yw = torch.cat([y, w], dim=-2)
    return y[..., 0], w[..., 0], yw


def recover_x(data: QPData, u: Tensor, yw: Tensor) -> Tensor:
    """Return x = Q⁻¹(rz − [G; A]ᵀ[y; w]) = Lq⁻ᵀ(u − M [y; w]) as [B, n]."""
    u = u - (yw.mT @ data.Mt).mT
    return torch.linalg.solve_triangular(data.Lq.mT, u, upper=True).squeeze(-1)


def factor_active(data: QPData, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Factor the KKT system of the identified active set: W = 0 on it, W = ∞ off it.

    At a strictly complementary solution this is the exact KKT Jacobian (active constraints
    hold with equality, inactive ones have λ = 0 and drop out), free of the O(μ) smoothing
    the interior-point iterate's W = s/λ carries.

    Args:
        data: the batch.
        active: BoolTensor [B, m].

    Returns:
        The upper factor [B, m, m] of C̃ restricted to the active rows (identity on the dropped
        rows), the keep mask [B, k] for `kkt_solve` (equality rows always kept), and a
        BoolTensor [B] that is False where that matrix is singular (dependent active
        constraints: a degenerate vertex).
    """
    B, k, m = data.GA.shape[0], data.GA.shape[-2], active.shape[-1]
    keep = torch.cat([active, active.new_ones(B, k - m)], dim=-1)
    both = active.unsqueeze(-1) & active.unsqueeze(-2)
    K = torch.where(both, data.Ct, 0.0)
    K.diagonal(dim1=-2, dim2=-1).add_((~active).to(K.dtype))
    UK, info = _cholesky_(K)
    if m == 0:
        return UK, keep, info == 0
    piv = UK.diagonal(dim1=-2, dim2=-1).square()
    # A tiny pivot relative to the largest one means (numerically) dependent active rows.
    ok = (info == 0) & (piv.amin(-1) > 1e3 * torch.finfo(K.dtype).eps * piv.amax(-1))
    return UK, keep, ok
