r"""SparseMAP: the L2-regularized argmax over a structure's marginal polytope, with an IFT backward.

For a structure with statistics φ(y) = (φ_U(y), φ_P(y)) (φ_U the first, "node" part: the
logits' one-hot for the simplex, the unary statistics of a chain; φ_P the rest, e.g. a chain's
pairwise statistics, left unregularized) and M = conv{φ(y)},

    μ*(θ) = argmax_{μ ∈ M}  ⟨θ, μ⟩ − (τ/2) ‖μ_U‖²                    (Niculae et al., 2018,
                                                                    arXiv:1802.04223)

a quadratic program whose solution is a sparse convex combination μ* = Σ_{s∈S} α_s φ(y_s) of
a few structures (the active set S, at most dim + 1 of them by Carathéodory). On the simplex
it is sparsemax(θ/τ). The forward is an active-set method that only calls the structure's
``argmax`` oracle (``structift.variational._active_set``). The backward is the implicit function
theorem (``structift.implicit.custom_root``) on the KKT system of the QP restricted to S, in the
weights α and the multiplier ν of Σα = 1:

    F_α = τ M_S α + ν 1 − c_S(θ) = 0,   F_ν = 1ᵀα − 1 = 0,      c_s(θ) = ⟨θ, φ(y_s)⟩,

with M_st = ⟨φ_U(y_s), φ_U(y_t)⟩. Its Jacobian [[τ M_S, 1], [1ᵀ, 0]] is nonsingular because
the forward leaves S affinely independent in φ_U; a vector-Jacobian product is one
(|S|+1)-dimensional solve and ∇_θ = Σ_s u_s φ(y_s). This is the exact derivative where the
solution is non-degenerate (α_s > 0 on S, every other structure strictly suboptimal for the
linearized potentials). At a degenerate solution (a structure whose weight could enter or leave
at zero) the Jacobian returned is that of the system on the support S = {α > 0}: the
one-sided derivative along every direction that keeps the tied structures out, and an element
of the Clarke generalized Jacobian (the limit of derivatives at nearby non-degenerate points).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from structift.families import ExpFamily
from structift.implicit import (
    AbstractLinearSolver,
    AbstractResidual,
    ConvergenceError,
    ConvergenceWarning,
    Dense,
    LinearSolution,
    MatrixOperator,
    custom_root,
)
from structift.structures.base import AbstractStructure, Params
from structift.variational._active_set import ActiveSetState, active_set_solve, statistics_rows
from structift.variational.argmax import _check_dist, _check_temperature

__all__ = ["ActiveSet", "SparseMAPResult", "SparseMAPStatus", "solve_active_set", "sparsemap"]

OnFailure = Literal["raise", "warn"]


class ActiveSet(NamedTuple):
    """The structures of the solution and their weights: μ* = Σ_k weights[..., k] φ(values[k]).

    Attributes:
        values: ``[K, *batch, *event]`` structures (slot first, like ``dist.topk``).
        weights: ``[*batch, K]`` convex weights (differentiable); 0 on unused slots.
        active: ``[*batch, K]`` bool, the slots in the active set (weights > 0).
    """

    values: Tensor
    weights: Tensor
    active: Tensor


class SparseMAPStatus(NamedTuple):
    """How the forward went, per batch element.

    Attributes:
        iterations: ``[*batch]`` active-set iterations.
        gap: ``[*batch]`` the Frank-Wolfe duality gap max_y ⟨η, φ(y)⟩ − ⟨η, μ⟩ at the last
            oracle call, η = θ − τ (μ_U, 0): an upper bound on the suboptimality of μ.
        converged: ``[*batch]`` bool: ``gap <= tol · scale`` (see `sparsemap`), or the oracle
            returned a structure already in the active set (the gap is then rounding).
    """

    iterations: Tensor
    gap: Tensor
    converged: Tensor


class SparseMAPResult(NamedTuple):
    """The result of `sparsemap`: marginals (like ``dist.marginals``), active set, status."""

    marginals: Any
    active_set: ActiveSet
    status: SparseMAPStatus


class SparseMAPPoint(NamedTuple):
    """A primal-dual point of the restricted QP: ``alpha [*batch, K]``, ``nu [*batch, 1]``."""

    alpha: Tensor
    nu: Tensor


class RestrictedKKT(AbstractResidual):
    """``F(α, ν; θ)`` of the module docstring on the active set (identity off it).

    The statistics of the slots are held as one matrix Φ ``[Bf, K, D]`` (every part flattened),
    so scores, marginals and θ-cotangents are batched matrix products: c = Φ θ, μ = Φᵀ α.
    """

    def __init__(self, structure: AbstractStructure, state: ActiveSetState, tau: float) -> None:
        self.tau, self.batch = tau, structure.batch_shape
        K = state.values.shape[0]
        self.active = state.active.reshape(*self.batch, K)
        self.gram = state.gram.reshape(*self.batch, K, K)
        assert state.phi is not None
        self.phi = state.phi
        parts = structure.statistics(state.values[:1], state.phi.dtype)
        self.shapes = [p.shape[1:] for p in parts]  # (*batch, *part) per part

    def flat(self, parts: Params) -> Tensor:
        """Parts shaped like θ (broadcastable) as one ``[Bf, D]`` matrix."""
        Bf = self.phi.shape[0]
        return torch.cat([p.expand(s).reshape(Bf, -1) for p, s in zip(parts, self.shapes)], -1)

    def unflat(self, x: Tensor) -> Params:
        """``[Bf, D]`` back to the statistics' parts ``(*batch, *part)``."""
        sizes = [s[len(self.batch) :].numel() for s in self.shapes]
        return tuple(c.reshape(s) for c, s in zip(x.split(sizes, -1), self.shapes))

    def combine(self, w: Tensor) -> Params:
        """``Σ_k w[..., k] φ(y_k)`` per part, for weights ``w`` ``[*batch, K]``."""
        w = w.reshape(self.phi.shape[0], 1, -1)
        return self.unflat((w @ self.phi.to(w.dtype))[:, 0])

    def __call__(self, z: SparseMAPPoint, *theta: Tensor) -> SparseMAPPoint:
        alpha, nu = z
        # −inf potentials never meet an active structure's statistics: read them as 0.
        safe = tuple(torch.where(torch.isneginf(t), 0.0, t) for t in theta)
        c = (self.phi.to(alpha.dtype) @ self.flat(safe)[..., None])[..., 0]
        c = c.reshape(alpha.shape)  # shape: (*batch, K)
        gram = self.gram.to(alpha.dtype)
        stationarity = self.tau * (gram @ alpha[..., None])[..., 0] + nu - c
        F_alpha = torch.where(self.active, stationarity, alpha)
        F_nu = torch.where(self.active, alpha, 0.0).sum(-1, keepdim=True) - 1
        return SparseMAPPoint(F_alpha, F_nu)

    def theta_cotangent(self, u: SparseMAPPoint, z: Any, *theta: Tensor) -> tuple[Tensor, ...]:
        """``−(∂F/∂θ)ᵀ u = Σ_{s∈S} u_s φ(y_s)``: θ enters F only through the scores c_s."""
        parts = self.combine(torch.where(self.active, u.alpha, 0.0))
        return tuple(g.sum_to_size(t.shape) for g, t in zip(parts, theta))


class RestrictedKKTSolve(AbstractLinearSolver):
    """The exact solve of K = ∂F/∂(α, ν) = [[τ M_S, 1], [1ᵀ, 0]] (identity off S), in float64.

    K is explicit (the Gram matrix of the active set), so it is never materialized through
    vector-Jacobian products; it is factorized once in float64 whatever θ's dtype (its
    condition grows with |S| and T, past what float32 resolves) by `structift.implicit.Dense`,
    which also raises `structift.implicit.SingularSystemError` if it is numerically singular.
    """

    def __init__(self, state: ActiveSetState, tau: float) -> None:
        active = state.active
        e = active.to(torch.float64)
        Bf, K = active.shape
        top = tau * state.gram * e[:, :, None] * e[:, None, :] + torch.diag_embed(1 - e)
        matrix = torch.zeros(Bf, K + 1, K + 1, dtype=torch.float64, device=e.device)
        matrix[:, :K, :K] = top
        matrix[:, :K, K] = e
        matrix[:, K, :K] = e
        self.operator = MatrixOperator(matrix, symmetric=True)
        self.dense = Dense()

    def init(self, operator: Any) -> Any:
        """Factorize the explicit float64 matrix (``operator``, ∂F/∂z, is not needed)."""
        return self.dense.init(self.operator)

    def transpose(self, state: Any) -> Any:
        """K is symmetric."""
        return state

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        """Solve in float64; return the solution and residual in the dtype of ``rhs``."""
        out = self.dense.solve(state, rhs.to(torch.float64))
        return out._replace(
            solution=out.solution.to(rhs.dtype), residual_norm=out.residual_norm.to(rhs.dtype)
        )


def _check_theta(theta: Params) -> None:
    for i, t in enumerate(theta):
        if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
            raise ValueError(
                f"sparsemap: the natural parameters of dist (part {i}, shape {tuple(t.shape)}) "
                "contain NaN or +inf; expected finite values (-inf marks a forbidden part)"
            )


def _check_options(max_iter: object, tol: object, on_failure: object) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"sparsemap: max_iter must be an int >= 1; got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 < tol < 1:
        raise ValueError(f"sparsemap: tol must be a number in (0, 1); got {tol!r}")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f"sparsemap: on_failure must be 'raise' or 'warn'; got {on_failure!r}")


def _empty(dist: ExpFamily, theta: Params) -> SparseMAPResult:
    structure = dist.structure
    batch, event = structure.batch_shape, structure.event_shape
    link = sum(t.sum() for t in theta) * 0  # keeps the autograd edge to θ
    values = torch.zeros((0, *batch, *event), dtype=torch.long, device=theta[0].device)
    one = torch.zeros((*batch, *event), dtype=torch.long, device=theta[0].device)
    mu = tuple(p + link for p in structure.statistics(one, theta[0].dtype))
    weights = theta[0].new_zeros((*batch, 0)) + link
    status = SparseMAPStatus(
        torch.zeros(batch, dtype=torch.long, device=one.device),
        theta[0].new_zeros(batch, dtype=torch.float64),
        torch.ones(batch, dtype=torch.bool, device=one.device),
    )
    return SparseMAPResult(dist._present(mu), ActiveSet(values, weights, weights > 0), status)


def _report(state: ActiveSetState, max_iter: int, on_failure: OnFailure) -> None:
    if bool(state.converged.all()):
        return
    failed = ~state.converged
    message = (
        f"sparsemap did not converge in max_iter={max_iter} iterations for "
        f"{int(failed.sum())} of {failed.numel()} batch elements (largest duality gap "
        f"{float(state.gap[failed].max()):.3g}); raise max_iter or tol, or pass "
        "on_failure='warn' to accept the approximate solution"
    )
    if on_failure == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return
    raise ConvergenceError(message, systems=failed)


def _point(state: ActiveSetState, tau: float, batch: torch.Size, dtype) -> SparseMAPPoint:
    """α and ν = ⟨η, μ⟩ (the common value of c_s − τ (Mα)_s on S), in ``dtype``."""
    alpha = state.alpha
    reduced = state.scores - tau * (state.gram @ alpha[..., None])[..., 0]
    nu = (alpha * reduced).sum(-1, keepdim=True)
    K = alpha.shape[-1]
    return SparseMAPPoint(alpha.reshape(*batch, K).to(dtype), nu.reshape(*batch, 1).to(dtype))


def _compact(structure: AbstractStructure, state: ActiveSetState, dtype) -> ActiveSetState:
    """Drop zero-weight slots from S and slots no element uses; fill in Φ ``[Bf, K, D]``."""
    active = state.active & (state.alpha > 0)
    keep = active.any(0)
    keep[0] = keep[0] | ~keep.any()
    idx = keep.nonzero()[:, 0]
    values = state.values[idx]
    return ActiveSetState(
        values,
        active[:, idx],
        torch.where(active, state.alpha, 0.0)[:, idx],
        statistics_rows(structure, values, dtype),
        state.gram[:, idx][:, :, idx],
        state.scores[:, idx],
        state.gap,
        state.iterations,
        state.converged,
    )


def sparsemap(
    dist: ExpFamily,
    temperature: float = 1.0,
    *,
    max_iter: int = 10_000,
    tol: float = 1e-12,
    on_failure: OnFailure = "raise",
) -> SparseMAPResult:
    r"""Solve μ* = argmax_{μ ∈ M} ⟨θ, μ⟩ − (τ/2)‖μ_U‖² and differentiate it by the IFT.

    See the module docstring for the problem, the active set and the backward. The forward
    stops when the duality gap is at most ``tol · (1 + max_s |c_s| + τ max_s ‖φ_U(y_s)‖²)``
    (c_s the scores of the active structures: the scale of the gap's rounding).

    Args:
        dist: a structift distribution with an ``argmax`` (a `structift.Categorical`, a
            `structift.LinearChainCRF`, an `structift.HMM` posterior, ...). −inf potentials
            are allowed (forbidden structures never enter the active set).
        temperature: τ > 0; τ → 0 gives the MAP structure, τ → ∞ spreads the weight.
        max_iter: active-set iteration budget (each adds or removes at most one structure).
        tol: relative tolerance on the duality gap, in (0, 1); the default 1e-12 ends at the
            exact solution of the QP (to rounding) in float64.
        on_failure: ``"raise"`` (`structift.implicit.ConvergenceError`) or ``"warn"``
            (`structift.implicit.ConvergenceWarning`, the approximate solution is returned;
            its gradient is then that of the QP on the current active set).

    Returns:
        `SparseMAPResult`: ``marginals`` in the structure of ``dist.marginals``, differentiable
        in the natural parameters; the `ActiveSet`; the `SparseMAPStatus`.

    Raises:
        TypeError: ``dist`` is not a structift distribution, or a bad temperature type.
        ValueError: a non-positive temperature, bad options, NaN/+inf potentials, or an element
            whose potentials forbid every structure.
        ConvergenceError: the budget ran out first (with ``on_failure="raise"``).
    """
    tau = _check_temperature(temperature)
    dist = _check_dist(dist)
    theta = dist._natural_params
    structure = dist.structure
    batch = structure.batch_shape
    if batch.numel() == 0:
        _check_options(max_iter, tol, on_failure)
        return _empty(dist, theta)
    solution = solve_active_set(dist, tau, max_iter, tol, on_failure)
    with torch.no_grad():
        state = _compact(structure, solution, theta[0].dtype)
    residual = RestrictedKKT(structure, state, tau)
    point = _point(state, tau, batch, theta[0].dtype)
    solver = RestrictedKKTSolve(state, tau)
    root = custom_root(residual, solver, batch_ndim=len(batch), symmetric=True)
    z = root(lambda *t: point)(*theta)
    mu = residual.combine(z.alpha)
    K = state.values.shape[0]
    active_set = ActiveSet(state.values, z.alpha, state.active.reshape(*batch, K))
    status = SparseMAPStatus(
        state.iterations.reshape(batch), state.gap.reshape(batch), state.converged.reshape(batch)
    )
    return SparseMAPResult(dist._present(mu), active_set, status)


def solve_active_set(
    dist: ExpFamily, tau: float, max_iter: int, tol: float, on_failure: OnFailure
) -> ActiveSetState:
    """Check the options and potentials, run the active-set forward, report non-convergence.

    The state's statistics Φ are not built (``phi`` is None): callers that need only the
    structures and weights (`structift.variational.sparsemap_loss`) skip that cost.
    """
    _check_options(max_iter, tol, on_failure)
    theta, structure = dist._natural_params, dist.structure
    with torch.no_grad():
        _check_theta(theta)
        _, best = structure.argmax(theta)
        if bool(torch.isneginf(best).any()):
            index = tuple(int(i) for i in torch.isneginf(best).nonzero()[0])
            raise ValueError(
                f"sparsemap: no structure has finite score at batch index {index} of dist "
                "(its potentials forbid every outcome); relax the -inf constraints there"
            )
        solution = active_set_solve(structure, theta, tau, max_iter, tol)
    _report(solution, max_iter, on_failure)
    return solution
