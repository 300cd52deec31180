"""Implicit differentiation: ``custom_root`` / ``custom_fixed_point`` and linear solvers.

This subpackage imports nothing else from structift.
"""

from .errors import ConvergenceError, ConvergenceWarning, SingularSystemError
from .krylov import CG, GMRES, MINRES
from .operators import (
    AbstractLinearOperator,
    FunctionOperator,
    JacobianOperator,
    MatrixOperator,
)
from .registry import LINEAR_SOLVERS, resolve_linear_solver
from .residual import AbstractResidual, FunctionResidual
from .root import custom_fixed_point, custom_root
from .solvers import (
    AbstractLinearSolver,
    AbstractTreeSolver,
    Dense,
    Identity,
    LinearSolution,
    Neumann,
    Status,
)

__all__ = [
    "CG",
    "GMRES",
    "LINEAR_SOLVERS",
    "MINRES",
    "AbstractLinearOperator",
    "AbstractLinearSolver",
    "AbstractResidual",
    "AbstractTreeSolver",
    "ConvergenceError",
    "ConvergenceWarning",
    "Dense",
    "FunctionOperator",
    "FunctionResidual",
    "Identity",
    "JacobianOperator",
    "LinearSolution",
    "MatrixOperator",
    "Neumann",
    "SingularSystemError",
    "Status",
    "custom_fixed_point",
    "custom_root",
    "resolve_linear_solver",
]
