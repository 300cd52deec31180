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

from structift import chain
from structift.chain import _hvp

__all__ = ["chain_covariance_vector_product"]


def _reciprocal(m: Tensor) -> Tensor:
    """Return 1/m with 0 where m == 0 (zero-mass conditioning events)."""
    return torch.where(m > 0, 1 / torch.where(m > 0, m, 1.0), torch.zeros_like(m))


def chain_covariance_vector_product(
    mu_unary: Tensor,
    mu_binary: Tensor,
    lengths: Tensor,
    v_unary: Tensor,
    v_binary: Tensor,
    scale: float = 1.0,
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
        scale: a factor s folded into the computation: returns ``s · Cov v`` (= Cov (s v)) for
            the cost of ``Cov v``, e.g. ``s = −1/τ`` for the KKT solve.

    The marginals must be exact (consistent) and zero on padding; the directions must be
    finite (their padding entries are then ignored).

    Returns:
        ``(Cov v)_unary`` ``[B, T, Z]`` and ``(Cov v)_binary`` ``[B, T-1, Z, Z]``, zero on padding
        and wherever the marginal is zero (the product is supported on the support of p).
    """
    T = mu_unary.shape[1]
    pos = torch.arange(T, device=mu_unary.device)
    valid = pos[None, :] < lengths[:, None]  # shape: (B, T)
    if chain.kernel_for(mu_unary) == "fused":
        # Where the fused chain kernels run (CUDA), the chain's Hessian-vector product does the
        # same two recursions (centred) in one launch instead of one small kernel per step.
        m = torch.where(valid[..., None], mu_unary, 0.0)
        return _hvp.hvp(m, mu_binary, valid, v_unary * scale, v_binary * scale, fused=True)
    node_mask = valid.to(mu_unary.dtype)
    m = mu_unary * node_mask[..., None]
    M = mu_binary  # zero beyond lengths - 1 by contract: every edge term below carries M
    # The product is linear in v: scale the direction once (small node block here, the edge
    # block inside the single pass that forms M ∘ v) instead of the [B, T-1, Z, Z] result.
    vu = v_unary * (node_mask * scale)[..., None]
    inv_m = _reciprocal(m)  # shape: (B, T, Z)

    # The conditionals M_t[i, j] / m_{t+1}[j] and M_t[i, j] / m_t[i] are never materialized:
    # the recursions multiply by M and rescale the small [B, Z] vectors by 1/m instead.
    # Mv = s (M ∘ v) in one pass; it is also the buffer of the edge output (built in place).
    Mv = torch.addcmul(M.new_zeros(()), M, v_binary, value=scale)  # shape: (B, T-1, Z, Z)
    fwd_edge = Mv.sum(-2)  # E[v_edge[t] | y_{t+1} = j] m_{t+1}[j], shape: (B, T-1, Z)
    bwd_edge = Mv.sum(-1)  # E[v_edge[t] | y_t = i] m_t[i], shape: (B, T-1, Z)

    # Forward: a_t = vu_t + (colsum(Mv_{t-1}) + a_{t-1}ᵀ M_{t-1}) / m_t.
    a = [vu[:, 0]]
    for t in range(1, T):
        s_t = torch.baddbmm(fwd_edge[:, t - 1, None, :], a[-1][:, None, :], M[:, t - 1])
        a.append(torch.addcmul(vu[:, t], s_t[:, 0], inv_m[:, t]))
    # Backward on w_t = vu_t + b_t (the node term of the edge output's right factor):
    # w_t = vu_t + (rowsum(Mv_t) + M_t w_{t+1}) / m_t, w_{T-1} = vu_{T-1} (b_{T-1} = 0).
    w = [vu[:, T - 1]]
    for t in range(T - 2, -1, -1):
        s_t = torch.baddbmm(bwd_edge[:, t, :, None], M[:, t], w[-1][:, :, None])
        w.append(torch.addcmul(vu[:, t], s_t[..., 0], inv_m[:, t]))
    a_all = torch.stack(a, 1)  # shape: (B, T, Z)
    w_all = torch.stack(w[::-1], 1)  # shape: (B, T, Z)

    mean = (m * vu).sum((1, 2)) + fwd_edge.sum((1, 2))  # ⟨s v, μ⟩, shape: (B,)
    centered = a_all - mean[:, None, None]
    out_unary = m * (centered + w_all - vu)  # m_t (a_t − ⟨v, μ⟩ + b_t)
    # s M ∘ (a_t[i] − ⟨v, μ⟩ + v_edge + v_node[t+1, j] + b_{t+1}[j]), in Mv's buffer.
    out_binary = Mv.addcmul_(M, centered[:, :-1, :, None]).addcmul_(M, w_all[:, 1:, None, :])
    return out_unary, out_binary
