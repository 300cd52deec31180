r"""``regularized_argmax``: μ*(θ) = argmax over the marginal polytope, differentiated by the IFT.

For an exponential family with sufficient statistics φ and marginal polytope M = conv{φ(y)},

    μ*(θ) = argmax_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) = ∇A(θ/τ),        τ > 0,

(Wainwright & Jordan 2008, Thm. 3.4). Its Jacobian dμ*/dθ = (1/τ) ∇²A(θ/τ) comes here from the
implicit function theorem on the KKT system of the problem (not from autograd through A),
through :func:`structift.implicit.custom_root`, so the forward solver is free: exact
forward-backward (or softmax) at θ/τ, or an iterative solver that never runs forward-backward.
The simplex (Categorical) is handled as the chain of length one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from structift import chain as _chain
from structift.families import HMM, Categorical, ChainMarginals, LinearChainCRF
from structift.implicit import custom_root
from structift.implicit.krylov import GMRES, MINRES
from structift.implicit.solvers import AbstractLinearSolver, Dense
from structift.variational.chain_kkt import (
    ChainKKTPoint,
    _Support,
    chain_duals,
    chain_kkt_residual,
    chain_support,
)
from structift.variational.message_passing import chain_message_passing, simplex_mirror_descent
from structift.variational.structured import StructuredChainSolve

__all__ = [
    "Exact",
    "Iterative",
    "KKTResidual",
    "Structured",
    "kkt_residual",
    "regularized_argmax",
]


@dataclass(frozen=True)
class Exact:
    """Forward solver: exact marginals at θ/τ (forward-backward for chains, softmax)."""


@dataclass(frozen=True)
class Iterative:
    """Forward solver that does not use forward-backward.

    Chains: damped parallel sum-product message passing (block coordinate ascent on the dual of
    the Bethe problem, exact on chains at convergence). Categorical: entropic mirror descent,
    log μ ← (1 − ρ) log μ + ρ θ/τ, normalized. Both stop when the max-abs change of the
    log-iterate is below ``tol``, or after ``max_iter`` steps.

    Args:
        tol: stopping tolerance on the change of the log-messages / log-iterate.
        max_iter: iteration budget.
        damping: ρ in (0, 1].
    """

    tol: float = 1e-12
    max_iter: int = 10_000
    damping: float = 0.5


@dataclass(frozen=True)
class Structured:
    """Backward linear solver: the exact structured solve of the chain KKT system.

    Bound to the forward solution inside :func:`regularized_argmax` as a
    :class:`~structift.variational.StructuredChainSolve` (covariance recursions, O(T Z²)).

    Args:
        check: also solve the dual block and measure the true KKT residual of the solve, raising
            ``ValueError`` above ``rtol``. The residual exceeds ``rtol`` when the forward
            solution is not exact. Default (None): on for an :class:`Iterative` forward solver,
            off for :class:`Exact` (whose solution is exact to rounding). Turn it off to study
            loose forward solves on purpose.
        rtol: relative tolerance of the check (default sqrt(eps) of the dtype).
    """

    check: bool | None = None
    rtol: float | None = None


ForwardSolver = Literal["exact", "iterative"] | Exact | Iterative
LinearSolverSpec = (
    Literal["structured", "dense", "minres", "gmres"] | Structured | AbstractLinearSolver
)


class KKTResidual(NamedTuple):
    """The KKT system evaluated at a point.

    Attributes:
        point: primal and dual variables, a :class:`ChainKKTPoint` (a Categorical is the chain
            of length one: ``mu_unary`` ``[B, 1, n]``).
        residual: F(point; θ), same structure.
        norm: ``‖F‖₂`` per batch element ``[B]``.
    """

    point: ChainKKTPoint
    residual: ChainKKTPoint
    norm: Tensor


def _resolve_forward(solver: ForwardSolver) -> Exact | Iterative:
    if solver == "exact":
        return Exact()
    if solver == "iterative":
        return Iterative()
    if isinstance(solver, Exact | Iterative):
        return solver
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


def _check_mu(mu: object, unary: Tensor, binary: Tensor, categorical: bool, shape: tuple) -> None:
    """Check a candidate μ for ``kkt_residual``: the structure, shapes, dtype and device."""
    expected = [shape] if categorical else [tuple(unary.shape), tuple(binary.shape)]
    what = "a tensor" if categorical else "ChainMarginals(unary, binary)"
    parts = [mu] if categorical else (list(mu) if isinstance(mu, tuple | list) else [mu])
    if len(parts) != len(expected) or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(f"mu must be {what} shaped like dist.marginals; got {type(mu).__name__}")
    for p, want in zip(parts, expected):
        if tuple(p.shape) != want:
            got = [tuple(x.shape) for x in parts]  # type: ignore[union-attr]
            raise ValueError(f"mu must have the shapes of dist.marginals {expected}; got {got}")
        if p.dtype != unary.dtype or p.device != unary.device:
            raise TypeError(
                f"mu must have the dtype and device of the potentials ({unary.dtype} on "
                f"{unary.device}); got {p.dtype} on {p.device}"
            )


def _as_chain(dist: object) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Return (unary, binary, lengths, is_categorical) for a supported family."""
    if isinstance(dist, HMM):
        dist = dist.posterior
    if isinstance(dist, LinearChainCRF):
        return dist.unary, dist.binary, dist.lengths, False
    if isinstance(dist, Categorical):
        logits = dist.logits.reshape(-1, 1, dist.logits.shape[-1])  # shape: (B, 1, n)
        n = logits.shape[-1]
        binary = logits.new_zeros(logits.shape[0], 0, n, n)
        lengths = torch.ones(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, binary, lengths, True
    raise TypeError(
        f"dist must be a structift Categorical, LinearChainCRF or HMM; got {type(dist).__name__}"
    )


def _forward(
    unary: Tensor, binary: Tensor, lengths: Tensor, tau: float, solver: Exact | Iterative
) -> tuple[Tensor, Tensor]:
    """Solve the forward problem without building a graph; return the marginals."""
    with torch.no_grad():
        if isinstance(solver, Exact):
            return _chain.marginals(unary / tau, binary / tau, lengths)
        if unary.shape[1] == 1:
            mu = simplex_mirror_descent(
                unary[:, 0], tau, solver.tol, solver.max_iter, solver.damping
            ).mu
            return mu[:, None], binary.new_zeros(binary.shape)
        res = chain_message_passing(
            unary, binary, lengths, tau, solver.tol, solver.max_iter, solver.damping
        )
        return res.mu_unary, res.mu_binary


def _scales(point: ChainKKTPoint, support: object, tau: float) -> ChainKKTPoint:
    """Diagonal scaling D of the symmetric KKT system, D K D with O(1) entries.

    Primal entries are scaled by sqrt(μ/τ) (the Hessian block becomes diag(−1 or c_t)) and each
    constraint row by sqrt(τ/m) of its node (its entries become 1 and sqrt(M/m) <= 1); off the
    support the scale is 1. Solving D K D y = D r and returning x = D y changes nothing but the
    conditioning seen by the linear solver.
    """
    m, M = point.mu_unary, point.mu_binary
    S = support
    one = torch.ones((), dtype=m.dtype, device=m.device)
    s_node = torch.where(S.node, torch.sqrt(m.clamp_min(0) / tau), one)  # type: ignore[attr-defined]
    s_edge = torch.where(S.edge, torch.sqrt(M.clamp_min(0) / tau), one)  # type: ignore[attr-defined]
    inv = torch.where(S.node, torch.sqrt(tau / m.clamp_min(torch.finfo(m.dtype).tiny)), one)  # type: ignore[attr-defined]
    s_alpha = torch.where(S.alpha, inv[:, :-1], one)  # type: ignore[attr-defined]
    s_beta = torch.where(S.beta, inv[:, 1:], one)  # type: ignore[attr-defined]
    s_nu = torch.full_like(point.nu, tau**0.5)
    return ChainKKTPoint(s_node, s_edge, s_alpha, s_beta, s_nu)


def _chain_theta_vjp(
    support: _Support, scale: ChainKKTPoint | None
) -> Callable[..., tuple[Tensor, Tensor]]:
    """Return ``(u, z, unary, binary) -> (∂F/∂θ)ᵀ u`` for the (scaled) chain KKT residual.

    θ enters F only through the stationarity rows, linearly and masked by the support:
    ``F_m ∋ where(S_node, unary, 0)`` and ``F_M ∋ where(S_edge, binary, 0)`` (the outer
    ``where`` keeps F = μ off the support; the dual rows do not contain θ). So ∂F/∂θ is the
    0/1 support mask on the μ block and zero on the dual block, and (∂F/∂θ)ᵀu is u's μ block
    masked by the support, whatever z and θ are. With the scaling D of the generic solvers,
    F_D(y) = D F(D y) and (∂F_D/∂θ)ᵀu = (∂F/∂θ)ᵀ(D u).
    """
    full_node, full_edge = bool(support.node.all()), bool(support.edge.all())

    def part(x: Tensor, s: Tensor | None, mask: Tensor, full: bool) -> Tensor:
        if s is not None:
            x = x * s
        return x if full else torch.where(mask, x, 0.0)

    def theta_vjp(
        u: ChainKKTPoint, z: object, unary: Tensor, binary: Tensor
    ) -> tuple[Tensor, Tensor]:
        s_node = None if scale is None else scale.mu_unary
        s_edge = None if scale is None else scale.mu_binary
        return (
            part(u.mu_unary, s_node, support.node, full_node),
            part(u.mu_binary, s_edge, support.edge, full_edge),
        )

    return theta_vjp


def _empty_point(unary: Tensor, binary: Tensor) -> ChainKKTPoint:
    """The solution of an empty batch: empty tensors of the right shapes, attached to θ.

    ``x.sum() * 0`` broadcast to the shape keeps the autograd edge to θ (its gradient is an
    empty tensor of θ's shape) without touching any entry.
    """
    _, T, Z = unary.shape
    link = (unary.sum() + binary.sum()) * 0

    def empty(*shape: int) -> Tensor:
        return unary.new_zeros(shape) + link

    return ChainKKTPoint(
        empty(0, T, Z), empty(0, T - 1, Z, Z), empty(0, T - 1, Z), empty(0, T - 1, Z), empty(0)
    )


def _chain_argmax(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    tau: float,
    solver: Exact | Iterative,
    linear: AbstractLinearSolver | Structured,
) -> ChainKKTPoint:
    if unary.shape[0] == 0:
        return _empty_point(unary, binary)
    m, M = _forward(unary, binary, lengths, tau, solver)
    with torch.no_grad():
        point = chain_duals(m, M, unary.detach(), binary.detach(), lengths, tau)
    support = chain_support(m, M, lengths)

    if isinstance(linear, Structured):

        def residual(z: ChainKKTPoint, u: Tensor, w: Tensor) -> ChainKKTPoint:
            return chain_kkt_residual(z, u, w, lengths, tau, support)

        check = isinstance(solver, Iterative) if linear.check is None else linear.check
        lin = StructuredChainSolve(point, lengths, tau, support, check, linear.rtol)
        theta_vjp = _chain_theta_vjp(support, None)
        root = custom_root(residual, lin, batch_ndim=1, symmetric=True, theta_vjp=theta_vjp)
        return root(lambda u, w: point)(unary, binary)

    scale = _scales(point, support, tau)
    scaled = ChainKKTPoint(*(p / s for p, s in zip(point, scale)))

    def scaled_residual(y: ChainKKTPoint, u: Tensor, w: Tensor) -> ChainKKTPoint:
        z = ChainKKTPoint(*(a * s for a, s in zip(y, scale)))
        F = chain_kkt_residual(z, u, w, lengths, tau, support)
        return ChainKKTPoint(*(f * s for f, s in zip(F, scale)))

    theta_vjp = _chain_theta_vjp(support, scale)
    root = custom_root(scaled_residual, linear, batch_ndim=1, symmetric=True, theta_vjp=theta_vjp)
    y = root(lambda u, w: scaled)(unary, binary)
    return ChainKKTPoint(*(a * s for a, s in zip(y, scale)))


def regularized_argmax(
    dist: Categorical | LinearChainCRF | HMM,
    temperature: float = 1.0,
    solver: ForwardSolver = "exact",
    linear_solver: LinearSolverSpec = "structured",
) -> Tensor | ChainMarginals:
    r"""Solve μ* = argmax_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) and differentiate it by the IFT.

    M is the family's marginal polytope (the simplex for a Categorical; node and edge marginals
    with normalization and marginalization-consistency constraints for a chain, where the local
    polytope is exact and H is the Bethe entropy). The result equals ∇A(θ/τ) (``dist.marginals``
    at τ = 1); its gradient with respect to the natural parameters θ is
    dμ*/dθ = (1/τ) ∇²A(θ/τ), computed from the KKT system by
    :func:`structift.implicit.custom_root`, never by differentiating the forward solver.

    Args:
        dist: a :class:`~structift.Categorical` (logits ``[*batch, n]``), a
            :class:`~structift.LinearChainCRF` (unary ``[B, T, Z]``, binary ``[B, T-1, Z, Z]``,
            lengths ``[B]``) or an :class:`~structift.HMM` (its posterior CRF; gradients flow on
            to the HMM's logits). −inf potentials are allowed: structures of score −∞ have
            zero mass and the KKT system is restricted to the support.
        temperature: τ > 0.
        solver: ``"exact"`` / :class:`Exact` (forward-backward or softmax at θ/τ) or
            ``"iterative"`` / :class:`Iterative` (message passing / mirror descent).
        linear_solver: how the backward solves the KKT system: ``"structured"`` or
            :class:`Structured` (exact covariance recursions, O(T Z²), default),
            ``"dense"``, ``"minres"``, ``"gmres"``, or
            any :mod:`structift.implicit` solver object (e.g. ``MINRES(rtol=1e-12)``,
            ``Neumann(...)``). Generic solvers see the diagonally scaled symmetric system.

    Returns:
        The same structure as ``dist.marginals``: a tensor ``[*batch, n]`` for a Categorical, a
        :class:`~structift.ChainMarginals` ``(unary [B, T, Z], binary [B, T-1, Z, Z])`` for a
        chain, differentiable with respect to the natural parameters.

    Raises:
        TypeError: for an unsupported ``dist``.
        ValueError: for a non-positive temperature or an unknown solver name.
    """
    tau = _check_temperature(temperature)
    fwd = _resolve_forward(solver)
    linear = _resolve_linear(linear_solver)
    unary, binary, lengths, categorical = _as_chain(dist)
    z = _chain_argmax(unary, binary, lengths, tau, fwd, linear)
    if categorical:
        assert isinstance(dist, Categorical)
        return z.mu_unary.reshape(dist.logits.shape)
    return ChainMarginals(z.mu_unary, z.mu_binary)


def kkt_residual(
    dist: Categorical | LinearChainCRF | HMM,
    mu: Tensor | ChainMarginals | None = None,
    temperature: float = 1.0,
) -> KKTResidual:
    """Evaluate the KKT residual F(μ, λ; θ) of the regularized argmax at a candidate μ.

    The duals λ are recovered from μ by the stationarity sweep, so the residual measures both
    stationarity and feasibility; it is zero (to rounding) at μ* = ∇A(θ/τ).

    Args:
        dist: the family (see :func:`regularized_argmax`).
        mu: candidate marginals, same structure as ``dist.marginals``; default: the exact
            solution at θ/τ (its residual shows the rounding floor).
        temperature: τ > 0.

    Returns:
        A :class:`KKTResidual` (point, residual, per-element norm ``[B]``).
    """
    tau = _check_temperature(temperature)
    unary, binary, lengths, categorical = _as_chain(dist)
    with torch.no_grad():
        if mu is None:
            m, M = _chain.marginals(unary / tau, binary / tau, lengths)
        elif categorical:
            assert isinstance(dist, Categorical)
            _check_mu(mu, unary, binary, True, tuple(dist.logits.shape))
            assert isinstance(mu, Tensor)
            m, M = mu.reshape(unary.shape), binary.new_zeros(binary.shape)
        else:
            _check_mu(mu, unary, binary, False, ())
            m, M = mu
        point = chain_duals(m, M, unary, binary, lengths, tau)
        F = chain_kkt_residual(point, unary, binary, lengths, tau)
        B = unary.shape[0]
        flat = torch.cat([f.reshape(B, f.shape[1:].numel()) for f in F], -1)
        return KKTResidual(point, F, torch.linalg.vector_norm(flat, dim=-1))
