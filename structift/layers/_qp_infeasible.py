"""Certificates of primal infeasibility for `qp_solve`: Farkas vectors, found and verified.

By Farkas' lemma, {z : Gz ≤ h, Az = b} is empty if and only if some y = (λ, ν) has

    λ ≥ 0,   Gᵀλ + Aᵀν = 0,   hᵀλ + bᵀν < 0.

Such a y is found by projection. With M = [G; A] [k, n] and c = (h, b), the vectors y with λ ≥ 0
and Mᵀy = 0 form a closed convex cone D, and

    y* = argmin_{y ∈ D} ½‖y‖² + cᵀy

is the projection of −c onto D. By Moreau's decomposition y* = P_K(c) − c for the cone
K = {(Gz + s, Az) : s ≥ 0} (D = −K°), so y* = 0 exactly when c ∈ K (feasible), and otherwise
cᵀy* = −‖y*‖² < 0: y* is a certificate, the one of least norm for its value. It is computed
in float64 with the QP layer's own interior point: y = N w, N an orthonormal basis of
null(Mᵀ) (SVD), leaves min ½‖w‖² + (Nᵀc)ᵀw s.t. −N_G w ≤ 0, a QP with Q = I and no equalities
that is always feasible (w = 0); Mᵀy = 0 then holds to rounding by construction. The
interior point's accuracy is absolute (about its tolerance times ‖c‖) while ‖y*‖ is small
for a nearly feasible problem, so y is recomputed exactly on the support it found: the
projection of −c onto a subspace (`_exact_projection`); the better of the two is kept.

A certificate is judged by exact inequalities, not by a tolerance on its residual: for any
feasible z, rᵀz = λᵀGz + νᵀAz ≤ hᵀλ + bᵀν with r = Gᵀλ + Aᵀν, so

    ‖z‖∞ ≥ t / ‖r‖₁,   t = −(hᵀλ + bᵀν).

`FarkasCertificate.check` evaluates t and ‖r‖₁ in float64 with bounds on their rounding
(Higham, Accuracy and Stability of Numerical Algorithms, §3.1), which gives a radius within
which no feasible point exists. A problem counts as infeasible
when that radius is at least R times the scale of its constraints Z = max_i |c_i| / ‖M_i‖₁
(`_scale`: the largest ∞-norm distance of a constraint hyperplane from the origin), with
R = 1e3 for float32 data and 1e7 for float64. A feasible problem can only be flagged if each
of its feasible points lies that far out, where merely evaluating Gz in the dtype rounds by
up to eps·R·‖c‖ (1.2e-4 in float32, 2.2e-9 in float64): ten times the residual that
`qp_solve` accepts by default (1e-5, 1e-10), so no solve could have returned such a point.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._ipm import interior_point, polish
from ._kkt import prepare

__all__ = ["FarkasCertificate", "FarkasCheck", "certify", "find_certificates", "radius_factor"]

F64 = torch.float64
# The radius, in units of the constraints' scale, that a certificate must clear: eps·R is
# at least ten times the residual `qp_solve` accepts by default (100·tol).
_RADIUS = {torch.float32: 1e3, torch.float64: 1e7}
# The float64 interior point on the projection problem: its tolerances and iteration cap.
_TOL, _ACCEPT, _MAX_ITER = 1e-13, 1e-10, 100


class FarkasCheck(NamedTuple):
    """The verified numbers of a `FarkasCertificate`, each [K].

    Attributes:
        residual: an upper bound on ‖Gᵀλ + Aᵀν‖₁ in exact arithmetic (for an exact
            certificate, just the bound on the rounding of its evaluation).
        value: a lower bound on t = −(hᵀλ + bᵀν); the certificate needs value > 0.
        radius: value / residual: no z with ‖z‖∞ < radius satisfies Gz ≤ h, Az = b.
        required: the radius demanded, R times the constraints' scale
            Z = max_i |c_i| / ‖[G; A]_i‖₁ (R = 1e3 for float32 data, 1e7 for float64).
        valid: BoolTensor, value > 0 and radius ≥ required: the problem is infeasible.
    """

    residual: Tensor
    value: Tensor
    radius: Tensor
    required: Tensor
    valid: Tensor


class FarkasCertificate(NamedTuple):
    """Farkas vectors proving {z : Gz ≤ h, Az = b} empty for K problems of a batch.

    For each listed problem, λ ≥ 0 and ν satisfy Gᵀλ + Aᵀν = 0 (to rounding) and
    hᵀλ + bᵀν < 0; ``check()`` verifies this from the stored data (float64 copies of the
    problem's G, h, A, b).

    Attributes:
        batch_index: LongTensor [K, len(B)], the batch index of each problem (as ``nonzero()``
            gives it; a problem without batch dimensions has K = 1 and an empty index row).
        lam: [K, m] float64, λ ≥ 0.
        nu: [K, p] float64.
        G: [K, m, n]; h: [K, m]; A: [K, p, n]; b: [K, p], the problems' data in float64.
        dtype: the dtype of the data given to `qp_solve`; it sets the radius required
            (`FarkasCheck.required`).
    """

    batch_index: Tensor
    lam: Tensor
    nu: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    dtype: torch.dtype

    def check(self) -> FarkasCheck:
        """Return the rounding-bounded residual, value and radius of every certificate."""
        return _verify(self.lam, self.nu, self.G, self.h, self.A, self.b, self.dtype)


def _rmv(x: Tensor, M: Tensor) -> Tensor:
    """Return Mᵀx for x [K, k] and M [K, k, n]."""
    return (x.unsqueeze(-2) @ M).squeeze(-2)


def _scale(M: Tensor, c: Tensor) -> Tensor:
    """Return max_i |c_i| / ‖M_i‖₁ [K]: every constraint hyperplane M_i z = c_i lies within this
    ∞-norm distance of the origin. Invariant to scaling rows and to rescaling z."""
    row = M.abs().sum(-1)
    ratio = torch.where(row > 0, c.abs() / row.clamp(min=torch.finfo(F64).tiny), 0.0)
    return ratio.amax(-1) if ratio.shape[-1] else ratio.new_zeros(ratio.shape[:-1])


def _verify(
    lam: Tensor, nu: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, dtype: torch.dtype
) -> FarkasCheck:
    """Bound t = −(hᵀλ + bᵀν) from below and ‖Gᵀλ + Aᵀν‖₁ from above, including rounding."""
    y = torch.cat([lam.clamp(min=0.0), nu], dim=-1).to(F64)
    M, c = torch.cat([G, A], dim=-2).to(F64), torch.cat([h, b], dim=-1).to(F64)
    k, n = M.shape[-2], M.shape[-1]
    # A sum of j terms has error at most γ_j ≈ j·eps times the sum of their moduli (in any
    # order); the factor 2 covers the rounding of the bounds themselves.
    eps = torch.finfo(F64).eps
    gamma_k, gamma_n = 2.0 * (k + 1) * eps, 2.0 * (n + 1) * eps
    r = _rmv(y, M).abs().sum(-1) + gamma_k * _rmv(y.abs(), M.abs()).sum(-1)
    residual = r * (1.0 + gamma_n)
    value = -(c * y).sum(-1) - gamma_k * (c.abs() * y.abs()).sum(-1)
    radius = torch.where(residual > 0, value / residual, float("inf"))
    required = radius_factor(dtype) * _scale(M, c)
    valid = (value > 0) & (radius >= required)
    return FarkasCheck(residual, value, radius, required, valid)


def _null_basis(M: Tensor) -> Tensor:
    """Return U [K, k, k] orthogonal whose columns beyond rank(M) span null(Mᵀ); the columns
    inside the range of M are zeroed."""
    k, n = M.shape[-2], M.shape[-1]
    U, sv, _ = torch.linalg.svd(M, full_matrices=True)
    sv = torch.cat([sv, sv.new_zeros(*sv.shape[:-1], k - sv.shape[-1])], dim=-1)
    tol = max(k, n) * torch.finfo(F64).eps * sv[..., :1]
    null = sv <= tol  # shape: (K, k)
    return U * null.unsqueeze(-2).to(U.dtype)


def _interior_projection(M: Tensor, c: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Return y ≈ argmin {½‖y‖² + cᵀy : y[:m] ≥ 0, Mᵀy = 0} [K, k] and its support [K, m].

    With y = N w (N from `_null_basis`) this is min ½‖w‖² + (Nᵀc)ᵀw s.t. −N_G w ≤ 0, solved
    by the interior point. Its accuracy is absolute, about tol·‖c‖, not relative to ‖y‖
    (small when the problem is nearly feasible): `_exact_projection` refines it.
    """
    K, k = c.shape
    N = _null_basis(M)
    eye = torch.eye(k, dtype=F64, device=c.device).expand(K, k, k)
    A, none = c.new_zeros(K, 0, k), c.new_zeros(K, 0)
    data = prepare(eye, _rmv(c, N), -N[:, :m, :], c.new_zeros(K, m), A, none, eye)
    res = polish(data, interior_point(data, _TOL, _MAX_ITER), _ACCEPT)
    y = _rmv(res.z, N.mT)
    # The interior point leaves y_G at about _TOL off the support and ‖y‖ can be much
    # smaller than ‖c‖ = 1: split at the geometric mean of the two levels.
    size = y[:, :m].abs().amax(-1, keepdim=True) if m else y.new_zeros(K, 1)
    return y, y[:, :m] > (size * _TOL) ** 0.5


def _exact_projection(M: Tensor, c: Tensor, support: Tensor) -> Tensor:
    """Project −c onto {y : Mᵀy = 0, y_i = 0 for the G-rows i outside ``support`` [K, m]}.

    On the right support this is y* exactly (to rounding relative to ‖y*‖): the cone
    constraint y_G ≥ 0 is then inactive on the support and an equality off it. Rows whose
    y turns out negative leave the support (an active-set step), up to three times.
    """
    K, k = c.shape
    m = support.shape[-1]
    keep = torch.cat([support, support.new_ones(K, k - m)], dim=-1)
    y = c.new_zeros(K, k)
    for _ in range(3):
        # y ⊥ range(M) and ⊥ e_i for the dropped rows: the left null space of [M, E_drop].
        N = _null_basis(torch.cat([M, torch.diag_embed((~keep).to(F64))], dim=-1))
        y = -_rmv(_rmv(c, N), N.mT)  # −N Nᵀ c
        negative = (y < 0) & keep
        negative[:, m:] = False
        if not bool(negative.any()):
            break
        keep = keep & ~negative
    return y


def radius_factor(dtype: torch.dtype) -> float:
    """Return the radius factor R for data of ``dtype`` (see the module docstring)."""
    return _RADIUS[dtype]


def find_certificates(G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Search a Farkas certificate for each problem; return (valid [K], λ [K, m], ν [K, p]).

    Args:
        G: [K, m, n]; h: [K, m]; A: [K, p, n]; b: [K, p] of one float dtype, which sets the
            radius a certificate must clear (`radius_factor`); the search and the check run
            in float64.

    Returns:
        ``valid`` marks the problems proved infeasible (see `FarkasCheck`); λ, ν are float64.
    """
    m = G.shape[-2]
    M, c = torch.cat([G, A], dim=-2).to(F64), torch.cat([h, b], dim=-1).to(F64)
    # The projection is positively homogeneous in c: solve it at unit scale.
    size = c.abs().amax(-1, keepdim=True) if c.shape[-1] else c.new_zeros(c.shape[0], 1)
    c = c / size.clamp(min=torch.finfo(F64).tiny)
    y_ipm, support = _interior_projection(M, c, m)
    best: FarkasCheck | None = None
    for y in (y_ipm, _exact_projection(M, c, support)):
        y = torch.where(y.isfinite().all(-1, keepdim=True), y, 0.0)
        chk = _verify(y[:, :m], y[:, m:], G, h, A, b, G.dtype)
        if best is None:
            best, y_best = chk, y
            continue
        better = chk.valid & ~best.valid | (chk.valid == best.valid) & (chk.radius > best.radius)
        best = FarkasCheck(*(torch.where(better, a, o) for a, o in zip(chk, best)))
        y_best = torch.where(better[:, None], y, y_best)
    assert best is not None
    return best.valid, y_best[:, :m].clamp(min=0.0), y_best[:, m:]


def certify(
    mask: Tensor, batch: torch.Size, G: Tensor, h: Tensor, A: Tensor, b: Tensor
) -> tuple[Tensor, FarkasCertificate]:
    """Search certificates where the BoolTensor mask [B] is set; return (infeasible [B], them).

    Args:
        mask: BoolTensor [B] over the flattened batch of shape ``batch``.
        G, h, A, b: the data of the masked problems only ([K, ...], K = mask.sum()).
    """
    valid, lam, nu = find_certificates(G, h, A, b)
    infeasible = mask.clone()
    infeasible[mask] = valid
    Gv, hv, Av, bv = (x[valid].to(F64) for x in (G, h, A, b))
    index = infeasible.reshape(batch).nonzero()
    return infeasible, FarkasCertificate(index, lam[valid], nu[valid], Gv, hv, Av, bv, G.dtype)
