"""Batched Krylov solvers: CG (SPD), MINRES (symmetric indefinite), GMRES (general).

All act on ``[B, N]`` vectors, keep per-system scalars of shape ``[B]`` and stop when every
system meets ``‖b − A x‖ <= max(rtol ‖b‖, atol)``; the true residual is recomputed at the
end and reported. Breakdowns that reveal a singular operator raise
:class:`~structift.implicit.SingularSystemError`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import SingularSystemError
from .operators import AbstractLinearOperator
from .solvers import (
    AbstractLinearSolver,
    LinearSolution,
    OnFailure,
    _check_on_failure,
    _check_rhs,
    default_rtol,
    finalize,
)

__all__ = ["CG", "GMRES", "MINRES"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _norm(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


class _Krylov(AbstractLinearSolver):
    """Shared configuration of the Krylov solvers (abstract)."""

    name = "Krylov"
    hint = ""

    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iters: int = 1000,
        on_failure: OnFailure = "raise",
    ) -> None:
        if max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {max_iters}")
        _check_on_failure(on_failure)
        self.rtol, self.atol, self.max_iters = rtol, atol, max_iters
        self.on_failure: OnFailure = on_failure

    def init(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        """Keep the operator (Krylov methods need only matrix-vector products)."""
        return operator

    def transpose(self, state: AbstractLinearOperator) -> AbstractLinearOperator:
        """Return the transposed operator."""
        return state.transpose()

    def _tol(self, rhs: Tensor) -> Tensor:
        rtol = default_rtol(rhs.dtype) if self.rtol is None else self.rtol
        return torch.clamp(rtol * _norm(rhs), min=self.atol)

    def _finish(self, op: AbstractLinearOperator, rhs: Tensor, x: Tensor, k: int) -> LinearSolution:
        return finalize(self.name, op, rhs, x, k, self.rtol, self.atol, self.on_failure, self.hint)


class CG(_Krylov):
    """Conjugate gradients for symmetric positive definite systems.

    Solves ``A x = b`` with A SPD (Hestenes & Stiefel, 1952), optionally preconditioned by an
    SPD ``preconditioner`` approximating ``A⁻¹``. Non-positive curvature ``pᵀAp <= 0`` raises:
    :class:`SingularSystemError` when it is zero (singular A), ``ValueError`` when negative
    (A indefinite: use :class:`MINRES`).

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iters: iteration budget.
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
        preconditioner: optional ``[B, N] -> [B, N]`` map applying ``M⁻¹``.
    """

    name = "CG"
    hint = (
        "Try more max_iters, a looser rtol, a preconditioner, or another solver: MINRES if the "
        "system is symmetric indefinite, GMRES if non-symmetric, Dense if it is small."
    )

    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iters: int = 1000,
        on_failure: OnFailure = "raise",
        preconditioner: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(rtol, atol, max_iters, on_failure)
        self.preconditioner = preconditioner

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Run preconditioned CG from x = 0."""
        op = state
        _check_rhs(op, rhs)
        M = self.preconditioner or (lambda v: v)
        tol = self._tol(rhs)
        x, r = torch.zeros_like(rhs), rhs.clone()
        z = M(r)
        p, rz = z, _dot(r, z)
        k = 0
        for k in range(1, self.max_iters + 1):
            active = _norm(r) > tol
            if not active.any():
                k -= 1
                break
            Ap = op.mv(p)
            pAp = _dot(p, Ap)
            bad = active & (pAp <= 0)
            if bad.any():
                i = int(bad.nonzero()[0])
                tiny = 100 * torch.finfo(rhs.dtype).eps * _norm(p[i]) * _norm(Ap[i])
                if pAp[i].abs() <= tiny:
                    raise SingularSystemError(
                        f"CG: the operator is singular (pᵀAp = {float(pAp[i]):.3g} in system "
                        f"{i}); ∂F/∂z is not invertible, so the implicit derivative is undefined"
                    )
                raise ValueError(
                    f"CG: the operator is not positive definite (pᵀAp = {float(pAp[i]):.3g} < 0 "
                    f"in system {i}); use MINRES for symmetric indefinite systems (e.g. KKT) or "
                    "GMRES for non-symmetric ones"
                )
            alpha = torch.where(active, _safe_div(rz, pAp), 0.0).unsqueeze(-1)
            x = x + alpha * p
            r = r - alpha * Ap
            z = M(r)
            rz_new = _dot(r, z)
            beta = _safe_div(rz_new, rz).unsqueeze(-1)
            p = z + beta * p
            rz = rz_new
        return self._finish(op, rhs, x, k)


class MINRES(_Krylov):
    """MINRES for symmetric (possibly indefinite) systems such as KKT matrices.

    Minimizes ‖b − A x‖ over the Krylov space with the Lanczos process and Givens rotations
    (Paige & Saunders, 1975). A is assumed symmetric (not checked). A zero pivot of the
    rotated tridiagonal matrix means A is singular on the Krylov space and raises
    :class:`SingularSystemError`.

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iters: iteration budget.
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
    """

    name = "MINRES"
    hint = (
        "Try more max_iters or a looser rtol; if the system is not symmetric use GMRES, "
        "if it is small use Dense."
    )

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Run MINRES from x = 0."""
        op = state
        _check_rhs(op, rhs)
        tol = self._tol(rhs)
        tiny = torch.finfo(rhs.dtype).tiny
        eps = torch.finfo(rhs.dtype).eps
        zeros = torch.zeros_like(rhs[:, 0])
        x = torch.zeros_like(rhs)
        r1, r2, y = rhs, rhs, rhs
        beta1 = _norm(rhs)
        beta, oldb = beta1, zeros
        dbar, epsln, phibar = zeros, zeros, beta1
        cs, sn = -torch.ones_like(zeros), zeros
        w, w2 = torch.zeros_like(rhs), torch.zeros_like(rhs)
        done = beta1 <= tol
        anorm = zeros
        k = 0
        for k in range(1, self.max_iters + 1):
            if done.all():
                k -= 1
                break
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
            singular = ~done & (gamma <= 10 * eps * anorm.clamp_min(tiny))
            if singular.any():
                raise SingularSystemError(
                    "MINRES: the operator is singular on the Krylov space (zero pivot); "
                    "∂F/∂z is not invertible, so the implicit derivative is undefined"
                )
            gamma = gamma.clamp_min(tiny)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            w = (v - oldeps.unsqueeze(-1) * w1 - delta.unsqueeze(-1) * w2) / gamma.unsqueeze(-1)
            x = x + torch.where(done, 0.0, phi).unsqueeze(-1) * w
            # phibar is the residual norm of the Krylov least-squares problem.
            done = done | (phibar <= tol) | (beta <= tiny)
        return self._finish(op, rhs, x, k)


class GMRES(_Krylov):
    """Restarted GMRES for general (non-symmetric) systems.

    Builds an orthonormal Krylov basis by Arnoldi with modified Gram–Schmidt, keeps the
    Hessenberg matrix triangular with Givens rotations, and restarts every ``restart``
    iterations (Saad & Schultz, 1986). A zero diagonal in the triangular factor while the
    residual is still above tolerance means A is singular and raises
    :class:`SingularSystemError`.

    Args:
        rtol: relative tolerance (default 1e-10 in float64, 1e-5 in float32).
        atol: absolute tolerance.
        max_iters: budget of matrix-vector products (over all restarts).
        on_failure: ``"raise"`` (default) or ``"warn"`` when the budget is spent.
        restart: Krylov dimension between restarts (memory ``restart · B · N``).
    """

    name = "GMRES"
    hint = "Try more max_iters, a larger restart, a looser rtol, or Dense if the system is small."

    def __init__(
        self,
        rtol: float | None = None,
        atol: float = 0.0,
        max_iters: int = 1000,
        on_failure: OnFailure = "raise",
        restart: int = 20,
    ) -> None:
        super().__init__(rtol, atol, max_iters, on_failure)
        if restart < 1:
            raise ValueError(f"restart must be >= 1, got {restart}")
        self.restart = restart

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Run restarted GMRES from x = 0."""
        op = state
        _check_rhs(op, rhs)
        tol = self._tol(rhs)
        x = torch.zeros_like(rhs)
        used = 0
        best = torch.full_like(tol, float("inf"))
        while used < self.max_iters:
            r = rhs - op.mv(x)
            rnorm = _norm(r)
            if (rnorm <= tol).all():
                break
            if not (rnorm < 0.999 * best).any():
                break  # a whole cycle without progress: stagnated (reported by _finish)
            best = torch.minimum(best, rnorm)
            x, steps = self._cycle(op, r, x, tol, min(self.restart, self.max_iters - used))
            used += steps
        return self._finish(op, rhs, x, used)

    def _cycle(
        self, op: AbstractLinearOperator, r: Tensor, x: Tensor, tol: Tensor, m: int
    ) -> tuple[Tensor, int]:
        B = r.shape[0]
        eps = torch.finfo(r.dtype).eps
        beta = _norm(r)
        V = [r * _safe_div(torch.ones_like(beta), beta).unsqueeze(-1)]
        R = torch.zeros(B, m, m, dtype=r.dtype, device=r.device)
        g = torch.zeros(B, m + 1, dtype=r.dtype, device=r.device)
        g[:, 0] = beta
        cs: list[Tensor] = []
        sn: list[Tensor] = []
        j = 0
        for j in range(m):
            w = op.mv(V[j])
            wnorm = _norm(w)
            h = []
            for vi in V:
                hij = _dot(vi, w)
                w = w - hij.unsqueeze(-1) * vi
                h.append(hij)
            hnext = _norm(w)
            V.append(w * _safe_div(torch.ones_like(hnext), hnext).unsqueeze(-1))
            for i in range(j):  # apply the previous rotations to the new column
                h[i], h[i + 1] = cs[i] * h[i] + sn[i] * h[i + 1], -sn[i] * h[i] + cs[i] * h[i + 1]
            rho = torch.hypot(h[j], hnext)
            converged = g[:, j].abs() <= tol
            scale = torch.stack([hi.abs() for hi in h] + [hnext], -1).amax(-1)
            if (~converged & (rho <= 10 * eps * scale.clamp_min(torch.finfo(r.dtype).tiny))).any():
                raise SingularSystemError(
                    "GMRES: the operator is singular (zero pivot in the Arnoldi factor); "
                    "∂F/∂z is not invertible, so the implicit derivative is undefined"
                )
            # Systems that already converged get a harmless unit pivot and zero update.
            rho_safe = torch.where(rho > 0, rho, 1.0)
            c, s = torch.where(rho > 0, h[j] / rho_safe, 1.0), hnext / rho_safe
            cs.append(c)
            sn.append(s)
            h[j] = torch.where(rho > 0, rho, 1.0)
            R[:, : j + 1, j] = torch.stack(h[: j + 1], -1)
            g[:, j + 1] = -s * g[:, j]
            g[:, j] = c * g[:, j]
            if (g[:, j + 1].abs() <= tol).all():
                break
            # Krylov space numerically exhausted (happy breakdown up to rounding, which in
            # float32 with large N is ~sqrt(N)·eps): further Arnoldi vectors are mostly noise,
            # so restart from the true residual instead (iterative refinement).
            if (hnext <= eps**0.5 * wnorm).all():
                break
        k = j + 1
        y = torch.linalg.solve_triangular(R[:, :k, :k], g[:, :k].unsqueeze(-1), upper=True)
        for i in range(k):  # x + V y without stacking V (saves k·B·N memory)
            x = x + y[:, i] * V[i]
        return x, k
