"""Covariance-vector products of a linear chain from its marginals alone.

For a chain with potentials θ = (unary, binary) and sufficient statistics φ(y) (one-hot node and
edge indicators), the Hessian of the log-partition is the covariance of φ:

    ∇²A(θ) v = Cov_p[φ(y), ⟨v, φ(y)⟩] = E_p[φ(y) ⟨v, φ(y)⟩] − μ ⟨v, μ⟩,   μ = ∇A(θ).

On a chain p factorizes into conditionals that are ratios of the marginals,
p(y_t = i | y_{t+1} = j) = M_t[i, j] / m_{t+1}[j] and p(y_{t+1} = j | y_t = i) = M_t[i, j] / m_t[i],
so one forward and one backward linear recursion over conditional expectations of ⟨v, φ⟩ gives
the exact product in O(T Z²) time and O(T Z) extra memory, without θ and without logarithms:

    a_t[j] = E[⟨v, φ(y_{≤t})⟩ | y_t = j]     (prefix score, node t included)
    b_t[i] = E[⟨v, φ(y_{>t})⟩ | y_t = i]     (suffix score, node t excluded)

    (∇²A v)_node[t, i]    = m_t[i] (a_t[i] + b_t[i] − ⟨v, μ⟩)
    (∇²A v)_edge[t, i, j] = M_t[i, j] (a_t[i] + v_edge[t, i, j] + v_node[t+1, j]
                                        + b_{t+1}[j] − ⟨v, μ⟩)

This is the tangent (forward-mode) pass of forward-backward written in probability space: the
"second-order forward-backward". It is also the exact inverse of the chain's entropy-regularized
KKT matrix (see :mod:`structift.variational.chain_kkt`): eliminating the node and edge blocks
one position at a time (a Schur complement on a block-bidiagonal system) yields these same two
recursions. Because it only reads μ, its cost does not depend on how μ was computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chain_covariance_vector_product"]


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """Return num / den with 0 where den == 0 (zero-mass conditioning events)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def chain_covariance_vector_product(
    mu_unary: Tensor,
    mu_binary: Tensor,
    lengths: Tensor,
    v_unary: Tensor,
    v_binary: Tensor,
) -> tuple[Tensor, Tensor]:
    """Multiply the covariance of a chain's sufficient statistics by a vector.

    Computes ``Cov_p[φ, ⟨v, φ⟩] = ∇²A(θ) v`` where ``μ = ∇A(θ)`` are the exact marginals of p.
    For the temperature-τ problem ``μ*(θ) = ∇A(θ/τ)``, ``dμ*/dθ · v = (1/τ) ∇²A(θ/τ) v``:
    call this with the marginals at θ/τ and divide by τ.

    Args:
        mu_unary: node marginals ``m``, shape ``[B, T, Z]``, zero beyond ``lengths``.
        mu_binary: edge marginals ``M`` laid out ``[from, to]``, shape ``[B, T-1, Z, Z]``,
            zero beyond ``lengths - 1``.
        lengths: LongTensor ``[B]`` with ``1 <= lengths <= T``.
        v_unary: direction on the node statistics, shape ``[B, T, Z]`` (finite).
        v_binary: direction on the edge statistics, shape ``[B, T-1, Z, Z]`` (finite).

    Returns:
        ``(Cov v)_unary`` ``[B, T, Z]`` and ``(Cov v)_binary`` ``[B, T-1, Z, Z]``, zero on padding
        and wherever the marginal is zero (the product is supported on the support of p).
    """
    T = mu_unary.shape[1]
    pos = torch.arange(T, device=mu_unary.device)
    node_mask = (pos[None, :] < lengths[:, None]).to(mu_unary.dtype)  # shape: (B, T)
    edge_mask = (pos[None, : T - 1] < lengths[:, None] - 1).to(mu_unary.dtype)  # (B, T-1)
    m = mu_unary * node_mask[..., None]
    M = mu_binary * edge_mask[..., None, None]
    vu = v_unary * node_mask[..., None]
    vb = v_binary * edge_mask[..., None, None]

    # Conditionals of the previous state given the next (forward) and of the next given the
    # previous (backward); rows/columns of zero-mass states are zero.
    prev_given_next = _ratio(M, m[:, 1:, None, :])  # shape: (B, T-1, Z_from, Z_to)
    next_given_prev = _ratio(M, m[:, :-1, :, None])  # shape: (B, T-1, Z_from, Z_to)
    # Edge-local parts of the recursions, computed for all t at once.
    fwd_local = (prev_given_next * vb).sum(-2)  # shape: (B, T-1, Z_to)
    bwd_local = (next_given_prev * (vb + vu[:, 1:, None, :])).sum(-1)  # shape: (B, T-1, Z_from)

    a = [vu[:, 0]]
    for t in range(1, T):
        prev = torch.einsum("bij,bi->bj", prev_given_next[:, t - 1], a[-1])
        a.append(vu[:, t] + fwd_local[:, t - 1] + prev)
    b = [torch.zeros_like(vu[:, 0])]
    for t in range(T - 2, -1, -1):
        nxt = torch.einsum("bij,bj->bi", next_given_prev[:, t], b[-1])
        b.append(bwd_local[:, t] + nxt)
    a_all = torch.stack(a, 1)  # shape: (B, T, Z)
    b_all = torch.stack(b[::-1], 1)  # shape: (B, T, Z)

    mean = (m * vu).sum((1, 2)) + (M * vb).sum((1, 2, 3))  # ⟨v, μ⟩, shape: (B,)
    out_unary = m * (a_all + b_all - mean[:, None, None])
    out_binary = M * (
        a_all[:, :-1, :, None]
        + vb
        + vu[:, 1:, None, :]
        + b_all[:, 1:, None, :]
        - mean[:, None, None, None]
    )
    return out_unary, out_binary
