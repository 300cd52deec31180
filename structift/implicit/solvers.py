"""Linear solvers: objects with ``init(operator) -> state``, ``solve(state, rhs)``, ``transpose``.

One ``init`` (a factorization, or nothing for Krylov methods) serves both the forward solve
``A x = b`` and the transposed solve ``Aᵀ x = b`` that implicit differentiation needs.
Every ``solve`` returns a `LinearSolution` carrying the solution, the true residual
norm ``‖b − A x‖`` per system, the iteration count and a `Status`. Failure raises
(`structift.implicit.ConvergenceError` or
`structift.implicit.SingularSystemError`) with a message that says what to try;
``on_failure="warn"`` turns non-convergence into a warning. A solver never returns zeros in
place of a failed solve.

Vectors are ``[B, N]``: B independent systems of size N (see
`structift.implicit.operators`). The Krylov methods (CG, MINRES, GMRES) live in
`structift.implicit.krylov`.
"""

from __future__ import annotations

import abc
import enum
import warnings
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ._deprecation import renamed_kwargs
from .condition import default_rcond, equilibrate, inverse_norm1
from .errors import ConvergenceError, ConvergenceWarning, SingularSystemError
from .operators import AbstractLinearOperator

__all__ = [
    "AbstractLinearSolver",
    "AbstractTreeSolver",
    "Dense",
    "Identity",
    "LinearSolution",
    "Neumann",
    "Status",
]

OnFailure = Literal["raise", "warn"]


class Status(str, enum.Enum):
    """Outcome of a linear solve."""

    SUCCESS = "success"
    """Residual within tolerance for every system."""
    MAX_ITERS = "max_iters"
    """Iteration budget spent before the tolerance was met (seen with ``on_failure="warn"``)."""
    APPROXIMATE = "approximate"
    """An approximate solver (Neumann without ``rtol``, Identity) ran as configured."""


class LinearSolution(NamedTuple):
    """Result of `AbstractLinearSolver.solve`.

    Attributes:
        solution: ``[B, N]``.
        residual_norm: ``[B]``, the true residual ``‖b − A x‖₂`` of each system.
        iterations: iterations used (matrix-vector products for Krylov/Neumann, 0 for Dense).
        status: a `Status`.
    """

    solution: Tensor
    residual_norm: Tensor
    iterations: int
    status: Status


def default_rtol(dtype: torch.dtype) -> float:
    """Return the default relative tolerance for ``dtype`` (1e-10 float64, 1e-5 float32)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


def empty_solution(rhs: Tensor) -> LinearSolution:
    """Return the solution of an empty batch (``rhs`` [0, N]) without applying the operator."""
    return LinearSolution(torch.zeros_like(rhs), rhs.new_zeros(0), 0, Status.SUCCESS)


class AbstractLinearSolver(abc.ABC):
    """Interface of every linear solver (lineax-style).

    ``init(operator)`` prepares a state (e.g. a factorization), ``solve(state, rhs)`` solves
    with it, and ``transpose(state)`` returns a state that solves with the transposed
    operator, reusing the same preparation: `structift.implicit.custom_root` builds
    ``∂F/∂z`` and solves with ``transpose(init(∂F/∂z))``.
    """

    @abc.abstractmethod
    def init(self, operator: AbstractLinearOperator) -> Any:
        """Prepare to solve with ``operator`` (e.g. factorize it) and return a state."""

    @abc.abstractmethod
    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        """Solve ``A x = rhs`` for ``rhs`` [B, N] with the operator held in ``state``."""

    @abc.abstractmethod
    def transpose(self, state: Any) -> Any:
        """Return a state that solves with ``Aᵀ``, reusing any factorization."""


class AbstractTreeSolver(AbstractLinearSolver):
    """A solver that also works in the layout of ``custom_root``'s z (a pytree of tensors).

    Structured solvers (a closed form, a dynamic program) naturally take the right-hand side
    as the residual's own pytree ``[*batch, *event]`` leaves; ``custom_root`` then hands it over
    as such in a first-order backward (no ``[B, N]`` copies of z, the cotangent or the
    solution), and flattens only for ``create_graph`` (through ``solve``). The operator given
    to ``init`` is ``∂F/∂z`` on ``[B, N]`` vectors, built only if the solver applies it.
    """

    @abc.abstractmethod
    def solve_tree(self, state: Any, rhs: Any) -> LinearSolution:
        """Solve ``A x = rhs`` for a pytree ``rhs``; ``solution`` has the same pytree layout."""


def _check_rhs(operator: AbstractLinearOperator, rhs: Tensor) -> None:
    if rhs.shape != (operator.batch_size, operator.size):
        raise ValueError(
            f"rhs must have shape [B, N] = {[operator.batch_size, operator.size]}, "
            f"got {list(rhs.shape)}"
        )
    if rhs.dtype != operator.dtype or rhs.device != operator.device:
        raise TypeError(
            f"rhs has dtype {rhs.dtype} on {rhs.device} but the operator works in "
            f"{operator.dtype} on {operator.device}"
        )
    if not torch.isfinite(rhs).all():
        raise ValueError("rhs contains NaN or inf; the linear solve would propagate it")


def finalize(
    name: str,
    operator: AbstractLinearOperator,
    rhs: Tensor,
    x: Tensor,
    iterations: int,
    rtol: float | None,
    atol: float,
    on_failure: OnFailure,
    hint: str,
    approximate: bool = False,
) -> LinearSolution:
    """Measure the true residual, check it against the tolerance, and raise/warn on failure."""
    if not torch.isfinite(x).all():
        raise ConvergenceError(
            f"{name} produced a non-finite solution after {iterations} iterations; the system "
            f"is singular, badly conditioned or the iteration diverged. {hint}",
            ~torch.isfinite(x).all(-1),
        )
    rnorm = torch.linalg.vector_norm(rhs - operator.mv(x), dim=-1)
    if approximate:
        return LinearSolution(x, rnorm, iterations, Status.APPROXIMATE)
    rtol = default_rtol(x.dtype) if rtol is None else rtol
    tol = torch.clamp(rtol * torch.linalg.vector_norm(rhs, dim=-1), min=atol)
    bad = ~(rnorm <= tol)
    if not bad.any():
        return LinearSolution(x, rnorm, iterations, Status.SUCCESS)
    worst = int(torch.argmax(torch.where(bad, rnorm / tol.clamp_min(1e-300), 0.0)))
    msg = (
        f"{name} did not converge in {iterations} iterations: residual "
        f"{float(rnorm[worst]):.3g} > tolerance {float(tol[worst]):.3g} for "
        f"{int(bad.sum())} of {bad.numel()} systems. {hint}"
    )
    if float(rnorm[worst]) > float(torch.linalg.vector_norm(rhs[worst])):
        msg += (
            f" The residual exceeds ‖b‖ (x = 0 does better): the iteration lost all accuracy, "
            f"so the system is singular or too ill-conditioned for {name} in {x.dtype}; "
            "Dense tells which."
        )
    if on_failure == "warn":
        warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        return LinearSolution(x, rnorm, iterations, Status.MAX_ITERS)
    raise ConvergenceError(msg, bad)


def _check_on_failure(on_failure: str) -> None:
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"on_failure must be 'raise' or 'warn', got {on_failure!r}")


@dataclass
class _DenseState:
    """A factorization of ``S = diag(r) A diag(c)``: ``A⁻¹ b = c ⊙ S⁻¹(r ⊙ b)``."""

    operator: AbstractLinearOperator
    factor: Tensor
    pivots: Tensor | None
    adjoint: bool
    r: Tensor
    c: Tensor


class Dense(AbstractLinearSolver):
    """Direct solve on the materialized matrix: LU (general) or Cholesky (SPD).

    The operator is materialized once in ``init`` (``[B, N, N]``, via vector-Jacobian
    products for Jacobians); use it for small systems (N up to a few thousand).
    ∂F/∂z must be invertible for the implicit function theorem to apply, so ``init`` raises
    `structift.implicit.SingularSystemError` when the factorization breaks down or
    when the reciprocal condition number ``1/κ₁(S) = 1/(‖S‖₁ ‖S⁻¹‖₁)`` of the equilibrated
    matrix S (row and column scaling, so a badly scaled A does not count as singular),
    estimated from the factors (LAPACK's ``xGECON`` method,
    `structift.implicit.condition`), is at most ``rcond``. A successful factorization
    alone certifies nothing: Cholesky and LU of a matrix with a rounding-level eigenvalue
    usually succeed with unremarkable pivots.

    Args:
        assume: ``"general"`` (LU with partial pivoting) or ``"spd"`` (Cholesky).
        rcond: threshold on the estimated ``1/κ₁(S)``; default ``10 eps(dtype)``
            (`structift.implicit.condition.default_rcond`). Pass 0 to accept any
            matrix the factorization does not reject.
    """

    def __init__(
        self, assume: Literal["general", "spd"] = "general", rcond: float | None = None
    ) -> None:
        if assume not in ("general", "spd"):
            raise ValueError(f"assume must be 'general' or 'spd', got {assume!r}")
        if rcond is not None and not 0 <= rcond < 1:
            raise ValueError(f"rcond must be in [0, 1) or None, got {rcond!r}")
        self.assume, self.rcond = assume, rcond

    def init(self, operator: AbstractLinearOperator) -> _DenseState:
        """Materialize, equilibrate and factorize the operator; raise if it is singular."""
        B, N = operator.batch_size, operator.size
        if B == 0 or N == 0:  # nothing to factorize; never apply the operator
            empty = torch.zeros(B, N, N, dtype=operator.dtype, device=operator.device)
            pivots = None if self.assume == "spd" else empty.new_ones(B, N, dtype=torch.int32)
            ones = empty.new_ones(B, N)
            return _DenseState(operator, empty, pivots, False, ones, ones)
        A = operator.materialize()
        if not torch.isfinite(A).all():
            raise ValueError("the operator's matrix contains NaN or inf")
        rcond = default_rcond(A.dtype) if self.rcond is None else self.rcond
        # Factorize the equilibrated S (as LAPACK's xGESVX does): pivoting and the backward
        # error are then relative to S's entries, so a badly scaled A keeps its accuracy and
        # the condition estimate below judges A, not its scaling.
        r, c = equilibrate(A, symmetric=self.assume == "spd")
        S = r.unsqueeze(-1) * A * c.unsqueeze(-2)  # exact: r, c are powers of 2
        if self.assume == "spd":
            L, info = torch.linalg.cholesky_ex(S)
            state = _DenseState(operator, L, None, False, r, c)
        else:
            LU, pivots, info = torch.linalg.lu_factor_ex(S)
            state = _DenseState(operator, LU, pivots, False, r, c)
        inv_norm = inverse_norm1(
            lambda x: self._apply_scaled(state, x, adjoint=False),
            lambda x: self._apply_scaled(state, x, adjoint=True),
            A[:, 0],
        )
        rc = 1.0 / (torch.linalg.matrix_norm(S, ord=1) * inv_norm)  # 0 where inv_norm = inf
        failed = info > 0  # Cholesky: not positive definite; LU: an exactly zero pivot
        bad = failed | ~(rc > rcond)
        if bad.any():
            what = "Dense(assume='spd')" if self.assume == "spd" else "Dense"
            worst = float(torch.where(failed, 0.0, rc).min())
            fix = " If A is indefinite, use Dense() (LU) or MINRES." if self.assume == "spd" else ""
            raise SingularSystemError(
                f"{what}: the matrix is singular or numerically singular in {int(bad.sum())} of "
                f"{B} systems ({int(failed.sum())} with a failed factorization; smallest "
                f"estimated 1/cond₁ = {worst:.3g} <= rcond = {rcond:.3g}). {_SINGULAR_HINT}.{fix}",
                bad,
            )
        return state

    @staticmethod
    def _apply_scaled(state: _DenseState, rhs: Tensor, adjoint: bool) -> Tensor:
        """Return ``S⁻¹ rhs`` (or ``S⁻ᵀ rhs``) for rhs [B, N]."""
        b = rhs.unsqueeze(-1)
        if state.pivots is None:
            x = torch.cholesky_solve(b, state.factor)
        else:
            x = torch.linalg.lu_solve(state.factor, state.pivots, b, adjoint=adjoint)
        return x.squeeze(-1)

    def _apply(self, state: _DenseState, rhs: Tensor) -> Tensor:
        # A⁻¹ b = c ⊙ S⁻¹(r ⊙ b) and A⁻ᵀ b = r ⊙ S⁻ᵀ(c ⊙ b).
        if state.adjoint:
            return state.r * self._apply_scaled(state, state.c * rhs, adjoint=True)
        return state.c * self._apply_scaled(state, state.r * rhs, adjoint=False)

    def solve(self, state: _DenseState, rhs: Tensor) -> LinearSolution:
        """Solve with the stored factorization and report the true residual."""
        op = state.operator.transpose() if state.adjoint else state.operator
        _check_rhs(op, rhs)
        if rhs.shape[0] == 0:
            return empty_solution(rhs)
        sol = self._apply(state, rhs)
        # A backward-stable factorization: only a non-finite result counts as failure.
        if not torch.isfinite(sol).all():
            raise SingularSystemError(
                "Dense: the solve overflowed; the matrix is near singular",
                ~torch.isfinite(sol).all(-1),
            )
        rnorm = torch.linalg.vector_norm(rhs - op.mv(sol), dim=-1)
        return LinearSolution(sol, rnorm, 0, Status.SUCCESS)

    def transpose(self, state: _DenseState) -> _DenseState:
        """Reuse the factorization for ``Aᵀ``."""
        adjoint = state.pivots is not None and not state.adjoint
        return _DenseState(state.operator, state.factor, state.pivots, adjoint, state.r, state.c)


_SINGULAR_HINT = (
    "For implicit differentiation this means ∂F/∂z is not invertible at the solution, so "
    "dz/dθ is undefined there; check that the root is isolated (e.g. restrict to the support "
    "/ active set)"
)


class Identity(AbstractLinearSolver):
    """The Jacobian-free approximation ``A⁻¹ b ≈ b / scale``.

    Replaces ∂F/∂z by ``scale · I``; for a fixed point ``z = T(z)`` written as
    ``F = z − T(z)`` this is Jacobian-free backpropagation (Fung et al., arXiv:2103.12803).
    It is an approximation by design: the status is ``APPROXIMATE`` and the true residual is
    reported so callers can see how far off it is; it never raises for accuracy.

    Args:
        scale: the assumed value of A (a positive scalar).
    """

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def init(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        """Keep the operator (only used to report the residual)."""
        return operator

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Return ``rhs / scale`` and its true residual."""
        _check_rhs(state, rhs)
        if rhs.shape[0] == 0:
            return empty_solution(rhs)
        x = rhs / self.scale
        return finalize("Identity", state, rhs, x, 0, None, 0.0, "raise", "", approximate=True)

    def transpose(self, state: AbstractLinearOperator) -> AbstractLinearOperator:
        """Return the transposed operator."""
        return state.transpose()


class Neumann(AbstractLinearSolver):
    """Truncated Neumann series ``A⁻¹ b ≈ α Σ_{j<k} (I − αA)ʲ b``.

    The series converges iff the spectral radius ρ(I − αA) < 1, i.e. every eigenvalue λ of A
    satisfies |1 − αλ| < 1: for symmetric A that means A positive definite and
    ``0 < alpha < 2 / λ_max(A)``; the error then shrinks like ρᵏ. It diverges for every
    ``alpha`` on an indefinite matrix such as a KKT (saddle-point) system — reduce to the
    null space of the constraints first (see docs/implicit/neumann.md). Used for
    inverse-Hessian products in hyperparameter optimization (Lorraine et al.,
    arXiv:1911.02590).

    The residual after j terms is exactly ``(I − αA)ʲ b``, so it is tracked for free.

    Args:
        max_iter: k, the number of terms (matrix-vector products); was ``terms``.
        alpha: the step size α.
        rtol: if given, stop early once ``‖r‖ <= max(rtol‖b‖, atol)`` and raise (or warn) if
            k terms do not reach it. If None the truncation is the intended approximation
            (status ``APPROXIMATE``), but a growing residual (ρ ≥ 1) still raises.
        atol: absolute tolerance used with ``rtol``.
        on_failure: ``"raise"`` or ``"warn"``.
    """

    @renamed_kwargs(terms="max_iter")
    def __init__(
        self,
        max_iter: int = 50,
        alpha: float = 1.0,
        rtol: float | None = None,
        atol: float = 0.0,
        on_failure: OnFailure = "raise",
    ) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {max_iter}")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        _check_on_failure(on_failure)
        self.max_iter, self.alpha, self.rtol, self.atol = max_iter, alpha, rtol, atol
        self.on_failure: OnFailure = on_failure

    def init(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        """Keep the operator (Neumann needs only matrix-vector products)."""
        return operator

    def solve(self, state: AbstractLinearOperator, rhs: Tensor) -> LinearSolution:
        """Sum the truncated series."""
        _check_rhs(state, rhs)
        if rhs.shape[0] == 0:
            return empty_solution(rhs)
        bnorm = torch.linalg.vector_norm(rhs, dim=-1)
        tol = None
        if self.rtol is not None:
            tol = torch.clamp(self.rtol * bnorm, min=self.atol)
        x, r = torch.zeros_like(rhs), rhs
        rnorm = prev = lowest = bnorm
        j = 0
        while j < self.max_iter:
            j += 1
            x = x + self.alpha * r
            r = r - self.alpha * state.mv(r)  # r_j = (I − αA)ʲ b = b − A x_j
            prev, rnorm = rnorm, torch.linalg.vector_norm(r, dim=-1)
            lowest = torch.minimum(lowest, rnorm)
            if tol is not None and bool((rnorm <= tol).all()):
                break
        # Divergence: the residual ends above ‖b‖, or (after a transient) it is still growing
        # past its minimum — the dominant mode of I − αA has modulus >= 1.
        growing = (rnorm > prev * (1 + 1e-9)) & (rnorm > lowest * (1 + 1e-6)) & (j >= 10)
        if (
            not torch.isfinite(rnorm).all()
            or bool((rnorm > bnorm * (1 + 1e-6)).any())
            or bool(growing.any())
        ):
            raise ConvergenceError(
                f"Neumann series diverges: after {j} terms the residual "
                f"{float(rnorm.max()):.3g} (‖b‖ = {float(bnorm.max()):.3g}) is growing, so the "
                f"spectral radius of I − αA is >= 1 (alpha = {self.alpha}). Choose "
                "0 < alpha < 2/λ_max(A); if A is indefinite (a KKT/saddle-point matrix) no "
                "alpha works: use MINRES, or a Neumann series on the reduced (null-space) system"
            )
        hint = "Increase max_iter (terms), or use CG/MINRES/GMRES which converge faster."
        return finalize(
            "Neumann",
            state,
            rhs,
            x,
            j,
            self.rtol,
            self.atol,
            self.on_failure,
            hint,
            approximate=self.rtol is None,
        )

    def transpose(self, state: AbstractLinearOperator) -> AbstractLinearOperator:
        """Return the transposed operator."""
        return state.transpose()
