"""Solve a symmetric indefinite system through its normal equations (a solver wrapper).

A Neumann series diverges on any saddle-point (KKT) matrix: its eigenvalues have both signs, so
no step α puts all of 1 − αλ inside the unit disc. For symmetric A, the normal equations
A² x = A b have the same solution and an SPD matrix, on which a Neumann series with
0 < α < 2/λ_max(A²) converges (slowly: the rate is 1 − α λ_min(A²)). This makes the Neumann
approximation of inverse-Hessian products (Lorraine et al., arXiv:1911.02590) usable on the
scaled chain KKT system, whose eigenvalues are O(1), with its error reported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structift.implicit import (
    AbstractLinearOperator,
    AbstractLinearSolver,
    FunctionOperator,
    LinearSolution,
)

__all__ = ["NormalEquations"]


class NormalEquations(AbstractLinearSolver):
    """Solve symmetric ``A x = b`` by running ``inner`` on ``A² x = A b``.

    Args:
        inner: a solver for SPD systems, e.g. ``Neumann(max_iter=k, alpha=a)`` or ``CG()``.
            For the scaled chain KKT system λ_max(A) <= 1 + sqrt(Z), so
            ``alpha = 1 / (1 + sqrt(Z))**2`` is a safe Neumann step.

    The returned residual norm is the true ``‖b − A x‖`` of the original system.
    """

    def __init__(self, inner: AbstractLinearSolver) -> None:
        if not isinstance(inner, AbstractLinearSolver):
            raise TypeError(f"inner must be a structift.implicit linear solver, got {inner!r}")
        self.inner = inner

    def init(self, operator: AbstractLinearOperator) -> tuple[AbstractLinearOperator, Any]:
        """Wrap ``x -> A(A x)`` (SPD) and initialize the inner solver on it."""
        square = FunctionOperator(
            lambda x: operator.mv(operator.mv(x)),
            operator.batch_size,
            operator.size,
            operator.dtype,
            operator.device,
            positive_definite=True,
        )
        return operator, self.inner.init(square)

    def solve(self, state: tuple[AbstractLinearOperator, Any], rhs: Tensor) -> LinearSolution:
        """Solve ``A² x = A rhs`` with the inner solver; report the original residual."""
        operator, inner_state = state
        out = self.inner.solve(inner_state, operator.mv(rhs))
        rnorm = torch.linalg.vector_norm(rhs - operator.mv(out.solution), dim=-1)
        return LinearSolution(out.solution, rnorm, out.iterations, out.status)

    def transpose(self, state: tuple[AbstractLinearOperator, Any]) -> Any:
        """A is symmetric: the same state solves with Aᵀ."""
        return state
