r"""The batched active-set solver of SparseMAP (Niculae et al., arXiv:1802.04223, §3.2).

The problem, over the convex hull of the structures' statistics φ(y) = (φ_U(y), φ_P(y)):

    max_{α ∈ Δ}  Σ_s α_s c_s − (τ/2) αᵀ M α,     c_s = ⟨θ, φ(y_s)⟩,  M_st = ⟨φ_U(y_s), φ_U(y_t)⟩,

with μ = Σ_s α_s φ(y_s). Only the structures in the active set S carry weight, so every linear
algebra step is on a |S| × |S| system; new structures come from the structure's ``argmax``
oracle on the linearized potentials η = θ − τ (μ_U, 0). One iteration, per batch element:

1. On S, the step p maximizing the quadratic model in the tangent space {1ᵀp = 0, p = 0 off S}:
   by a Cholesky solve where τ M_S is positive definite, else from an eigendecomposition of
   the reduced Hessian τ P M P. If that is singular (the unregularized pairwise part makes the
   objective linear along some direction), move along that direction instead until a weight
   hits zero: the final S is affinely independent in φ_U, so the KKT matrix of the backward is
   nonsingular.
2. A ratio test keeps α ≥ 0; a weight that reaches zero leaves S.
3. At a stationary point of S (or right after a full Newton step to it), call the oracle:
   y* = argmax_y ⟨η, φ(y)⟩. The Frank-Wolfe gap ⟨η, φ(y*)⟩ − ⟨η, μ⟩ bounds f(μ*) − f(μ); if it
   is at most ``tol · (1 + max_s |c_s| + τ max_s ‖φ_U(y_s)‖²)`` the element is done, otherwise
   y* joins S.

All elements iterate together; finished elements are frozen by masks. The small systems and
the gap are computed in float64 whatever the input dtype; the oracle runs in the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from structift.structures.base import AbstractStructure, Params

__all__ = ["ActiveSetState", "active_set_solve", "statistics_rows"]

_NULL_RTOL = 1e-10  # an eigenvalue of the reduced Hessian below this (relative) is zero
_STEP_TOL = 1e-12  # a step of the weights below this (sup norm) is no step


class ActiveSetState(NamedTuple):
    """The solver's result (batch flattened to ``Bf``; K slots, ``values`` slot first).

    Attributes:
        values: ``[K, *batch, *event]`` the structures of the slots (inactive slots hold a copy
            of a valid structure).
        active: ``[Bf, K]`` bool, the slots in S.
        alpha: ``[Bf, K]`` float64 weights (0 off S).
        phi: ``[Bf, K, D]`` the statistics of every part of the slots, flattened and
            concatenated, in θ's dtype (filled in by the caller; None from the solver).
        gram: ``[Bf, K, K]`` float64 ⟨φ_U(y_s), φ_U(y_t)⟩.
        scores: ``[Bf, K]`` float64 ⟨θ, φ(y_s)⟩.
        gap: ``[Bf]`` float64, the last Frank-Wolfe gap.
        iterations: ``[Bf]`` long, iterations until done.
        converged: ``[Bf]`` bool.
    """

    values: Tensor
    active: Tensor
    alpha: Tensor
    phi: Tensor | None
    gram: Tensor
    scores: Tensor
    gap: Tensor
    iterations: Tensor
    converged: Tensor


def _unary(structure: AbstractStructure, values: Tensor) -> Tensor:
    """φ_U of ``values`` ``[K, *batch, *event]`` in float64, ``[Bf, K, D_U]``."""
    K, Bf = values.shape[0], structure.batch_shape.numel()
    return structure.unary_statistics(values, torch.float64).reshape(K, Bf, -1).transpose(0, 1)


def statistics_rows(structure: AbstractStructure, values: Tensor, dtype: torch.dtype) -> Tensor:
    """φ of ``values`` ``[K, *batch, *event]``, every part flattened: ``[Bf, K, D]``."""
    K, Bf = values.shape[0], structure.batch_shape.numel()
    parts = structure.statistics(values, dtype)
    return torch.cat([p.reshape(K, Bf, -1) for p in parts], -1).transpose(0, 1)


def _scores(structure: AbstractStructure, theta64: Params, values: Tensor, Bf: int) -> Tensor:
    """⟨θ, φ(y)⟩ in float64 ``[Bf, K]``."""
    return structure.score(theta64, values).reshape(values.shape[0], Bf).T


def _newton_cholesky(alpha: Tensor, active: Tensor, gram: Tensor, scores: Tensor, tau: float):
    """The Newton step to the stationary point of S when τ M_S is positive definite.

    Solves τ M a = c and τ M b = 1 on S by one Cholesky factorization; then ν = (1ᵀa − 1)/1ᵀb
    and α̂ = a − ν b satisfy τ M α̂ + ν 1 = c, 1ᵀα̂ = 1. Returns the step α̂ − α and a mask of the
    elements where the factorization is safe (pivots above a relative threshold); M_S positive
    definite also means S is affinely independent in φ_U.
    """
    e = active.to(alpha.dtype)
    K = alpha.shape[-1]
    eye = torch.eye(K, dtype=alpha.dtype, device=alpha.device)
    A = tau * gram * e[:, :, None] * e[:, None, :] + torch.diag_embed(1 - e)
    L, info = torch.linalg.cholesky_ex(A)
    pivots = torch.diagonal(L, dim1=-2, dim2=-1).square()
    scale = torch.diagonal(A, dim1=-2, dim2=-1).amax(-1)
    ok = (info == 0) & (torch.where(active, pivots, scale[:, None]).amin(-1) > 1e-8 * scale)
    L = torch.where(ok[:, None, None], L, eye)
    ab = torch.cholesky_solve(torch.stack([scores * e, e], -1), L)  # shape: (Bf, K, 2)
    a, b = ab[..., 0] * e, ab[..., 1] * e
    nu = (a.sum(-1, keepdim=True) - 1) / b.sum(-1, keepdim=True)
    return (a - nu * b - alpha) * e, ok


def _step_eigh(alpha: Tensor, active: Tensor, gram: Tensor, scores: Tensor, tau: float):
    """The step from an eigendecomposition of the reduced Hessian (any S, singular included)."""
    e = active.to(alpha.dtype)  # shape: (Bf, K)
    K = alpha.shape[-1]
    H = tau * gram * e[:, :, None] * e[:, None, :]
    g = (scores - (H @ alpha[..., None])[..., 0]) * e  # gradient in α on S
    n = e.sum(-1).clamp_min(1)[:, None, None]
    P = torch.diag_embed(e) - e[:, :, None] * e[:, None, :] / n  # tangent projector
    Hr = P @ H @ P
    big = 2 * (torch.diagonal(H, dim1=-2, dim2=-1).sum(-1) + 1)[:, None]  # > every λ(Hr)
    eye = torch.eye(K, dtype=alpha.dtype, device=alpha.device)
    lam, V = torch.linalg.eigh(Hr + big[..., None] * (eye - P))
    tangent = lam < 0.75 * big
    null = tangent & (lam <= _NULL_RTOL * big)
    proj = (V.mT @ g[..., None])[..., 0]  # shape: (Bf, K)
    newton = torch.where(tangent & ~null, proj / torch.where(null | ~tangent, 1.0, lam), 0.0)
    p_newton = (V @ newton[..., None])[..., 0]
    g_null = (V @ torch.where(null, proj, 0.0)[..., None])[..., 0]
    g_scale = 1 + scores.abs().amax(-1, keepdim=True)
    ascent = g_null.abs().amax(-1, keepdim=True) > _NULL_RTOL * g_scale
    moving = p_newton.abs().amax(-1, keepdim=True) > _STEP_TOL
    first_null = torch.where(null, torch.arange(K, device=alpha.device), K).amin(-1)
    has_null = (first_null < K)[:, None]
    v0 = V.gather(-1, first_null.clamp_max(K - 1)[:, None, None].expand(-1, K, 1))[..., 0]
    d = torch.where(ascent, g_null, torch.where(moving, p_newton, v0))
    unbounded = ascent | (~moving & has_null)
    stationary = ~(ascent | moving | has_null)
    bound = torch.where(unbounded, torch.inf, 1.0)
    return d * e, bound[:, 0], stationary[:, 0], (moving & ~ascent)[:, 0]


def _step(alpha: Tensor, active: Tensor, gram: Tensor, scores: Tensor, tau: float):
    """The direction ``d`` ``[Bf, K]``, its step bound (1 or inf), stationarity, Newton ``[Bf]``.

    A full Newton step (``bound`` 1, not blocked) lands on the stationary point of S. The
    Cholesky path serves every element where τ M_S is safely positive definite; the others
    (a singular or ill-conditioned M_S) take the eigendecomposition path.
    """
    p, ok = _newton_cholesky(alpha, active, gram, scores, tau)
    moving = p.abs().amax(-1) > _STEP_TOL
    bound = torch.ones_like(alpha[:, 0])
    if bool(ok.all()):
        return p, bound, ~moving, moving
    d2, bound2, stationary2, newton2 = _step_eigh(alpha, active, gram, scores, tau)
    return (
        torch.where(ok[:, None], p, d2),
        torch.where(ok, bound, bound2),
        torch.where(ok, ~moving, stationary2),
        torch.where(ok, moving, newton2),
    )


def _ratio_step(alpha: Tensor, active: Tensor, d: Tensor, bound: Tensor):
    """``α + β d`` with the largest β <= bound keeping α >= 0; a blocking slot leaves S."""
    neg = active & (d < -1e-13 * d.abs().amax(-1, keepdim=True))  # rounding is no descent
    ratio = torch.where(neg, alpha / torch.where(neg, -d, 1.0), torch.inf)
    beta, block = ratio.min(-1)
    beta = torch.minimum(beta, bound)
    beta = torch.where(torch.isfinite(beta), beta, 0.0)  # d ≈ 0 claimed unbounded: no move
    alpha = (alpha + beta[:, None] * d).clamp_min(0)
    blocked = beta < bound
    hit = torch.nn.functional.one_hot(block, alpha.shape[-1]).bool() & blocked[:, None]
    active = active & ~hit
    alpha = torch.where(active, alpha, 0.0)
    return alpha / alpha.sum(-1, keepdim=True), active, blocked


def _grow(state: list[Tensor], values: Tensor) -> tuple[list[Tensor], Tensor]:
    """Pack the active slots first and leave room: ``[alpha, active, gram, phi_u, scores]``.

    Per element the active slots move to the front (a stable sort), the capacity becomes the
    largest |S| plus half of it (at least 4), so the small systems stay about |S| in size and
    the copies cost O(K D) per growth. Free slots copy the first slot (a valid structure).
    """
    alpha, active, gram, phi_u, scores = state
    Bf = alpha.shape[0]
    order = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices
    n = int(active.sum(-1).max())
    extra = max(4, n // 2)
    order = torch.cat([order[:, :n], order[:, :1].expand(Bf, extra)], 1)  # shape: (Bf, K')
    K2 = order.shape[1]
    live = torch.arange(K2, device=order.device) < n
    active = active.gather(1, order) & live
    alpha = torch.where(active, alpha.gather(1, order), 0.0)
    D = phi_u.shape[-1]
    phi_u = phi_u.gather(1, order[..., None].expand(Bf, K2, D))
    gram = gram.gather(1, order[..., None].expand(Bf, K2, gram.shape[-1]))
    gram = gram.gather(2, order[:, None, :].expand(Bf, K2, K2))
    flat = values.reshape(values.shape[0], Bf, -1)
    flat = flat.gather(0, order.T[..., None].expand(K2, Bf, flat.shape[-1]))
    values = flat.reshape(K2, *values.shape[1:])
    return [alpha, active, gram, phi_u, scores.gather(1, order)], values


def active_set_solve(
    structure: AbstractStructure,
    theta: Params,
    tau: float,
    max_iter: int,
    tol: float,
) -> ActiveSetState:
    """Run the active-set method of the module docstring (no graph; see `ActiveSetState`)."""
    batch = structure.batch_shape
    Bf = batch.numel()
    theta = tuple(t.detach() for t in theta)
    theta64 = tuple(t.double() for t in theta)
    y0, _ = structure.argmax(theta)
    values = y0[None].clone()  # shape: (K, *batch, *event)
    phi_u = _unary(structure, values)  # shape: (Bf, K, D_U)
    gram = phi_u @ phi_u.mT  # kept up to date slot by slot
    scores = _scores(structure, theta64, values, Bf)
    alpha = torch.ones(Bf, 1, dtype=torch.float64, device=phi_u.device)
    active = torch.ones(Bf, 1, dtype=torch.bool, device=phi_u.device)
    done = torch.zeros(Bf, dtype=torch.bool, device=phi_u.device)
    iterations = torch.zeros(Bf, dtype=torch.long, device=phi_u.device)
    gap = torch.full((Bf,), torch.inf, dtype=torch.float64, device=phi_u.device)
    rows = torch.arange(Bf, device=phi_u.device)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        iterations += (~done).long()
        d, bound, stationary, newton = _step(alpha, active, gram, scores, tau)
        new_alpha, new_active, blocked = _ratio_step(alpha, active, d, bound)
        moving = ~done & ~stationary
        alpha = torch.where(moving[:, None], new_alpha, alpha)
        active = torch.where(moving[:, None], new_active, active)
        # A full Newton step ends on the stationary point of S: call the oracle at once.
        check = ~done & (stationary | (newton & ~blocked))
        if not bool(check.any()):
            continue
        # The oracle on η = θ − τ (μ_U, 0): the Frank-Wolfe vertex and gap.
        mu_u = (alpha[:, None, :] @ phi_u)[:, 0]  # shape: (Bf, D_U)
        first = theta[0] - tau * mu_u.reshape(theta[0].shape).to(theta[0].dtype)
        y_star, _ = structure.argmax((first, *theta[1:]))
        phi_star = _unary(structure, y_star[None])[:, 0]
        score_star = _scores(structure, theta64, y_star[None], Bf)[:, 0]
        value_mu = (alpha * scores).sum(-1) - tau * (mu_u * mu_u).sum(-1)
        new_gap = score_star - tau * (phi_star * mu_u).sum(-1) - value_mu
        # The gap's rounding is relative to the scores and to τ‖φ_U‖², not to f (which may
        # cancel to ~0): the tolerance is relative to that scale.
        scale = 1 + scores.abs().amax(-1) + tau * torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1)
        row = (phi_u @ phi_star[:, :, None])[..., 0]  # ⟨φ_U(y_s), φ_U(y*)⟩, shape: (Bf, K)
        dist2 = torch.diagonal(gram, dim1=-2, dim2=-1) + (phi_star * phi_star).sum(-1, True)
        dist2 = dist2 - 2 * row  # ‖φ_U(y_s) − φ_U(y*)‖², exact (integers)
        duplicate = (active & (dist2 == 0)).any(-1)
        gap = torch.where(check, new_gap, gap)
        finished = check & ((new_gap <= tol * scale) | duplicate)
        done = done | finished
        insert = check & ~finished
        if not bool(insert.any()):
            continue
        free = ~active
        if not bool(free[insert].any(-1).all()):
            (alpha, active, gram, phi_u, scores), values = _grow(
                [alpha, active, gram, phi_u, scores], values
            )
            free = ~active
        slot = free.long().argmax(-1)  # first free slot
        idx = rows[insert]
        flat = values.reshape(values.shape[0], Bf, -1)
        flat[slot[idx], idx] = y_star.reshape(Bf, -1)[idx]
        values = flat.reshape(values.shape)
        phi_u[idx, slot[idx]] = phi_star[idx]
        row = (phi_u[idx] @ phi_star[idx][:, :, None])[..., 0]  # shape: (n, K)
        gram[idx, slot[idx]] = row
        gram[idx, :, slot[idx]] = row
        scores[idx, slot[idx]] = score_star[idx]
        active[idx, slot[idx]] = True
    return ActiveSetState(values, active, alpha, None, gram, scores, gap, iterations, done)
