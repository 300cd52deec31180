"""Batched primal-dual interior-point method for convex QPs (private kernel of `qp_solve`).

Solves, for every batch element independently,

    min_z ½ zᵀQz + qᵀz   s.t.   Gz + s = h,  s ≥ 0,   Az = b

by Mehrotra's predictor-corrector method (Mehrotra 1992; the batched QP form follows Amos &
Kolter 2017, arXiv:1703.00443). Every linear system met here, the Newton steps and the
backward pass alike, has the form

    [ Q   Gᵀ   Aᵀ ] [x]   [rz]
    [ G   −W   0  ] [y] = [rl]        W = diag(s/λ) ≥ 0
    [ A   0    0  ] [w]   [rn]

and is solved through the Schur complement on the multipliers,

    K = [G; A] Q⁻¹ [G; A]ᵀ + diag(W, 0)      (k × k, k = m + p).

With Q positive definite, [G; A] Q⁻¹ [G; A]ᵀ and the elimination of its equality block are
computed once per solve, so an iteration costs one m × m Cholesky factorization (`_kkt`).
This form stays well conditioned near the solution (W → 0 on active constraints, W → ∞ on
inactive ones only grows a diagonal), unlike the primal form Q + Gᵀ diag(λ/s) G whose
entries blow up; that is what makes float32 usable.

All tensors here are already validated, broadcast and flattened to one batch dimension B.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._kkt import (
    QPData,
    factor_active,
    factor_schur,
    kkt_solve,
    recover_x,
    reduce_rz,
    rmv,
    solve_multipliers,
)

# Fraction of the distance to the boundary of the positive orthant a step may cover: keeps the
# iterates strictly interior so W = s/λ stays finite and positive.
_STEP_FRACTION = 0.99
_STEP_FRACTION_FAR = 0.95
# Stop an element after this many iterations in a row that fail to lower its best merit by
# the factor below: rounding (mostly in float32) has ended progress. That happens near the
# attainable accuracy; far from it (residual above √tol) a merit that rises for a few steps is
# the method's normal course on a narrow feasible region, so it gets more patience there.
_MAX_STALLS = 3
_MAX_STALLS_FAR = 8
_PROGRESS = 0.9
# Iterative-refinement steps after the polishing solve (float64 needs none in practice).
_REFINE_STEPS = {torch.float32: 2, torch.float64: 0}


class IPMResult(NamedTuple):
    """Final iterate, the Schur factor there, and per-example statistics."""

    z: Tensor  # [B, n]
    s: Tensor  # [B, m]
    lam: Tensor  # [B, m]
    nu: Tensor  # [B, p]
    UK: Tensor  # [B, m, m], upper Cholesky factor of C̃ + W at the returned iterate
    iterations: Tensor  # LongTensor [B]
    kkt_residual: (
        Tensor  # [B], scaled max of primal, dual, complementarity residuals (best iterate)
    )
    converged: Tensor  # BoolTensor [B], the residual reached tol
    suspect: Tensor  # BoolTensor [B], the multipliers approach a Farkas ray (see `_qp_infeasible`)
    broke_down: Tensor  # BoolTensor [B], a factorization failed (e.g. dependent constraints)
    keep: Tensor  # BoolTensor [B, k], rows of UK in use (False: dropped inactive constraint)
    polished: Tensor  # BoolTensor [B], z and UK come from `polish`
    stale: Tensor  # BoolTensor [B], UK is not yet the factor at (s, λ): see `refresh_factor`


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Return the largest α ∈ (0, 1] with v + α dv ≥ 0 for every row of v [B, m] > 0."""
    ratio = torch.where(dv < 0, v / (-dv).clamp(min=torch.finfo(v.dtype).tiny), 1.0)
    return ratio.amin(dim=-1).clamp(max=1.0)


def _newton_multipliers(
    data: QPData,
    UK: Tensor,
    Mtu: Tensor,
    s: Tensor,
    lam: Tensor,
    rp: Tensor,
    re: Tensor,
    rc: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (ds, dλ, dν, [dλ; dν]) of the Newton step for the residuals rp, re.

    The complementarity row is λ∘ds + s∘dλ = −rc; ds is eliminated, which leaves the system of
    `kkt_solve` with W = s/λ (factored in UK) and rz = −rd (already reduced to Mtu). dz is
    recovered separately (`recover_x`) only when needed: the predictor does not need it.
    """
    dlam, dnu, yw = solve_multipliers(data, UK, Mtu, -rp + rc / lam, -re, None)
    return -(rc + s * dlam) / lam, dlam, dnu, yw


def _inf_norm(x: Tensor) -> Tensor:
    """Return the max-abs over the last dimension (0 for an empty dimension)."""
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    return x.abs().amax(dim=-1)


def _residuals(
    data: QPData, z: Tensor, s: Tensor, lam: Tensor, nu: Tensor, prods: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return rd, rp, re, Gᵀλ + Aᵀν, the scaled primal residual, the KKT residual and merit.

    The dual residual rd = Qz + q + Gᵀλ + Aᵀν is scaled by 1 + its largest term,
    max(‖q‖∞, max_l ‖Q_l‖∞|z_l|, max_i ‖[G; A]_i‖∞|[λ; ν]_i|): rounding alone leaves up to
    (n + k)·eps times that, and with large multipliers (an ill-conditioned A) it is far above
    1 + ‖q‖∞. The primal residuals are scaled by the data only, 1 + ‖h‖∞ and 1 + ‖b‖∞, so that
    a diverging z can never make an infeasible point look feasible.

    ``prods`` is [Qz, [G; A]z] [B, n + k] when the caller has it already.
    """
    q, h, b = data.q, data.h, data.b
    n, m = q.shape[-1], h.shape[-1]
    if prods is None:
        prods = rmv(z, data.QGAt)  # Q is symmetric: zᵀQ = (Qz)ᵀ
    Qz, GAz = prods[:, :n], prods[:, n:]
    mult = torch.cat([lam, nu], dim=-1)
    GAt_mult = rmv(mult, data.GA)
    rd = Qz + q + GAt_mult
    rp = GAz[:, :m] + s - h
    re = GAz[:, m:] - b
    gap = (s * lam).sum(-1)
    obj = 0.5 * (z * Qz).sum(-1) + (q * z).sum(-1)
    res_p = torch.maximum(
        _inf_norm(rp) / (1.0 + _inf_norm(h)), _inf_norm(re) / (1.0 + _inf_norm(b))
    )
    term = torch.maximum(_inf_norm(q), _inf_norm(data.coef * torch.cat([z, mult], dim=-1)))
    parts = torch.stack([_inf_norm(rd) / (1.0 + term), res_p, gap / (1.0 + obj.abs())], -1)
    # Progress merit: the sum, so that a shrinking gap counts while rounding holds the
    # residuals at a floor (z still improves then, mostly in float32).
    return rd, rp, re, GAt_mult, res_p, parts.amax(-1), parts.sum(-1)


def polish(data: QPData, res: IPMResult, accept_tol: float) -> IPMResult:
    """Replace each solved element by the exact solution on its identified active set.

    The interior-point iterate is a point of the central path: a constraint with a small
    multiplier keeps a slack of order μ/λ, which biases z and its Jacobian. Solving the
    equality-constrained QP with the active set {i : λ_i > s_i} (one factorization, as OSQP's
    polishing does) removes that bias. A result is kept only where it is primal and dual
    feasible and its KKT residual is at most accept_tol; where not, up to two more rounds
    move violated constraints into the set and constraints with negative multipliers out of
    it (a primal-dual active-set step). The kept factor is the one the backward uses.

    Args:
        data: the batch.
        res: the interior-point result.
        accept_tol: polish elements whose residual is at most its square root (and not
            suspected infeasible); accept polished points whose own residual is at most accept_tol.
    """
    n, m = data.q.shape[-1], data.h.shape[-1]
    if data.GA.shape[-2] == 0:
        return res  # unconstrained: the Newton step was already exact
    # Polish where the interior point is close enough to have found the active set; the
    # result is judged on its own residual.
    todo = ~res.suspect & (res.kkt_residual <= accept_tol**0.5)
    slack_tol = (accept_tol * (1.0 + _inf_norm(data.h)))[:, None]
    mult_tol = (accept_tol * (1.0 + _inf_norm(res.lam)))[:, None]
    active = res.lam > res.s
    for _ in range(3):
        UK, keep, ok = factor_active(data, active)
        z, lam, nu = kkt_solve(data, UK, -data.q, data.h, data.b, keep)
        for _ in range(_REFINE_STEPS[z.dtype]):
            # Iterative refinement: the Schur-complement solve loses digits to cond(K), which
            # matters in float32; re-solving for the residual with the same factor recovers them.
            rd, rp, re = _residuals(data, z, torch.zeros_like(lam), lam, nu)[:3]
            dz, dlam, dnu = kkt_solve(data, UK, -rd, -rp, -re, keep)
            z, lam, nu = z + dz, lam + dlam, nu + dnu
        prods = rmv(z, data.QGAt)
        s = data.h - prods[:, n : n + m]
        violated, negative = s < -slack_tol, lam < -mult_tol
        s, lam = s.clamp(min=0.0), lam.clamp(min=0.0)
        kkt = _residuals(data, z, s, lam, nu, prods)[5]
        feasible = ~(violated | negative).any(-1)
        # In float32 the polished residual can exceed the interior point's (rounding in the
        # Schur solve) while z is still several times more accurate: accept up to accept_tol.
        accept = todo & ok & feasible & (kkt <= accept_tol)
        if bool(accept.any()):
            a1, a2 = accept[:, None], accept[:, None, None]
            res = res._replace(
                z=torch.where(a1, z, res.z),
                s=torch.where(a1, s, res.s),
                lam=torch.where(a1, lam, res.lam),
                nu=torch.where(a1, nu, res.nu),
                UK=UK if bool(accept.all()) else torch.where(a2, UK, res.UK),
                keep=torch.where(a1, keep, res.keep),
                kkt_residual=torch.where(accept, kkt, res.kkt_residual),
                polished=res.polished | accept,
                stale=res.stale & ~accept,
            )
        todo = todo & ~accept & ok
        if not bool(todo.any()):
            break
        active = (active | violated) & ~negative
    return res


def refresh_factor(data: QPData, res: IPMResult) -> IPMResult:
    """Factor C̃ + diag(s/λ) where ``res.stale`` is set, so that UK matches every iterate."""
    if not bool(res.stale.any()):
        return res
    UK, _ = factor_schur(data, res.s / res.lam)
    return res._replace(
        UK=torch.where(res.stale[:, None, None], UK, res.UK), stale=torch.zeros_like(res.stale)
    )


def merge(mask: Tensor, new: IPMResult, old: IPMResult) -> IPMResult:
    """Return ``new`` where the BoolTensor mask [B] is set, ``old`` elsewhere."""
    return IPMResult(
        *(torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b_) for a, b_ in zip(new, old))
    )


def interior_point(
    data: QPData,
    tol: float,
    max_iter: int,
    start: IPMResult | None = None,
    only: Tensor | None = None,
) -> IPMResult:
    """Run Mehrotra's predictor-corrector method on a batch of convex QPs.

    Args:
        data: the batch from `prepare`; [G; A] must have linearly independent active rows.
        tol: stop an element once its scaled KKT residual is at most ``tol``.
        max_iter: iteration cap.
        start: resume from this result's iterate (strictly interior where ``only`` is set).
        only: BoolTensor [B]: iterate on these elements only (the rest is returned as is).

    Returns:
        For every element its best iterate (lowest residual), the Schur factor there, and
        statistics. An element stops moving once it converges, looks infeasible (its
        multipliers approach a Farkas ray, which `_qp_infeasible` then verifies), or rounding
        breaks its factorization; the others go on.
    """
    q, h, b = data.q, data.h, data.b
    B, n, m = q.shape[0], q.shape[-1], h.shape[-1]

    if start is None:
        # Start (as CVXOPT does): solve the KKT system with W = I, i.e. min ½zᵀQz + qᵀz + ½‖s‖²
        # s.t. Gz + s = h, Az = b, then shift the slacks and multipliers into the interior.
        UK, ok = factor_schur(data, torch.ones_like(h))
        z, _, nu = kkt_solve(data, UK, -q, h, b)
        r = rmv(z, data.QGAt)[:, n : n + m] - h
        s, lam = -r, r.clone()
        if m > 0:
            s = s + (1.0 - s.amin(-1, keepdim=True)).clamp(min=0.0)
            lam = lam + (1.0 - lam.amin(-1, keepdim=True)).clamp(min=0.0)
        iterations = torch.zeros(B, dtype=torch.long, device=q.device)
        # (s, λ) at which UK was factored: NaN marks a factor at no iterate (here W = I).
        uk_at = (torch.full_like(s, float("nan")), lam)
    else:
        z, s, lam, nu, UK = start.z, start.s, start.lam, start.nu, start.UK
        ok = torch.ones(B, dtype=torch.bool, device=q.device)
        iterations = start.iterations
        uk_at = (torch.where(start.stale[:, None], float("nan"), s), lam)
    if only is not None:
        ok = ok & only

    broke_down = ~ok
    active = ok.clone()
    converged = torch.zeros_like(active)
    suspect = torch.zeros_like(active)
    best = (z, s, lam, nu)
    best_kkt = q.new_full((B,), float("inf"))
    best_merit = q.new_full((B,), float("inf"))
    stalls = torch.zeros_like(iterations)
    buf: Tensor | None = None
    for it in range(max_iter + 1):
        rd, rp, re, GAt_mult, res_p, kkt, merit = _residuals(data, z, s, lam, nu)
        if bool((active & ~(kkt <= tol)).any()):
            # The previous factor is dead once the step is taken: factor in its buffer.
            UK, ok = factor_schur(data, s / lam, out=buf)
            buf = UK if buf is None else buf
            uk_at = (s, lam)
        else:
            # Every element still iterating converges here: no Newton step follows, so skip
            # the factorization. The best iterates' factors are computed afterwards
            # (`refresh_factor`), and only where polishing does not replace them.
            ok = torch.ones_like(active)
        # Rounding may end progress (a broken factorization, a stall): keep the best usable
        # iterate; its factor is the one the backward pass needs.
        usable = active & ok & kkt.isfinite()
        broke_down = broke_down | (active & ~usable)
        better = usable & (merit < best_merit)
        stalls = torch.where(usable & (merit < _PROGRESS * best_merit), 0, stalls + 1)
        z_b, s_b, lam_b, nu_b = (
            torch.where(better[:, None], new, old) for new, old in zip((z, s, lam, nu), best)
        )
        best = (z_b, s_b, lam_b, nu_b)
        best_kkt = torch.where(better, kkt, best_kkt)
        best_merit = torch.where(better, merit, best_merit)
        converged = converged | (usable & (kkt <= tol))
        if m > 0:
            # Diverging multipliers with Gᵀλ + Aᵀν ≈ 0 and hᵀλ + bᵀν < 0 approach a Farkas ray:
            # stop here; the problem is declared infeasible only once `_qp_infeasible` has
            # found and verified a certificate.
            t = -((h * lam).sum(-1) + (b * nu).sum(-1))
            cert = _inf_norm(GAt_mult)
            suspect = suspect | (usable & (t > 0) & (cert <= tol * t) & (res_p > tol))
        patience = torch.where(best_kkt <= tol**0.5, _MAX_STALLS, _MAX_STALLS_FAR)
        active = usable & ~converged & ~suspect & (stalls < patience)
        if it == max_iter or not bool(active.any()):
            break
        iterations = iterations + active.long()

        if m == 0:
            # Equality-constrained QP: one Newton step is exact.
            dz, _, dnu = kkt_solve(data, UK, -rd, rp, -re)
            z = torch.where(active[:, None], z + dz, z)
            nu = torch.where(active[:, None], nu + dnu, nu)
            continue

        mu = (s * lam).sum(-1) / m

        # Predictor (affine scaling) step.
        # −rd is the same for both steps: reduce it once.
        u, Mtu = reduce_rz(data, -rd)
        ds_a, dlam_a, _, _ = _newton_multipliers(data, UK, Mtu, s, lam, rp, re, s * lam)
        alpha_a = torch.minimum(_max_step(s, ds_a), _max_step(lam, dlam_a))[:, None]
        mu_a = ((s + alpha_a * ds_a) * (lam + alpha_a * dlam_a)).sum(-1) / m
        sigma = (mu_a / mu).clamp(0.0, 1.0).nan_to_num(1.0) ** 3
        # Corrector: centering plus the second-order term ds_a∘dλ_a.
        rc = s * lam + ds_a * dlam_a - (sigma * mu)[:, None]
        ds, dlam, dnu, yw = _newton_multipliers(data, UK, Mtu, s, lam, rp, re, rc)
        dz = recover_x(data, u, yw)
        alpha = torch.minimum(_max_step(s, ds), _max_step(lam, dlam))
        # Cautious far from the solution, where a step to 0.99 of the boundary can jam a
        # slack and its multiplier both near zero on the wrong side of the active set (seen:
        # a well-conditioned QP stalling at residual 1e-2); up to 0.99 as μ -> 0.
        eta = (1.0 - mu).clamp(_STEP_FRACTION_FAR, _STEP_FRACTION)
        alpha = (eta * alpha).clamp(max=1.0)
        finite = torch.stack(
            [t.isfinite().all(-1) for t in (dz, ds, dlam, dnu)] + [alpha.isfinite()], -1
        ).all(-1)
        broke_down = broke_down | (active & ~finite)
        active = active & finite
        alpha = torch.where(active, alpha, 0.0).nan_to_num(0.0)[:, None]
        z = z + alpha * dz.nan_to_num(0.0)
        s = s + alpha * ds.nan_to_num(0.0)
        lam = lam + alpha * dlam.nan_to_num(0.0)
        nu = nu + alpha * dnu.nan_to_num(0.0)

    # UK may have been factored at another iterate than the best one (see `refresh_factor`).
    z, s, lam, nu = best
    stale = (uk_at[0] != s).any(-1) | (uk_at[1] != lam).any(-1)
    broke_down = broke_down & ~converged
    keep = torch.ones(B, data.GA.shape[-2], dtype=torch.bool, device=q.device)
    polished = torch.zeros_like(converged)
    return IPMResult(
        z,
        s,
        lam,
        nu,
        UK,
        iterations,
        best_kkt,
        converged,
        suspect,
        broke_down,
        keep,
        polished,
        stale,
    )
