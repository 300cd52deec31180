"""The chain's entropy-regularized argmax: forward solvers and its KKT system (``kkt``).

``ChainRegularized.solve`` runs forward-backward at θ/τ (``Exact``) or damped message passing
(``Iterative``); ``at`` recovers the duals and fixes the support, giving a ``ChainKKT`` whose
exact linear solve is the chain's covariance recursions (``kkt_solve``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structift.structures.base import (
    AbstractKKTSystem,
    AbstractRegularized,
    Exact,
    Iterative,
    Params,
)
from structift.structures.chain.kkt import (
    ChainKKTPoint,
    chain_duals,
    chain_kkt_residual,
    chain_support,
)
from structift.structures.chain.kkt_solve import StructuredChainSolve
from structift.structures.chain.message_passing import chain_message_passing

__all__ = ["ChainKKT", "ChainRegularized"]


class ChainRegularized(AbstractRegularized):
    """``max_μ ⟨θ, μ⟩ + τ H(μ)`` over a chain's marginal polytope (``kkt`` has the system)."""

    def __init__(self, structure: Any, temperature: float) -> None:
        self.structure, self.temperature = structure, temperature

    def solve(self, theta: Params, solver: Exact | Iterative) -> Params:
        unary, binary = theta
        tau, lengths = self.temperature, self.structure.lengths
        with torch.no_grad():
            if isinstance(solver, Exact):
                return self.structure.posterior((unary / tau, binary / tau))[1]
            B, T, Z = unary.shape
            res = chain_message_passing(
                unary, binary.expand(B, T - 1, Z, Z), lengths, tau,
                solver.tol, solver.max_iter, solver.damping,
            )  # fmt: skip
            return res.mu_unary, res.mu_binary

    def at(self, mu: Params, theta: Params) -> ChainKKT:
        return ChainKKT(self, mu, theta)

    def empty(self, theta: Params) -> ChainKKTPoint:
        unary, binary = theta
        _, T, Z = unary.shape
        link = (unary.sum() + binary.sum()) * 0  # keeps the autograd edge to θ

        def empty(*shape: int) -> Tensor:
            return unary.new_zeros(shape) + link

        return ChainKKTPoint(
            empty(0, T, Z), empty(0, T - 1, Z, Z), empty(0, T - 1, Z), empty(0, T - 1, Z), empty(0)
        )

    def mu(self, z: Any) -> Params:
        return z.mu_unary, z.mu_binary


class ChainKKT(AbstractKKTSystem):
    """The chain KKT system at one solution (see ``kkt``), support fixed from μ."""

    def __init__(self, problem: ChainRegularized, mu: Params, theta: Params) -> None:
        self.problem = problem
        self.lengths, self.tau = problem.structure.lengths, problem.temperature
        m, M = mu
        unary, binary = (x.detach() for x in theta)
        with torch.no_grad():
            self.point = chain_duals(m, M, unary, binary.expand(M.shape), self.lengths, self.tau)
        self.support = chain_support(m, M, self.lengths)

    def __call__(self, z: Any, *theta: Tensor) -> ChainKKTPoint:
        unary, binary = theta
        return chain_kkt_residual(z, unary, binary, self.lengths, self.tau, self.support)

    def structured_solver(self, check: bool, rtol: float | None) -> StructuredChainSolve:
        structure = self.problem.structure
        return StructuredChainSolve(self.point, structure, self.tau, self.support, check, rtol)

    def scales(self) -> ChainKKTPoint:
        """Diagonal scaling D of the symmetric KKT system, D K D with O(1) entries.

        Primal entries are scaled by sqrt(μ/τ) (the Hessian block becomes diag(−1 or c_t)) and
        each constraint row by sqrt(τ/m) of its node (its entries become 1 and sqrt(M/m) <= 1);
        off the support the scale is 1. Solving D K D y = D r and returning x = D y changes
        nothing but the conditioning seen by the linear solver.
        """
        m, M, S, tau = self.point.mu_unary, self.point.mu_binary, self.support, self.tau
        one = torch.ones((), dtype=m.dtype, device=m.device)
        s_node = torch.where(S.node, torch.sqrt(m.clamp_min(0) / tau), one)
        s_edge = torch.where(S.edge, torch.sqrt(M.clamp_min(0) / tau), one)
        inv = torch.where(S.node, torch.sqrt(tau / m.clamp_min(torch.finfo(m.dtype).tiny)), one)
        s_alpha = torch.where(S.alpha, inv[:, :-1], one)
        s_beta = torch.where(S.beta, inv[:, 1:], one)
        return ChainKKTPoint(
            s_node, s_edge, s_alpha, s_beta, torch.full_like(self.point.nu, tau**0.5)
        )

    def theta_cotangent(self, u: Any, z: Any, *theta: Tensor) -> Params:
        """``−(∂F/∂θ)ᵀ u``: θ enters F linearly, masked by the support, in the μ rows only.

        ``F_m ∋ where(S_node, unary, 0)`` and ``F_M ∋ where(S_edge, binary, 0)`` (off the support
        F = μ; the dual rows hold no θ), so ``−(∂F/∂θ)ᵀ u`` is −u's μ block on the support,
        whatever z and θ are: one pass, no autograd.
        """
        S = self.support
        return torch.where(S.node, -u.mu_unary, 0.0), torch.where(S.edge, -u.mu_binary, 0.0)
