r"""``regularized_argmax``: μ*(θ) = argmax over the marginal polytope, differentiated by the IFT.

For an exponential family with sufficient statistics φ and marginal polytope M = conv{φ(y)},

    μ*(θ) = argmax_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) = ∇A(θ/τ),        τ > 0,

(Wainwright & Jordan 2008, Thm. 3.4). Its Jacobian dμ*/dθ = (1/τ) ∇²A(θ/τ) comes here from the
implicit function theorem on the KKT system of the problem (not from autograd through A),
through `structift.implicit.custom_root`, so the forward solver is free: the structure's
exact dynamic program at θ/τ, or an iterative solver that never runs it.

Everything structure-specific (the forward solvers, the KKT system, its exact solve) is the
structure's (``dist.structure.regularized(τ)``, see ``structift.structures.base``); this module
only wires it to ``custom_root`` and never looks at the family's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from structift.families import ExpFamily
from structift.implicit import AbstractResidual, custom_root
from structift.implicit.krylov import GMRES, MINRES
from structift.implicit.solvers import AbstractLinearSolver, Dense
from structift.structures.base import AbstractKKTSystem, Exact, Iterative, Params
from structift.variational.regularizers import L2, Entropy, Regularizer

__all__ = [
    "Exact",
    "Iterative",
    "KKTResidual",
    "Structured",
    "kkt_residual",
    "regularized_argmax",
]


@dataclass(frozen=True)
class Structured:
    """Backward linear solver: the structure's exact solve of its KKT system.

    For a chain, the covariance recursions (O(T Z²)); for the simplex, a closed form.

    Args:
        check: also solve the dual block and measure the true KKT residual of the solve, raising
            ``ValueError`` above ``rtol``. The residual exceeds ``rtol`` when the forward
            solution is not exact. Default (None): on for an `Iterative` forward solver,
            off for `Exact` (whose solution is exact to rounding). Turn it off to study
            loose forward solves on purpose.
        rtol: relative tolerance of the check (default sqrt(eps) of the dtype).
    """

    check: bool | None = None
    rtol: float | None = None


ForwardSolver = Literal["exact", "iterative"] | Exact | Iterative
_ENTROPY = Entropy()  # the default regularizer (a frozen value)
LinearSolverSpec = (
    Literal["structured", "dense", "minres", "gmres"] | Structured | AbstractLinearSolver
)


class KKTResidual(NamedTuple):
    """The KKT system evaluated at a point.

    Attributes:
        point: primal and dual variables, the structure's KKT point (a NamedTuple).
        residual: F(point; θ), same structure.
        norm: ``‖F‖₂`` per batch element, ``batch_shape``.
    """

    point: Any
    residual: Any
    norm: Tensor


def _resolve_forward(solver: ForwardSolver) -> Exact | Iterative:
    if isinstance(solver, Exact | Iterative):
        return solver
    if solver == "exact":
        return Exact()
    if solver == "iterative":
        return Iterative()
    raise ValueError(
        f"solver must be 'exact', 'iterative', Exact() or Iterative(...); got {solver!r}"
    )


def _resolve_linear(spec: LinearSolverSpec) -> AbstractLinearSolver | Structured:
    """Return the solver for the scaled KKT system, or the structured-solve options."""
    if isinstance(spec, AbstractLinearSolver | Structured):
        return spec
    table: dict[str, AbstractLinearSolver | Structured] = {
        "structured": Structured(),
        "dense": Dense(),
        "minres": MINRES(),
        "gmres": GMRES(),
    }
    if isinstance(spec, str) and spec in table:
        return table[spec]
    raise ValueError(
        "linear_solver must be 'structured', 'dense', 'minres', 'gmres' or a "
        f"structift.implicit linear solver object; got {spec!r}"
    )


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        if not (isinstance(temperature, Tensor) and temperature.numel() == 1):
            raise TypeError(
                "temperature must be a positive finite number (a Python float, e.g. 1.0); got "
                f"{type(temperature).__name__} {temperature!r}"
            )
    t = float(temperature)
    if not t > 0 or t == float("inf"):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    return t


def _check_dist(dist: object) -> ExpFamily:
    if not isinstance(dist, ExpFamily):
        raise TypeError(
            f"dist must be a structift distribution (an ExpFamily); got {type(dist).__name__}"
        )
    return dist


class _ScaledSystem(AbstractResidual):
    """The diagonally scaled system ``F_D(y) = D F(D y)`` (entries of O(1)) for generic solvers.

    ``−(∂F_D/∂θ)ᵀ u = −(∂F/∂θ)ᵀ (D u)``: the system's closed form, if it has one, still serves.
    """

    def __init__(self, system: AbstractKKTSystem) -> None:
        self.system, self.scale = system, system.scales()
        self.kind = type(system.point)

    def _times(self, x: Any) -> Any:
        return self.kind(*(a * s for a, s in zip(x, self.scale)))

    def __call__(self, y: Any, *theta: Tensor) -> Any:
        return self._times(self.system(self._times(y), *theta))

    def theta_cotangent(self, u: Any, y: Any, *theta: Tensor) -> Any:
        return self.system.theta_cotangent(self._times(u), self._times(y), *theta)


def _attach(system: AbstractKKTSystem, theta: Params, linear: Any, check: bool, batch_ndim: int):
    """Return the solution point carrying the IFT backward (``custom_root``)."""
    point = system.point
    if isinstance(linear, Structured):
        solver = system.structured_solver(check, linear.rtol)
        root = custom_root(system, solver, batch_ndim=batch_ndim, symmetric=True)
        return root(lambda *t: point)(*theta)
    scaled = _ScaledSystem(system)
    y0 = type(point)(*(p / s for p, s in zip(point, scaled.scale)))
    root = custom_root(scaled, linear, batch_ndim=batch_ndim, symmetric=True)
    return scaled._times(root(lambda *t: y0)(*theta))


def regularized_argmax(
    dist: ExpFamily,
    temperature: float = 1.0,
    solver: ForwardSolver = "exact",
    linear_solver: LinearSolverSpec = "structured",
    regularizer: Regularizer = _ENTROPY,
) -> Any:
    r"""Solve μ* = argmax_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) and differentiate it by the IFT.

    M is the marginal polytope of ``dist``'s structure (the simplex for a Categorical; node and
    edge marginals with normalization and marginalization-consistency constraints for a chain,
    where the local polytope is exact and H is the Bethe entropy). The result equals ∇A(θ/τ)
    (``dist.marginals`` at τ = 1); its gradient with respect to the natural parameters θ is
    dμ*/dθ = (1/τ) ∇²A(θ/τ), computed from the KKT system by
    `structift.implicit.custom_root`, never by differentiating the forward solver.

    Args:
        dist: any structift distribution, e.g. a `structift.Categorical`, a
            `structift.LinearChainCRF` or an `structift.HMM` (its posterior;
            gradients flow on to the HMM's logits). −inf potentials are allowed: structures of
            score −∞ have zero mass and the KKT system is restricted to the support.
        temperature: τ > 0.
        solver: ``"exact"`` / `Exact` (the structure's dynamic program at θ/τ) or
            ``"iterative"`` / `Iterative` (message passing / mirror descent).
        linear_solver: how the backward solves the KKT system: ``"structured"`` or
            `Structured` (the structure's exact solve, default), ``"dense"``,
            ``"minres"``, ``"gmres"``, or any `structift.implicit` solver object (e.g.
            ``MINRES(rtol=1e-12)``). Generic solvers see the diagonally scaled symmetric system.
        regularizer: `Entropy` (default, the problem above) or `L2` (SparseMAP, τ H(μ)
            replaced by −(τ/2)‖μ_U‖²: `structift.variational.sparsemap`'s marginals; ``solver``
            and ``linear_solver`` apply to `Entropy` only).

    Returns:
        The same structure as ``dist.marginals``, differentiable w.r.t. the parameters.

    Raises:
        TypeError: for something that is not a structift distribution, or a bad temperature.
        ValueError: for a non-positive temperature or an unknown solver name.
    """
    tau = _check_temperature(temperature)
    fwd = _resolve_forward(solver)
    linear = _resolve_linear(linear_solver)
    if isinstance(regularizer, L2):
        from structift.variational.sparsemap import sparsemap

        if fwd != Exact() or linear != Structured():
            raise ValueError(
                "solver and linear_solver apply to the Entropy regularizer only; with L2 the "
                f"options are L2's fields (got solver={solver!r}, linear_solver={linear_solver!r})"
            )
        r = regularizer
        return sparsemap(dist, tau, max_iter=r.max_iter, tol=r.tol, on_failure=r.on_failure)[0]
    if not isinstance(regularizer, Entropy):
        raise TypeError(
            f"regularizer must be Entropy() or L2(...); got {type(regularizer).__name__}"
        )
    dist = _check_dist(dist)
    theta = dist._natural_params
    problem = dist.structure.regularized(tau)
    if dist.structure.batch_shape.numel() == 0:
        return dist._present(problem.mu(problem.empty(theta)))
    system = problem.at(problem.solve(theta, fwd), theta)
    check = isinstance(fwd, Iterative)
    if isinstance(linear, Structured) and linear.check is not None:
        check = linear.check
    z = _attach(system, theta, linear, check, len(dist.structure.batch_shape))
    return dist._present(problem.mu(z))


def kkt_residual(dist: ExpFamily, mu: Any = None, temperature: float = 1.0) -> KKTResidual:
    """Evaluate the KKT residual F(μ, λ; θ) of the regularized argmax at a candidate μ.

    The duals λ are recovered from μ by the stationarity sweep, so the residual measures both
    stationarity and feasibility; it is zero (to rounding) at μ* = ∇A(θ/τ).

    Args:
        dist: the distribution (see `regularized_argmax`).
        mu: candidate marginals, same structure as ``dist.marginals``; default: the exact
            solution at θ/τ (its residual shows the rounding floor).
        temperature: τ > 0.

    Returns:
        A `KKTResidual` (point, residual, per-element norm).
    """
    tau = _check_temperature(temperature)
    dist = _check_dist(dist)
    problem = dist.structure.regularized(tau)
    with torch.no_grad():
        theta = tuple(t.detach() for t in dist._natural_params)
        if mu is None:
            parts = problem.solve(theta, Exact())
        else:
            parts = _check_mu(mu, dist)
        system = problem.at(parts, theta)
        F = system(system.point, *theta)
        nb = len(dist.structure.batch_shape)
        shape = dist.structure.batch_shape
        flat = torch.cat([f.reshape(*shape, f.shape[nb:].numel()) for f in F], -1)
        return KKTResidual(system.point, F, torch.linalg.vector_norm(flat, dim=-1))


def _check_mu(mu: object, dist: ExpFamily) -> Params:
    """Check a candidate μ for ``kkt_residual``: the structure, shapes, dtype and device."""
    with torch.no_grad():
        want = dist._mean_params
    parts = (mu,) if len(want) == 1 else (tuple(mu) if isinstance(mu, tuple | list) else (mu,))
    what = "a tensor" if len(want) == 1 else f"a tuple of {len(want)} tensors (dist.marginals)"
    if len(parts) != len(want) or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(f"mu must be {what} shaped like dist.marginals; got {type(mu).__name__}")
    expected = [tuple(w.shape) for w in want]
    for p, w in zip(parts, want):
        assert isinstance(p, Tensor)
        if tuple(p.shape) != tuple(w.shape):
            got = [tuple(x.shape) for x in parts]
            raise ValueError(f"mu must have the shapes of dist.marginals {expected}; got {got}")
        if p.dtype != w.dtype or p.device != w.device:
            raise TypeError(
                f"mu must have the dtype and device of the potentials ({w.dtype} on "
                f"{w.device}); got {p.dtype} on {p.device}"
            )
    return tuple(parts)
