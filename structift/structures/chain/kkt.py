r"""KKT system of the entropy-regularized argmax over a chain's marginal polytope.

Problem (per sequence of length L, temperature τ > 0):

    max_μ  ⟨u, m⟩ + ⟨w, M⟩ + τ H(μ)
    s.t.   Σ_j M_t[i, j] = m_t[i]      (t < L-1)          dual α_t[i]
           Σ_i M_t[i, j] = m_{t+1}[j]  (t < L-1)          dual β_t[j]
           Σ_i m_0[i] = 1                                   dual ν
           μ ≥ 0

with the Bethe entropy, exact on a chain (a tree):
H(μ) = Σ_t H(M_t) − Σ_t c_t H(m_t),  c_t = deg(t) − 1 ∈ {−1, 0, 1}.
On a tree the local polytope is the marginal polytope, so the solution is μ* = ∇A(θ/τ).

The residual F(z; θ) with z = (m, M, α, β, ν) stacks stationarity of the Lagrangian and the
(negated) equality constraints, so that ∂F/∂z is symmetric:

    F_M[t,i,j] = w_t[i,j] − τ(log M_t[i,j] + 1) − α_t[i] − β_t[j]
    F_m[t,i]   = u_t[i] + τ c_t (log m_t[i] + 1) + α_t[i] + β_{t-1}[i] − [t = 0] ν
    F_α[t,i]   = m_t[i] − Σ_j M_t[i,j]
    F_β[t,j]   = m_{t+1}[j] − Σ_i M_t[i,j]
    F_ν        = 1 − Σ_i m_0[i]

Restriction to the support. Structures with score −∞ have zero mass, and μ ≥ 0 is active
exactly there. The system is written on the support S = {μ > tiny}; an off-support primal
entry keeps the residual F = μ and an off-support dual (the constraint of a zero-mass node, or
padding) keeps F = λ, so ∂F/∂z is block diagonal: the identity off the support, the KKT matrix
of the face on it. On the support μ > 0, so the Hessian block τ∇²H is finite; the constraint
Jacobian restricted to S has full row rank; and the reduced Hessian is negative definite on
the face's tangent space (strict concavity of the tree entropy on the relative interior of a
face). Hence ∂F/∂z is nonsingular and the implicit function theorem applies (see the docs).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ChainKKTPoint",
    "chain_duals",
    "chain_kkt_matvec",
    "chain_kkt_residual",
    "chain_support",
    "dual_sweep",
]


class ChainKKTPoint(NamedTuple):
    """Primal and dual variables of the chain KKT system.

    Attributes:
        mu_unary: node marginals ``[B, T, Z]``.
        mu_binary: edge marginals ``[B, T-1, Z, Z]`` laid out ``[from, to]``.
        alpha: duals of the row-sum constraints ``[B, T-1, Z]``.
        beta: duals of the column-sum constraints ``[B, T-1, Z]``.
        nu: dual of the normalization ``[B]``.
    """

    mu_unary: Tensor
    mu_binary: Tensor
    alpha: Tensor
    beta: Tensor
    nu: Tensor


class _Support(NamedTuple):
    node: Tensor  # bool [B, T]: node (t, i) has mass
    edge: Tensor  # bool [B, T-1, Z, Z]
    alpha: Tensor  # bool [B, T-1, Z]: row constraint of node (t, i) is active
    beta: Tensor  # bool [B, T-1, Z]: column constraint of node (t+1, j) is active


def _masks(lengths: Tensor, T: int) -> tuple[Tensor, Tensor]:
    pos = torch.arange(T, device=lengths.device)
    node = pos[None, :] < lengths[:, None]  # shape: (B, T)
    edge = pos[None, : T - 1] < lengths[:, None] - 1  # shape: (B, T-1)
    return node, edge


def chain_support(mu_unary: Tensor, mu_binary: Tensor, lengths: Tensor) -> _Support:
    """Return the support masks of a chain solution: entries with mass above ``tiny``.

    Args:
        mu_unary: ``[B, T, Z]``; mu_binary: ``[B, T-1, Z, Z]``; lengths: LongTensor ``[B]``.
    """
    tiny = torch.finfo(mu_unary.dtype).tiny
    T = mu_unary.shape[1]
    node_pos, edge_pos = _masks(lengths, T)
    node = (mu_unary > tiny) & node_pos[..., None]
    edge = (mu_binary > tiny) & edge_pos[..., None, None]
    alpha = node[:, :-1] & edge_pos[..., None]
    beta = node[:, 1:] & edge_pos[..., None]
    return _Support(node, edge, alpha, beta)


def _entropy_coefficients(lengths: Tensor, T: int, dtype: torch.dtype) -> Tensor:
    """Return c_t = deg(t) - 1 for each position, ``[B, T]`` (zero on padding)."""
    pos = torch.arange(T, device=lengths.device)
    deg = (pos[None, :] >= 1).to(dtype) + (pos[None, :] < lengths[:, None] - 1).to(dtype)
    return torch.where(pos[None, :] < lengths[:, None], deg - 1, 0.0)


def _safe_log(x: Tensor, mask: Tensor) -> Tensor:
    # Double `where`: log is never evaluated at 0, so no inf * 0 = NaN in the backward pass.
    return torch.log(torch.where(mask, x, 1.0))


def chain_kkt_residual(
    z: ChainKKTPoint,
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    temperature: float = 1.0,
    support: _Support | None = None,
) -> ChainKKTPoint:
    """Evaluate the KKT residual F(z; θ) of the chain's entropy-regularized argmax.

    Invariant: ``F(z*; θ) == 0`` at the solution ``z*`` (μ* = ∇A(θ/τ) with its duals). See the
    module docstring for the system and the restriction to the support.

    Args:
        z: the point, a `ChainKKTPoint`.
        unary: θ node potentials ``[B, T, Z]`` (may hold −inf).
        binary: θ edge potentials ``[B, T-1, Z, Z]`` laid out ``[from, to]`` (may hold −inf).
        lengths: LongTensor ``[B]``.
        temperature: τ > 0.
        support: support masks; by default computed from ``z`` (entries with mass > tiny).
            Pass the masks of the solution to keep F differentiable in z with a fixed support.

    Returns:
        The residual as a `ChainKKTPoint` of the same shapes (a stationarity residual in
        the μ slots, a constraint residual in the dual slots).
    """
    m, M, alpha, beta, nu = z
    tau = temperature
    T = m.shape[1]
    S = support if support is not None else chain_support(m.detach(), M.detach(), lengths)
    c = _entropy_coefficients(lengths, T, m.dtype)[..., None]  # shape: (B, T, 1)
    a = torch.where(S.alpha, alpha, 0.0)
    b = torch.where(S.beta, beta, 0.0)
    Ms = torch.where(S.edge, M, 0.0)
    ms = torch.where(S.node, m, 0.0)

    # Few full-size [B, T-1, Z, Z] temporaries: on CPU their allocation dominates the cost.
    shift = (a + tau)[..., :, None] + b[..., None, :]  # shape: (B, T-1, Z, Z)
    f_edge = torch.sub(torch.where(S.edge, binary, 0.0), _safe_log(M, S.edge), alpha=tau)
    f_edge = torch.where(S.edge, f_edge - shift, M)

    duals_in = torch.nn.functional.pad(a, (0, 0, 0, 1))  # α_t at node t < L-1
    duals_in = duals_in + torch.nn.functional.pad(b, (0, 0, 1, 0))  # β_{t-1} at node t >= 1
    first = torch.zeros_like(m)
    first[:, 0] = 1.0
    f_node = (
        torch.where(S.node, unary, 0.0)
        + tau * c * (_safe_log(m, S.node) + 1)
        + duals_in
        - first * nu[:, None, None]
    )
    f_node = torch.where(S.node, f_node, m)

    f_alpha = ms[:, :-1] - Ms.sum(-1)
    f_alpha = torch.where(S.alpha, f_alpha, alpha)
    f_beta = ms[:, 1:] - Ms.sum(-2)
    f_beta = torch.where(S.beta, f_beta, beta)
    f_nu = 1 - ms[:, 0].sum(-1)
    return ChainKKTPoint(f_node, f_edge, f_alpha, f_beta, f_nu)


def chain_duals(
    mu_unary: Tensor,
    mu_binary: Tensor,
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    temperature: float = 1.0,
) -> ChainKKTPoint:
    """Recover the duals (α, β, ν) of a chain solution by one backward sweep.

    Solves the stationarity equations for the duals given μ (see `dual_sweep`). Works
    for μ from any solver; at μ* every stationarity row is then exactly zero.

    Args:
        mu_unary: ``[B, T, Z]``; mu_binary: ``[B, T-1, Z, Z]``; unary, binary: θ (same shapes);
        lengths: LongTensor ``[B]``; temperature: τ > 0.

    Returns:
        The full point ``(mu_unary, mu_binary, alpha, beta, nu)``.
    """
    tau = temperature
    T = mu_unary.shape[1]
    S = chain_support(mu_unary, mu_binary, lengths)
    c = _entropy_coefficients(lengths, T, mu_unary.dtype)[..., None]
    u = torch.where(S.node, unary, 0.0)
    w = torch.where(S.edge, binary, 0.0)
    base_node = u + tau * c * (_safe_log(mu_unary, S.node) + 1)  # F_m without the duals
    base_edge = w - tau * (_safe_log(mu_binary, S.edge) + 1)  # F_M without the duals
    alpha, beta, nu = dual_sweep(base_node, base_edge, mu_unary, mu_binary, S)
    return ChainKKTPoint(mu_unary, mu_binary, alpha, beta, nu)


def dual_sweep(
    base_node: Tensor, base_edge: Tensor, mu_unary: Tensor, mu_binary: Tensor, support: _Support
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve the dual part of the stationarity rows, ``base + (dual terms) = 0``, for (α, β, ν).

    With the dual terms of F_M (−α_t[i] − β_t[j]) and of F_m (α_t[i] + β_{t-1}[i] − [t=0]ν),
    a backward sweep is exact when the system is consistent: the node row at t+1 gives β_t,
    the edge rows at t give α_t (averaged over j with the conditional weights M_t[i,j]/m_t[i],
    which makes it the weighted least-squares estimate when the rows are not consistent), and
    the node rows at 0 give ν (averaged with weights m_0). Off-support duals are zero.

    Args:
        base_node: ``[B, T, Z]``; base_edge: ``[B, T-1, Z, Z]``; mu_unary, mu_binary: the
            marginals that weight the averages; support: masks from `chain_support`.

    Returns:
        ``alpha`` ``[B, T-1, Z]``, ``beta`` ``[B, T-1, Z]``, ``nu`` ``[B]``.
    """
    S = support
    B, T, Z = mu_unary.shape
    ms = torch.where(S.node, mu_unary, 0.0)
    Ms = torch.where(S.edge, mu_binary, 0.0)
    m_prev = ms[:, :-1, :, None]
    weights = torch.where(m_prev > 0, Ms / torch.where(m_prev > 0, m_prev, 1.0), 0.0)
    zero = mu_unary.new_zeros(B, Z)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    alpha_next = zero  # α_{t+1}, zero at and beyond L-1
    for t in range(T - 2, -1, -1):
        beta_t = torch.where(S.beta[:, t], -(base_node[:, t + 1] + alpha_next), zero)
        alpha_t = (weights[:, t] * (base_edge[:, t] - beta_t[:, None, :])).sum(-1)
        alpha_t = torch.where(S.alpha[:, t], alpha_t, zero)
        alphas.append(alpha_t)
        betas.append(beta_t)
        alpha_next = alpha_t
    if T > 1:
        alpha = torch.stack(alphas[::-1], 1)
        beta = torch.stack(betas[::-1], 1)
        alpha0 = alpha[:, 0]
    else:
        alpha = mu_unary.new_zeros(B, 0, Z)
        beta = mu_unary.new_zeros(B, 0, Z)
        alpha0 = zero
    nu_terms = torch.where(S.node[:, 0], base_node[:, 0] + alpha0, zero)
    nu = (ms[:, 0] * nu_terms).sum(-1) / ms[:, 0].sum(-1).clamp_min(torch.finfo(ms.dtype).tiny)
    return alpha, beta, nu


def chain_kkt_matvec(
    point: ChainKKTPoint,
    direction: ChainKKTPoint,
    lengths: Tensor,
    temperature: float,
    support: _Support,
) -> ChainKKTPoint:
    """Multiply the KKT matrix K = ∂F/∂z at ``point`` by ``direction``, without autograd.

    K is symmetric; on the support it is [[H, −Jᵀ], [−J, 0]] with H = diag(−τ/M on edges,
    τ c_t/m on nodes), off the support the identity (see `chain_kkt_residual`).

    Args:
        point: the linearization point (its marginals define H).
        direction: a `ChainKKTPoint` of the same shapes.
        lengths: LongTensor ``[B]``; temperature: τ; support: masks from `chain_support`.

    Returns:
        ``K @ direction`` as a `ChainKKTPoint`.
    """
    S, tau = support, temperature
    m, M = point.mu_unary, point.mu_binary
    dm, dM, da, db, dnu = direction
    c = _entropy_coefficients(lengths, m.shape[1], m.dtype)[..., None]
    da_s = torch.where(S.alpha, da, 0.0)
    db_s = torch.where(S.beta, db, 0.0)
    dm_s = torch.where(S.node, dm, 0.0)
    dM_s = torch.where(S.edge, dM, 0.0)
    ones_m = torch.where(S.node, m, 1.0)
    ones_M = torch.where(S.edge, M, 1.0)
    k_edge = -tau * dM_s / ones_M - da_s[..., :, None] - db_s[..., None, :]
    duals_in = torch.nn.functional.pad(da_s, (0, 0, 0, 1)) + torch.nn.functional.pad(
        db_s, (0, 0, 1, 0)
    )
    first = torch.zeros_like(m)
    first[:, 0] = 1.0
    k_node = tau * c * dm_s / ones_m + duals_in - first * dnu[:, None, None]
    k_alpha = dm_s[:, :-1] - dM_s.sum(-1)
    k_beta = dm_s[:, 1:] - dM_s.sum(-2)
    k_nu = -dm_s[:, 0].sum(-1)
    return ChainKKTPoint(
        torch.where(S.node, k_node, dm),
        torch.where(S.edge, k_edge, dM),
        torch.where(S.alpha, k_alpha, da),
        torch.where(S.beta, k_beta, db),
        k_nu,
    )
