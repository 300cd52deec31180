"""The inner problem λ*(θ, x) = argmax_λ ELBO(λ; θ, x, ε), solved and differentiated.

Solver: K steps of gradient ascent with heavy-ball momentum (Polyak 1964) from λ₀ (SA-VAE
refines with SGD plus momentum too),

    v ← β v + ρ tanh(α ∇_λ ELBO(λ) / ρ),    λ ← λ + v,    v₀ = 0,

with α = 0.05, β = 0.8, ρ = 0.5. The soft cap ρ tanh(·/ρ) is the identity to first order
near the optimum and keeps a step at most ρ per coordinate far from it (the log-std enters
the ELBO through e^(2s), so an uncapped step from a too-wide q can overshoot to σ ≈ 0).
Heavy ball is stable while α·L < 2(1 + β), i.e. for curvatures L of −ELBO up to 72: the
digits model's Hessian has eigenvalues in about [0.5, 15] once trained, but up to ≈ 70
early in SA-VAE training, where α = 0.1, β = 0.5 (stable to L = 30) diverged. It contracts
by about √β ≈ 0.9 per step. (A diagonal "natural" preconditioner diag(σ², ½) was tried
and is worse: the mean block couples latent dims, so Jacobi scaling widens the spectrum.)
The fixed points are exactly the stationary points ∇_λ ELBO = 0 with v = 0.

Differentiation:

- ``refine_unrolled``: autograd records every step (SA-VAE, Kim et al. arXiv:1802.02550);
  memory grows linearly in K, and gradients reach λ₀ (hence the inference network).
- ``refine_ift``: the K steps run without a graph; ``custom_root`` on the stationarity
  residual F(λ; θ) = −∇_λ ELBO(λ; θ, x, ε) supplies the backward. ∂F/∂λ = −∇²_λ ELBO is
  symmetric, and positive definite at a strict local maximum, so the transposed solve runs
  by conjugate gradients on Hessian-vector products. λ₀ is an argument of the solver but not
  of F: ∂F/∂λ₀ = 0, so the gradient it receives through λ* is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from savi.model import GaussianVAE, Params, Posterior
from structift.implicit import (
    CG,
    MINRES,
    AbstractLinearOperator,
    AbstractLinearSolver,
    LinearSolution,
    custom_root,
)


@dataclass(frozen=True)
class Inner:
    """Heavy-ball ascent on the ELBO in λ: step ``lr`` (α), ``momentum`` (β), cap ``radius`` (ρ)."""

    lr: float = 0.05
    momentum: float = 0.8
    radius: float = 0.5

    def clip(self, grad: Tensor) -> Tensor:
        """Return ρ tanh(α g / ρ): the step α g, softly capped at ρ per coordinate."""
        return self.radius * torch.tanh(self.lr * grad / self.radius)


def _leaf(t: Tensor) -> Tensor:
    """Return ``t`` itself if it is in a graph, else a detached copy that requires grad."""
    return t if t.requires_grad else t.detach().requires_grad_(True)


def elbo_grad(
    model: GaussianVAE,
    lam: Posterior,
    params: Params,
    x: Tensor,
    eps: Tensor,
    create_graph: bool,
) -> Posterior:
    """Return ∇_λ ELBO(λ; θ, x, ε) per example (the ELBO is a sum over the batch)."""
    with torch.enable_grad():
        m, s = _leaf(lam.mean), _leaf(lam.log_std)
        value = model.elbo(Posterior(m, s), params, x, eps).sum()
        gm, gs = torch.autograd.grad(value, (m, s), create_graph=create_graph)
    return Posterior(gm, gs)


def refine_unrolled(
    model: GaussianVAE,
    params: Params,
    x: Tensor,
    eps: Tensor,
    lam0: Posterior,
    steps: int,
    inner: Inner,
    create_graph: bool = True,
) -> Posterior:
    """Run ``steps`` heavy-ball ascent steps on the ELBO from λ₀, recording them for autograd.

    v ← β v + α ∇_λ ELBO(λ), λ ← λ + v, from v = 0. With ``create_graph=False`` (the
    IFT's forward) nothing is recorded.
    """
    lam = lam0
    vm, vs = torch.zeros_like(lam0.mean), torch.zeros_like(lam0.log_std)
    for _ in range(steps):
        grad = elbo_grad(model, lam, params, x, eps, create_graph=create_graph)
        vm = inner.momentum * vm + inner.clip(grad.mean)
        vs = inner.momentum * vs + inner.clip(grad.log_std)
        lam = Posterior(lam.mean + vm, lam.log_std + vs)
    return lam if create_graph else lam.detach()


def stationarity(
    model: GaussianVAE, lam: Posterior, params: Params, x: Tensor, eps: Tensor
) -> Tensor:
    """Return ‖∇_λ ELBO‖ per example, ``[B]``: zero exactly at a stationary point."""
    g = elbo_grad(model, lam, params, x, eps, create_graph=False)
    return torch.cat([g.mean, g.log_std], dim=-1).norm(dim=-1)


@dataclass
class SolveLog:
    """What the backward's linear solves did: iterations and true residual norms."""

    iterations: list[int]
    residual: list[float]
    rhs: list[float]

    @classmethod
    def empty(cls) -> SolveLog:
        return cls([], [], [])


class Recorded(AbstractLinearSolver):
    """A linear solver that records every solve's statistics in a `SolveLog` (final).

    custom_root keeps the `LinearSolution` of its backward to itself; wrapping the
    solver is how a caller reports the residual of the IFT's linear solve.
    """

    def __init__(self, inner: AbstractLinearSolver, log: SolveLog) -> None:
        self.inner, self.log = inner, log

    def init(self, operator: AbstractLinearOperator) -> Any:
        return self.inner.init(operator)

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        sol = self.inner.solve(state, rhs)
        self.log.iterations.append(sol.iterations)
        self.log.residual.append(float(sol.residual_norm.max()))
        self.log.rhs.append(float(rhs.norm(dim=-1).max()))
        return sol

    def transpose(self, state: Any) -> Any:
        return self.inner.transpose(state)


def linear_solver(name: str, dtype: torch.dtype, log: SolveLog) -> Recorded:
    """Return CG or MINRES with the dtype's tolerance, recording into ``log``."""
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    inner = {"cg": CG, "minres": MINRES}[name](rtol=rtol, max_iter=500)
    return Recorded(inner, log)


def refine_ift(
    model: GaussianVAE,
    params: Params,
    x: Tensor,
    eps: Tensor,
    lam0: Posterior,
    steps: int,
    inner: Inner,
    solver: AbstractLinearSolver,
) -> Posterior:
    """Return λ_K ≈ λ* with the implicit-function-theorem backward of ``custom_root``.

    Invariant: F(λ_K; θ, x, ε) = −∇_λ ELBO ≈ 0; the gradient is that of the exact root
    λ*(θ), so it is as accurate as λ_K is stationary (check with `stationarity`).
    """

    def residual(lam: Posterior, params: Params, x: Tensor, eps: Tensor, lam0: Posterior):
        g = elbo_grad(model, lam, params, x, eps, create_graph=True)
        return Posterior(-g.mean, -g.log_std)

    @custom_root(residual, solver, batch_ndim=1, symmetric=True)
    def solve(params: Params, x: Tensor, eps: Tensor, lam0: Posterior) -> Posterior:
        const = tuple(p.detach() for p in params)
        return refine_unrolled(model, const, x, eps, lam0.detach(), steps, inner, False)

    return solve(params, x, eps, lam0)
