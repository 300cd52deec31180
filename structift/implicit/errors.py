"""Exceptions and warnings raised by implicit differentiation and the linear solvers."""

from __future__ import annotations

__all__ = ["ConvergenceError", "ConvergenceWarning", "SingularSystemError"]


class SingularSystemError(ValueError):
    """A linear system (usually ∂F/∂z at the root) is singular or numerically singular.

    The implicit function theorem needs ∂F/∂z invertible at the solution; when it is not,
    dz/dθ is undefined (e.g. the unit circle θ² + x² = 1 at x = 0) and no gradient is returned.
    """


class ConvergenceError(RuntimeError):
    """An iterative linear solve did not reach its tolerance within its iteration budget."""


class ConvergenceWarning(UserWarning):
    """Warned instead of :class:`ConvergenceError` by a solver with ``on_failure="warn"``."""
