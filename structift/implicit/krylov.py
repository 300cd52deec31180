"""Batched Krylov solvers: CG (SPD), MINRES (symmetric indefinite), GMRES (general).

All act on ``[B, N]`` vectors, keep per-system scalars of shape ``[B]`` and stop when every
system meets ``‖b − A x‖ <= max(rtol ‖b‖, atol)`` for the *true* residual: when the
recursively updated residual of a cycle says converged but the true one does not (their gap
grows like eps·κ(A): float32 with κ >= 100 and the default rtol), the method restarts from
the true residual (iterative refinement) while that makes progress. The true residual is
reported.

Singularity (the rule of `structift.implicit.condition`): a pivot (MINRES, GMRES) or
curvature (CG) at most ``rcond`` times the running estimate of ‖A‖, or an iterate (or, in
MINRES, a search direction) that grew past what ``σ_min(A) > rcond ‖A‖`` allows, proves
``σ_min(A) <= rcond · ‖A‖`` and raises `structift.implicit.SingularSystemError`.

What a Krylov method can and cannot see: it explores only the Krylov space of the right-hand
side b. When b has a component in the null space of a singular A (an inconsistent system,
the generic case) the residual cannot fall below that component, and the method meets a
rounding-level pivot or a growing iterate: SingularSystemError (measured on 2000 draws of
the test suite's 5 × 5 construction in float32 and float64: every draw for CG and MINRES,
all but about 1 in 2000 for GMRES). Should rounding keep both just inside the thresholds,
the residual stagnates and the solve raises ConvergenceError: both say the system has no
solution. When b lies exactly in the range of A the system is
consistent, the null space is never explored and the solve may succeed (CG and MINRES from
x = 0 return the minimum-norm solution): only `structift.implicit.Dense` certifies
invertibility.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

from ._deprecation import renamed_kwargs
from .condition import default_rcond
from .errors import SingularSystemError
from .operators import AbstractLinearOperator
from .solvers import (
    AbstractLinearSolver,
    LinearSolution,
    OnFailure,
    _check_on_failure,
    _check_rhs,
    default_rtol,
    empty_solution,
    finalize,
)

__all__ = ["CG", "GMRES", "MINRES"]

_UNDEFINED = "∂F/∂z is not invertible, so the implicit derivative is undefined"


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _raise_singular(name: str, what: str, value: Tensor, limit: Tensor, bad: Tensor) -> None:
    """Raise SingularSystemError for the first system flagged in ``bad`` [B], if any."""
    if bad.any():
        i = int(bad.nonzero()[0])
        raise SingularSystemError(
            f"{name}: the operator is singular to working precision ({what} = "
            f"{float(value[i]):.3g} against {float(limit[i]):.3g} in system {i}, "
            f"{int(bad.sum())} of {bad.numel()} systems); {_UNDEFINED}",
            bad,
        )


def _check_growth(name: str, x: Tensor, bnorm: Tensor, anorm: Tensor, rcond: float) -> None:
    """Raise if ``rcond ‖A‖ ‖x‖ > ‖b‖``, which proves ``σ_min(A) < rcond ‖A‖``.

    From x₀ = 0 the iterates of CG (preconditioned or not), MINRES and a GMRES cycle satisfy
    ``‖x_k‖ <= ‖b‖ / σ_min(A)``: x_k solves a projection of ``A x = b`` whose smallest singular
    value is at least σ_min(A). This catches the blow-up after a rounding-level pivot that
    rounding kept just above the pivot threshold.
    """
    xnorm = _norm(x)
    limit = bnorm / (rcond * anorm)
    _raise_singular(name, "iterate norm ‖x‖ > ‖b‖ / (rcond · ‖A‖)", xnorm, limit, xnorm > limit)


class _Krylov(AbstractLinearSolver):
    """Shared configuration and refinement loop of the Krylov solvers (abstract)."""

    name = "Krylov"
    hint = ""

    @renamed_kwargs(max_iters="max_iter")
    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iter: int = 1000,
        on_failure: OnFailure = "raise",
        *,
        rcond: float | None = None,
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        _check_on_failure(on_failure)
        if rcond is not None and not 0 <= rcond < 1:
            raise ValueError(f"rcond must be in [0, 1) or None, got {rcond!r}")
        self.rtol, self.atol, self.max_iter, self.rcond = rtol, atol, max_iter, rcond
        self.on_failure: OnFailure = on_failure

    def init(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        """Keep the operator (Krylov methods need only matrix-vector products)."""
        return operator

    def transpose(self, state: AbstractLinearOperator) -> AbstractLinearOperator:
        """Return the transposed operator."""
        return state.transpose()

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Solve from x = 0, restarting from the true residual until it meets the tolerance."""
        op = state
        _check_rhs(op, rhs)
        if rhs.shape[0] == 0:
            return empty_solution(rhs)
        rtol = default_rtol(rhs.dtype) if self.rtol is None else self.rtol
        tol = torch.clamp(rtol * _norm(rhs), min=self.atol)
        rcond = default_rcond(rhs.dtype) if self.rcond is None else self.rcond
        x, r, used = torch.zeros_like(rhs), rhs, 0
        best = torch.full_like(tol, float("inf"))
        anorm = torch.zeros_like(tol)  # a running lower bound on ‖A‖₂
        while used < self.max_iter:
            rnorm = _norm(r)
            if (rnorm <= tol).all():
                break
            if not (rnorm < 0.999 * best).any():
                break  # a whole cycle without progress: stagnated (reported by finalize)
            best = torch.minimum(best, rnorm)
            dx, steps, anorm = self._cycle(op, r, tol, self.max_iter - used, anorm, rcond)
            _check_growth(self.name, dx, rnorm, anorm, rcond)
            x, used = x + dx, used + steps
            r = rhs - op.mv(x)
        return finalize(self.name, op, rhs, x, used, rtol, self.atol, self.on_failure, self.hint)

    @abc.abstractmethod
    def _cycle(
        self,
        op: AbstractLinearOperator,
        b: Tensor,
        tol: Tensor,
        budget: int,
        anorm: Tensor,
        rcond: float,
    ) -> tuple[Tensor, int, Tensor]:
        """Run the method on ``A x = b`` from x = 0 for at most ``budget`` products.

        Returns ``(x, products used, updated ‖A‖ estimate)``; raises on singularity.
        """


class CG(_Krylov):
    """Conjugate gradients for symmetric positive definite systems.

    Solves ``A x = b`` with A SPD (Hestenes & Stiefel, 1952), optionally preconditioned by an
    SPD ``preconditioner`` approximating ``A⁻¹``. Every curvature ``pᵀAp / ‖p‖²`` is at least
    λ_min(A), so one at rounding level, ``|pᵀAp| <= rcond · ‖A‖ · ‖p‖²`` (‖A‖ estimated by
    the largest ``‖Ap‖ / ‖p‖`` seen), proves A singular to working precision and raises
    `SingularSystemError`; a curvature below ``−rcond · ‖A‖ · ‖p‖²`` proves A
    indefinite and raises ``ValueError`` (use `MINRES`).

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iter: iteration budget.
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
        preconditioner: optional ``[B, N] -> [B, N]`` map applying ``M⁻¹``.
        rcond: singularity threshold (see above); default ``10 eps``
            (`structift.implicit.condition.default_rcond`).
    """

    name = "CG"
    hint = (
        "Try more max_iter, a looser rtol, a preconditioner, or another solver: MINRES if the "
        "system is symmetric indefinite, GMRES if non-symmetric, Dense if it is small."
    )

    @renamed_kwargs(max_iters="max_iter")
    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iter: int = 1000,
        on_failure: OnFailure = "raise",
        preconditioner: Callable[[Tensor], Tensor] | None = None,
        *,
        rcond: float | None = None,
    ) -> None:
        super().__init__(rtol, atol, max_iter, on_failure, rcond=rcond)
        self.preconditioner = preconditioner

    def _cycle(
        self,
        op: AbstractLinearOperator,
        b: Tensor,
        tol: Tensor,
        budget: int,
        anorm: Tensor,
        rcond: float,
    ) -> tuple[Tensor, int, Tensor]:
        M = self.preconditioner or (lambda v: v)
        bnorm = _norm(b)
        x, r = torch.zeros_like(b), b.clone()
        z = M(r)
        p, rz = z, _dot(r, z)
        k = 0
        while k < budget:
            active = _norm(r) > tol
            if not active.any():
                break
            Ap = op.mv(p)
            k += 1
            pAp, pnorm = _dot(p, Ap), _norm(p)
            anorm = torch.maximum(anorm, _safe_div(_norm(Ap), pnorm))
            flat = rcond * anorm * pnorm**2
            what = "curvature |pᵀAp| <= rcond · ‖A‖ · ‖p‖²"
            _raise_singular(self.name, what, pAp, flat, active & ~(pAp.abs() > flat))
            if (active & (pAp < -flat)).any():
                i = int((active & (pAp < -flat)).nonzero()[0])
                raise ValueError(
                    f"CG: the operator is not positive definite (pᵀAp = {float(pAp[i]):.3g} "
                    f"< 0 in system {i}); use MINRES for symmetric indefinite systems (e.g. "
                    "KKT) or GMRES for non-symmetric ones"
                )
            alpha = torch.where(active, _safe_div(rz, pAp), 0.0).unsqueeze(-1)
            x = x + alpha * p
            _check_growth(self.name, x, bnorm, anorm, rcond)
            r = r - alpha * Ap
            z = M(r)
            rz_new = _dot(r, z)
            p = z + _safe_div(rz_new, rz).unsqueeze(-1) * p
            rz = rz_new
        return x, k, anorm


class MINRES(_Krylov):
    """MINRES for symmetric (possibly indefinite) systems such as KKT matrices.

    Minimizes ‖b − A x‖ over the Krylov space with the Lanczos process and Givens rotations
    (Paige & Saunders, 1975). A is assumed symmetric (not checked). Every pivot γ of the
    rotated tridiagonal matrix is at least σ_min(A), so one at most ``rcond · ‖T‖`` (the
    Lanczos estimate of ‖A‖) proves A singular to working precision and raises
    `SingularSystemError`.

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iter: iteration budget.
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
        rcond: singularity threshold (see above); default ``10 eps``
            (`structift.implicit.condition.default_rcond`).
    """

    name = "MINRES"
    hint = (
        "Try more max_iter or a looser rtol; if the system is not symmetric use GMRES, "
        "if it is small use Dense."
    )

    def _cycle(
        self,
        op: AbstractLinearOperator,
        b: Tensor,
        tol: Tensor,
        budget: int,
        anorm: Tensor,
        rcond: float,
    ) -> tuple[Tensor, int, Tensor]:
        tiny = torch.finfo(b.dtype).tiny
        zeros = torch.zeros_like(b[:, 0])
        x = torch.zeros_like(b)
        r1, r2, y = b, b, b
        beta1 = _norm(b)
        beta, oldb = beta1, zeros
        dbar, epsln, phibar = zeros, zeros, beta1
        cs, sn = -torch.ones_like(zeros), zeros
        w, w2 = torch.zeros_like(b), torch.zeros_like(b)
        done = beta1 <= tol
        k = 0
        while k < budget and not done.all():
            k += 1
            v = _safe_div(torch.ones_like(beta), beta).unsqueeze(-1) * y
            y = op.mv(v)
            if k >= 2:
                y = y - _safe_div(beta, oldb).unsqueeze(-1) * r1
            alfa = _dot(v, y)
            y = y - _safe_div(alfa, beta).unsqueeze(-1) * r2
            r1, r2 = r2, y
            oldb, beta = beta, _norm(y)
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta)
            anorm = torch.maximum(anorm, torch.hypot(torch.hypot(alfa, oldb), beta))
            limit = rcond * anorm.clamp_min(tiny)
            what = "pivot γ <= rcond · ‖A‖"
            _raise_singular(self.name, what, gamma, limit, ~done & (gamma <= limit))
            gamma = gamma.clamp_min(tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            w = (v - oldeps.unsqueeze(-1) * w1 - delta.unsqueeze(-1) * w2) / gamma.unsqueeze(-1)
            x = x + torch.where(done, 0.0, phi).unsqueeze(-1) * w
            # The directions are the columns of W = V R⁻¹, so ‖w‖ <= 1/σ_min(A): w grows first.
            wnorm, limit = _norm(w), 1 / (rcond * anorm)
            what = "direction norm ‖w‖ > 1 / (rcond · ‖A‖)"
            _raise_singular(self.name, what, wnorm, limit, ~done & (wnorm > limit))
            _check_growth(self.name, x, beta1, anorm, rcond)
            # phibar is the residual norm of the Krylov least-squares problem.
            done = done | (phibar <= tol) | (beta <= tiny)
        return x, k, anorm


class GMRES(_Krylov):
    """Restarted GMRES for general (non-symmetric) systems.

    Builds an orthonormal Krylov basis by Arnoldi with modified Gram–Schmidt, keeps the
    Hessenberg matrix triangular with Givens rotations, and restarts every ``restart``
    iterations (Saad & Schultz, 1986). Every diagonal ρ of the triangular factor is at least
    σ_min(A), so one at most ``rcond · ‖A‖`` (‖A‖ estimated by the largest ‖A vⱼ‖ seen)
    while the residual is still above tolerance proves A singular to working precision and
    raises `SingularSystemError`.

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iter: budget of matrix-vector products (over all restarts).
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
        restart: Krylov dimension between restarts (memory ``restart · B · N``).
        rcond: singularity threshold (see above); default ``10 eps``
            (`structift.implicit.condition.default_rcond`).
    """

    name = "GMRES"
    hint = "Try more max_iter, a larger restart, a looser rtol, or Dense if the system is small."

    @renamed_kwargs(max_iters="max_iter")
    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iter: int = 1000,
        on_failure: OnFailure = "raise",
        restart: int = 20,
        *,
        rcond: float | None = None,
    ) -> None:
        super().__init__(rtol, atol, max_iter, on_failure, rcond=rcond)
        if restart < 1:
            raise ValueError(f"restart must be >= 1, got {restart}")
        self.restart = restart

    def _cycle(
        self,
        op: AbstractLinearOperator,
        b: Tensor,
        tol: Tensor,
        budget: int,
        anorm: Tensor,
        rcond: float,
    ) -> tuple[Tensor, int, Tensor]:
        # In exact arithmetic the Krylov space is exhausted after N steps.
        B, m = b.shape[0], min(self.restart, budget, b.shape[-1])
        eps, tiny = torch.finfo(b.dtype).eps, torch.finfo(b.dtype).tiny
        beta = _norm(b)
        V = [b * _safe_div(torch.ones_like(beta), beta).unsqueeze(-1)]
        R = torch.zeros(B, m, m, dtype=b.dtype, device=b.device)
        g = torch.zeros(B, m + 1, dtype=b.dtype, device=b.device)
        g[:, 0] = beta
        cs: list[Tensor] = []
        sn: list[Tensor] = []
        stale = torch.zeros_like(beta, dtype=torch.bool)  # V[j] is zero: space exhausted
        j = 0
        for j in range(m):
            w = op.mv(V[j])
            wnorm = _norm(w)
            anorm = torch.maximum(anorm, wnorm)
            h = []
            for vi in V:
                hij = _dot(vi, w)
                w = w - hij.unsqueeze(-1) * vi
                h.append(hij)
            hnext = _norm(w)
            # Krylov space numerically exhausted (a happy breakdown up to rounding): w is
            # mostly rounding noise, so a system continues with zero vectors (zero updates)
            # and the cycle ends once all have; the restart from the true residual goes on.
            stale_next = (hnext <= eps**0.5 * wnorm) | (hnext <= 10 * rcond * anorm)
            scale = torch.where(stale_next, 0.0, _safe_div(torch.ones_like(hnext), hnext))
            V.append(w * scale.unsqueeze(-1))
            for i in range(j):  # apply the previous rotations to the new column
                h[i], h[i + 1] = cs[i] * h[i] + sn[i] * h[i + 1], -sn[i] * h[i] + cs[i] * h[i + 1]
            rho = torch.hypot(h[j], hnext)
            limit = rcond * anorm.clamp_min(tiny)
            bad = ~stale & ~(g[:, j].abs() <= tol) & (rho <= limit)
            _raise_singular(self.name, "pivot ρ <= rcond · ‖A‖", rho, limit, bad)
            # Systems that already converged get a harmless unit pivot and zero update.
            rho_safe = torch.where(rho > 0, rho, 1.0)
            c, s = torch.where(rho > 0, h[j] / rho_safe, 1.0), hnext / rho_safe
            cs.append(c)
            sn.append(s)
            h[j] = torch.where(rho > 0, rho, 1.0)
            R[:, : j + 1, j] = torch.stack(h[: j + 1], -1)
            g[:, j + 1] = -s * g[:, j]
            g[:, j] = c * g[:, j]
            stale = stale | stale_next
            if ((g[:, j + 1].abs() <= tol) | stale).all():
                break
        k = j + 1
        y = torch.linalg.solve_triangular(R[:, :k, :k], g[:, :k].unsqueeze(-1), upper=True)
        x = torch.zeros_like(b)
        for i in range(k):  # V y without stacking V (saves k·B·N memory)
            x = x + y[:, i] * V[i]
        return x, k, anorm
