r"""Structures whose log-partition is a twice-differentiable torch program (trees, segmentations).

For the structures whose combinatorics is a dynamic program over a chart (semi-Markov
segmentations, Eisner's projective trees) or a determinant (the matrix-tree theorem), the
derivatives of A(θ) come from autograd through one program, ``_log_partition_graph``:

* the marginals μ = ∇A(θ) are its gradient (Eisner 2016, "Inside-outside and forward-backward
  algorithms are just backprop"); a structure may override ``posterior`` with a faster
  first-order path that keeps no per-step graph;
* the covariance-vector product ∇²A(θ) v is its second derivative (a double backward), which
  needs θ: unlike a chain's, the covariance of tree arcs is not a function of the arc marginals.

Entropy and KL default to the Bregman forms H = A(θ) − ⟨θ, μ⟩ and
KL = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩ evaluated in float64 after ``_centre`` (a shift of θ that
leaves p unchanged and brings A to the size of the entropy: for trees, subtracting each word's
best head score), then clamped at 0, so they are ``>= 0`` by construction and their float64
rounding, ~1e-16 of the centred |A|, is far below float32 resolution. Structures with local
terms (the semi-Markov chain of segments) override them.

The entropy-regularized problem max_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) has no compact KKT system over M
for these structures (the arborescence polytope has exponentially many facets). Its optimality
condition is stated in conjugate form instead (μ = ∇A(θ/τ), the stationarity of the Fenchel
dual, Wainwright & Jordan 2008 Thm. 3.4):

    F(μ; θ) = τ (μ − ∇A(θ/τ)) = 0,     ∂F/∂μ = τ I,     −(∂F/∂θ)ᵀ u = ∇²A(θ/τ) u,

so the IFT backward is one covariance-vector product, exact, and itself differentiable.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import Tensor

from structift.implicit import AbstractLinearSolver, LinearSolution, Status
from structift.structures.base import (
    AbstractKKTSystem,
    AbstractRegularized,
    AbstractStructure,
    Exact,
    Iterative,
    Params,
)

__all__ = ["AbstractAutogradStructure", "ConjugatePoint", "ConjugateRegularized"]

_NEG_INF = float("-inf")


def _safe_inner(theta: Params, mu: Params, batch_dims: int) -> Tensor:
    """⟨θ, μ⟩ over the event dimensions with ``-inf · 0 = 0`` (and ``-inf`` where μ > 0)."""
    total = None
    for th, m in zip(theta, mu):
        th = th.expand(m.shape)
        hard = th == _NEG_INF
        term = (torch.where(hard, 0.0, th) * m).flatten(batch_dims).sum(-1)
        bad = (hard & (m > 0)).flatten(batch_dims).any(-1)
        term = torch.where(bad, _NEG_INF, term)
        total = term if total is None else total + term
    assert total is not None
    return total


class AbstractAutogradStructure(AbstractStructure):
    """A structure whose A(θ) is one twice-differentiable torch program (module docstring).

    Subclasses implement ``_log_partition_graph`` and the combinatorial methods (``argmax``,
    ``topk``, ``sample``, ``score``, ``statistics``, ``check_value``, ...); they may override
    ``posterior`` (a fast first-order path), ``_centre``, ``entropy`` and ``kl``.
    """

    @abc.abstractmethod
    def _log_partition_graph(self, theta: Params) -> Tensor:
        """A(θ) ``batch_shape`` by plain autograd-traceable torch ops (any derivative order).

        ``-inf`` exactly where no structure has finite score, with zero (not NaN) gradients
        there (use ``structift._ops.logsumexp``).
        """

    def _centre(self, theta: Params) -> Params:
        """A shift of θ that leaves p unchanged (default: none); used by entropy and KL."""
        return theta

    def log_partition(self, theta: Params) -> Tensor:
        return self._log_partition_graph(theta)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        with torch.enable_grad():
            keep = create_graph  # differentiate through θ itself, else through detached leaves
            leaves = tuple(
                t if keep and t.requires_grad else t.detach().requires_grad_() for t in theta
            )
            log_z = self._log_partition_graph(leaves)
            mu = torch.autograd.grad(log_z.sum(), leaves, create_graph=create_graph)
        feasible = torch.isfinite(log_z)
        nb = len(self.batch_shape)
        mu = tuple(
            torch.where(feasible.reshape(*feasible.shape, *(1,) * (m.dim() - nb)), m, 0.0)
            for m in mu
        )
        if not create_graph:
            log_z, mu = log_z.detach(), tuple(m.detach() for m in mu)
        return log_z, mu

    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        """``∇²A(θ) v`` by a double backward through ``_log_partition_graph`` (needs θ).

        Differentiable (for higher orders) when grad mode is on and θ or v requires grad.
        """
        if theta is None:
            raise TypeError(
                f"{type(self).__name__}.hvp needs theta: the covariance of this structure's "
                "statistics is not a function of the marginals alone"
            )
        create = torch.is_grad_enabled() and any(x.requires_grad for x in (*theta, *v))
        with torch.enable_grad():
            leaves = tuple(t if t.requires_grad else t.detach().requires_grad_() for t in theta)
            log_z = self._log_partition_graph(leaves)
            grads = torch.autograd.grad(log_z.sum(), leaves, create_graph=True)
            inner = sum((g * w).sum() for g, w in zip(grads, v))
            assert isinstance(inner, Tensor)
            out = torch.autograd.grad(inner, leaves, create_graph=create, allow_unused=True)
        out = tuple(torch.zeros_like(t) if o is None else o for o, t in zip(out, theta))
        return out if create else tuple(o.detach() for o in out)

    # ---- entropy and KL: centred Bregman forms in float64, >= 0 by construction -----------

    def _bregman_parts(self, theta: Params) -> tuple[Tensor, Params, Params]:
        theta64 = self._centre(tuple(t.detach().double() for t in theta))
        with torch.no_grad():
            log_z, mu = self.posterior(theta64)
        return log_z, mu, theta64

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        """H = A − ⟨θ, μ⟩ at the centred θ in float64, clamped at 0 (module docstring)."""
        log_z, mu64, theta64 = self._bregman_parts(theta)
        nb = len(self.batch_shape)
        out = (log_z - _safe_inner(theta64, mu64, nb)).clamp_min(0.0)
        return out.to(theta[0].dtype)

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        """KL(p ‖ q) in centred Bregman form in float64, clamped at 0; ``+inf`` if q forbids p."""
        log_zp, mu64, tp = self._bregman_parts(theta_p)
        tq = self._centre(tuple(t.detach().double() for t in theta_q))
        with torch.no_grad():
            log_zq = self.log_partition(tq)
        nb = len(self.batch_shape)
        cross = _safe_inner(tq, mu64, nb)  # -inf where q forbids what p allows
        value = log_zq - log_zp - cross + _safe_inner(tp, mu64, nb)
        value = torch.where(cross == _NEG_INF, torch.inf, value.clamp_min(0.0))
        return value.to(theta_p[0].dtype)

    # ---- the variational view ------------------------------------------------------------

    def regularized(self, temperature: float) -> AbstractRegularized:
        return ConjugateRegularized(self, temperature)


class ConjugatePoint(NamedTuple):
    """The point of the conjugate-form KKT system: the marginals ``mu`` (one-part θ)."""

    mu: Tensor


class ConjugateRegularized(AbstractRegularized):
    """``max_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ)`` in the conjugate form of the module docstring."""

    def __init__(self, structure: AbstractAutogradStructure, temperature: float) -> None:
        self.structure, self.temperature = structure, temperature

    def solve(self, theta: Params, solver: Exact | Iterative) -> Params:
        if isinstance(solver, Iterative):
            raise ValueError(
                f"regularized_argmax: {type(self.structure).__name__} has no iterative forward "
                "solver (its polytope has no local description to iterate on); use "
                "solver='exact'"
            )
        tau = self.temperature
        return self.structure.posterior(tuple(t.detach() / tau for t in theta))[1]

    def at(self, mu: Params, theta: Params) -> ConjugateKKTSystem:
        if len(theta) != 1:
            raise TypeError("ConjugateRegularized supports structures with one-part θ")
        return ConjugateKKTSystem(self.structure, mu[0], self.temperature)

    def empty(self, theta: Params) -> ConjugatePoint:
        link = theta[0].sum() * 0  # keeps the autograd edge to θ
        return ConjugatePoint(torch.zeros_like(theta[0]) + link)

    def mu(self, z: Any) -> Params:
        return (z.mu,)


class _ScaledIdentity(AbstractLinearSolver):
    """Solves ``τ I x = b``: the exact solve of ``∂F/∂μ`` of the conjugate KKT system."""

    def __init__(self, temperature: float) -> None:
        self.tau = temperature

    def init(self, operator: Any) -> Any:
        return operator

    def transpose(self, state: Any) -> Any:
        return state

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        sol = rhs / self.tau
        rnorm = torch.linalg.vector_norm(rhs - state.mv(sol), dim=-1)
        return LinearSolution(sol, rnorm, 0, Status.SUCCESS)


class ConjugateKKTSystem(AbstractKKTSystem):
    """``F(μ; θ) = τ (μ − ∇A(θ/τ))`` at one solution (module docstring)."""

    def __init__(self, structure: AbstractAutogradStructure, mu: Tensor, temperature: float):
        self.structure, self.temperature = structure, temperature
        self.point = ConjugatePoint(mu.detach())

    def __call__(self, z: Any, *theta: Tensor) -> ConjugatePoint:
        tau = self.temperature
        graph = torch.is_grad_enabled() and any(t.requires_grad for t in theta)
        _, mu = self.structure.posterior(tuple(t / tau for t in theta), create_graph=graph)
        return ConjugatePoint(tau * (z.mu - mu[0]))

    def theta_cotangent(self, u: Any, z: Any, *theta: Tensor) -> Params:
        """``−(∂F/∂θ)ᵀ u = ∇²A(θ/τ) u``: one covariance-vector product."""
        tau = self.temperature
        return self.structure.hvp((z.mu,), (u.mu,), tuple(t / tau for t in theta))

    def structured_solver(self, check: bool, rtol: float | None) -> AbstractLinearSolver:
        return _ScaledIdentity(self.temperature)

    def scales(self) -> ConjugatePoint:
        return ConjugatePoint(torch.full_like(self.point.mu, self.temperature**-0.5))
