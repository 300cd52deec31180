"""The structured exact solve of the chain KKT system (a linear solver object).

On the support, the KKT matrix of the chain problem (see `structift.structures.chain.kkt`)

    K = [[ H, −Jᵀ],        H = τ∇²H_Bethe(μ) = diag(−τ/M on edges, τ c_t/m on nodes)
         [−J,   0 ]]

has the block inverse [K⁻¹]_μμ = P (Pᵀ H P)⁻¹ Pᵀ with P a basis of the null space of J. Writing
the face's points in exponential-family coordinates shows (Pᵀ(−H)P)⁻¹ is the covariance of the
sufficient statistics at θ/τ, scaled by 1/τ:

    [K⁻¹]_μμ = −(1/τ) Cov_{p_{θ/τ}}[φ] = −(1/τ) ∇²A(θ/τ),

so dμ*/dθ = −[K⁻¹]_μμ ∂F_μ/∂θ = (1/τ) ∇²A(θ/τ), the Hessian of the smoothed log-partition
A_τ(θ) = τ A(θ/τ). The covariance product is computed from μ alone by the two linear
recursions of the chain's one HVP (``Chain.hvp``, on the support: the
Schur complements of the block-bidiagonal system, eliminated position by position), and the
dual block of the solution by the backward sweep of
`structift.structures.chain.kkt.dual_sweep`. Cost: O(T Z²) time, O(T Z) memory beyond
the marginals, whatever solver produced μ.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from structift.implicit.operators import AbstractLinearOperator
from structift.implicit.solvers import AbstractTreeSolver, LinearSolution, Status
from structift.structures.chain.kkt import (
    ChainKKTPoint,
    _entropy_coefficients,
    _Support,
    chain_kkt_matvec,
    dual_sweep,
)

__all__ = ["StructuredChainSolve"]


def _norm(parts: list[Tensor], B: int) -> Tensor:
    """Euclidean norm per batch element of a list of ``[B, ...]`` tensors, ``[B]``."""
    return torch.sqrt(sum(p.reshape(B, -1).square().sum(-1) for p in parts))  # type: ignore[arg-type]


def _ratio(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, num / torch.where(mask, den, 1.0), 0.0)


class StructuredChainSolve(AbstractTreeSolver):
    """Exact solve of the chain KKT system at a solution, by covariance recursions.

    Bound to one solution (its marginals, lengths, temperature and support); used as the
    ``linear_solver`` of `structift.implicit.custom_root` for the unscaled chain residual.
    K is symmetric, so ``transpose`` is the identity. A tree solver: custom_root hands it the
    cotangent as a `structift.structures.chain.kkt.ChainKKTPoint` (``solve_tree``)
    and gets the solution back in that layout, with no flattening. The right-hand side must
    have a zero dual block (which is what the IFT backward of a function returning only μ produces);
    otherwise a ``ValueError`` is raised.

    Args:
        point: the solution, a `structift.structures.chain.kkt.ChainKKTPoint`.
        structure: the `structift.structures.chain.Chain` (its lengths and its HVP).
        temperature: τ > 0.
        support: the support masks the residual was restricted to.
        check: also solve for the dual block, measure the true residual ‖rhs − K x‖ (one
            explicit KKT product, no autograd) and raise if it exceeds ``rtol``·‖rhs‖. Off, only
            the primal block on the support is computed (the dual block is returned as zeros,
            off-support edge entries as ≈0, and the residual as NaN): that is all the IFT needs,
            because ∂F/∂θ vanishes on the dual rows and off the support.
        rtol: relative tolerance of that check (default sqrt(eps) of the dtype).
    """

    def __init__(
        self,
        point: ChainKKTPoint,
        structure: Any,
        temperature: float,
        support: _Support,
        check: bool = False,
        rtol: float | None = None,
    ) -> None:
        self.point = ChainKKTPoint(*(x.detach() for x in point))
        self.structure = structure
        self.lengths, self.tau, self.support = structure.lengths, temperature, support
        self.check = check
        m = self.point.mu_unary
        self.rtol = rtol if rtol is not None else torch.finfo(m.dtype).eps ** 0.5
        self.sizes = [x.shape[1:].numel() for x in self.point]
        self.shapes = [x.shape[1:] for x in self.point]

    def init(self, operator: AbstractLinearOperator) -> AbstractLinearOperator:
        """Keep the operator (unused: the solve and its residual check are explicit)."""
        return operator

    def transpose(self, state: AbstractLinearOperator) -> AbstractLinearOperator:
        """K is symmetric."""
        return state

    def _unflatten(self, flat: Tensor) -> list[Tensor]:
        parts = torch.split(flat, self.sizes, dim=-1)
        return [p.reshape(flat.shape[0], *s) for p, s in zip(parts, self.shapes)]

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        """Solve ``K x = rhs`` (zero dual block) for ``rhs`` ``[B, N]``."""
        x, rnorm = self._solve(self._unflatten(rhs))
        B = rhs.shape[0]
        flat = torch.cat([p.reshape(B, -1) for p in x], dim=-1)
        return LinearSolution(flat, rnorm, 0, Status.SUCCESS)

    def solve_tree(self, state: Any, rhs: ChainKKTPoint) -> LinearSolution:
        """Solve ``K x = rhs`` (zero dual block) in the layout of the KKT point."""
        x, rnorm = self._solve(list(rhs))
        return LinearSolution(cast(Tensor, ChainKKTPoint(*x)), rnorm, 0, Status.SUCCESS)

    def _solve(self, parts: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        r_node, r_edge, r_alpha, r_beta, r_nu = parts
        S = self.support
        dual_on = (
            torch.where(S.alpha, r_alpha, 0.0).abs().amax()
            if r_alpha.numel()
            else r_node.new_zeros(())
        )
        if r_beta.numel():
            dual_on = torch.maximum(dual_on, torch.where(S.beta, r_beta, 0.0).abs().amax())
        dual_on = torch.maximum(dual_on, r_nu.abs().amax())
        if bool(dual_on > 0):
            raise ValueError(
                "StructuredChainSolve solves K x = rhs only for right-hand sides with a zero "
                f"dual block (got max |rhs_dual| = {float(dual_on):.3g}); use MINRES or Dense "
                "for general right-hand sides"
            )
        x = self._solve_primal(r_node, r_edge)
        if self.check:
            x = [*x, *self._solve_dual(x[0], x[1], r_node, r_edge, r_alpha, r_beta)]
        else:
            # Only the primal block: ∂F/∂θ is zero on the dual rows, so the IFT vector-Jacobian
            # product −(∂F/∂θ)ᵀ x never reads x's dual block (returned as zeros).
            x = [*x, torch.zeros_like(r_alpha), torch.zeros_like(r_beta), torch.zeros_like(r_nu)]
        B, dtype = r_node.shape[0], r_node.dtype
        if self.check:
            Kx = chain_kkt_matvec(self.point, ChainKKTPoint(*x), self.lengths, self.tau, S)
            rnorm = _norm([r - k for r, k in zip(parts, Kx)], B)
            bnorm = _norm(parts, B)
            bad = rnorm > self.rtol * bnorm + torch.finfo(dtype).tiny
            if bool(bad.any()):
                worst = float((rnorm / bnorm.clamp_min(torch.finfo(dtype).tiny)).max())
                raise ValueError(
                    f"StructuredChainSolve: relative KKT residual {worst:.3g} > {self.rtol:.3g}; "
                    "the forward solution is not an exact solution of the chain problem "
                    "(tighten the forward solver's tolerance) or the support is degenerate"
                )
        else:
            rnorm = r_node.new_full((B,), float("nan"))
        return x, rnorm

    def _solve_primal(self, r_node: Tensor, r_edge: Tensor) -> list[Tensor]:
        m, M = self.point.mu_unary, self.point.mu_binary
        S, tau = self.support, self.tau
        # Off the support K is the identity; on it, x_μ = −(1/τ) Cov r_μ, the covariance of the
        # face: the marginals restricted to the support (subnormal masses are zero there).
        m_s = torch.where(S.node, m, 0.0)
        M_s = torch.where(S.edge, M, 0.0)
        v_node = torch.where(S.node, r_node, 0.0) * (-1 / tau)
        v_edge = torch.where(S.edge, r_edge, 0.0) * (-1 / tau)
        cu, x_edge = self.structure.hvp((m_s, M_s), (v_node, v_edge))
        x_node = torch.where(S.node, cu, r_node)
        if self.check:
            # Exact identity rows off the support (without the check only the support block is
            # used: θ's cotangent −(∂F/∂θ)ᵀ x is zero off the support whatever x holds there).
            x_edge = torch.where(S.edge, x_edge, r_edge)
        return [x_node, x_edge]

    def _solve_dual(
        self,
        x_node: Tensor,
        x_edge: Tensor,
        r_node: Tensor,
        r_edge: Tensor,
        r_alpha: Tensor,
        r_beta: Tensor,
    ) -> list[Tensor]:
        m, M = self.point.mu_unary, self.point.mu_binary
        S, tau = self.support, self.tau
        # Dual block: −Jᵀ x_λ = r_μ − H x_μ, solved by the stationarity sweep.
        c = _entropy_coefficients(self.lengths, m.shape[1], m.dtype)[..., None]
        h_node = tau * c * _ratio(x_node, m, S.node)
        h_edge = -tau * _ratio(x_edge, M, S.edge)
        base_node = torch.where(S.node, h_node - r_node, 0.0)
        base_edge = torch.where(S.edge, h_edge - r_edge, 0.0)
        alpha, beta, nu = dual_sweep(base_node, base_edge, m, M, S)
        alpha = torch.where(S.alpha, alpha, r_alpha)
        beta = torch.where(S.beta, beta, r_beta)
        return [alpha, beta, nu]
