"""Exceptions and warnings raised by implicit differentiation and the linear solvers."""

from __future__ import annotations

from torch import Tensor

__all__ = ["ConvergenceError", "ConvergenceWarning", "SingularSystemError"]


class SingularSystemError(ValueError):
    """A linear system (usually ∂F/∂z at the root) is singular or numerically singular.

    The implicit function theorem needs ∂F/∂z invertible at the solution; when it is not,
    dz/dθ is undefined (e.g. the unit circle θ² + x² = 1 at x = 0) and no gradient is returned.
    "Numerically singular" follows one rule, ``σ_min <= rcond · ‖A‖`` (see
    `structift.implicit.condition`).

    Attributes:
        systems: ``[B]`` bool mask of the systems of the batch found singular (an iterative
            solver stops at the first it finds, so others may be singular too), or None.
    """

    def __init__(self, message: str, systems: Tensor | None = None) -> None:
        super().__init__(message)
        self.systems = systems


class ConvergenceError(RuntimeError):
    """An iterative linear solve did not reach its tolerance within its iteration budget.

    Attributes:
        systems: ``[B]`` bool mask of the systems of the batch that failed, or None.
    """

    def __init__(self, message: str, systems: Tensor | None = None) -> None:
        super().__init__(message)
        self.systems = systems


class ConvergenceWarning(UserWarning):
    """Warned instead of `ConvergenceError` by a solver with ``on_failure="warn"``."""
