"""Linear solvers by name: the one table of the strings ``linear_solver=`` accepts.

``custom_root(F, linear_solver="cg")`` is ``custom_root(F, linear_solver=CG())``. Callers
that take a ``linear_solver`` argument of their own resolve it with
`resolve_linear_solver` instead of keeping a second table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from .krylov import CG, GMRES, MINRES
from .solvers import AbstractLinearSolver, Dense, Identity, Neumann

__all__ = ["LINEAR_SOLVERS", "LinearSolverName", "resolve_linear_solver"]

LinearSolverName = Literal["dense", "cholesky", "cg", "minres", "gmres", "neumann", "identity"]

LINEAR_SOLVERS: dict[str, Callable[[], AbstractLinearSolver]] = {
    "dense": Dense,
    "cholesky": lambda: Dense(assume="spd"),
    "cg": CG,
    "minres": MINRES,
    "gmres": GMRES,
    "neumann": Neumann,
    "identity": Identity,
}
"""Name -> factory of the solver with its default settings (a fresh object per call)."""


def _is_solver(obj: Any) -> bool:
    # Duck typing: any object (not a class) with init / solve / transpose is a solver.
    return isinstance(obj, AbstractLinearSolver) or (
        not isinstance(obj, type)
        and all(callable(getattr(obj, m, None)) for m in ("init", "solve", "transpose"))
    )


def resolve_linear_solver(
    spec: AbstractLinearSolver | str | None, argument: str = "linear_solver"
) -> AbstractLinearSolver | None:
    """Return the solver ``spec`` names, ``spec`` itself if it is a solver, or None for None.

    Args:
        spec: a solver object (``init`` / ``solve`` / ``transpose``), one of the names in
            `LINEAR_SOLVERS`, or None (the caller's default).
        argument: the argument's name, for error messages.

    Raises:
        ValueError: for a string that names no solver.
        TypeError: for anything else.
    """
    names = ", ".join(repr(n) for n in LINEAR_SOLVERS)
    if spec is None or (not isinstance(spec, str) and _is_solver(spec)):
        return spec
    if isinstance(spec, str):
        if spec in LINEAR_SOLVERS:
            return LINEAR_SOLVERS[spec]()
        raise ValueError(
            f"{argument} must be one of {names} or a linear solver object; got {spec!r}"
        )
    raise TypeError(
        f"{argument} must be a linear solver object (with init, solve and transpose, e.g. "
        f"structift.implicit.Dense()), one of the names {names}, or None; got "
        f"{type(spec).__name__} {spec!r}"
    )
