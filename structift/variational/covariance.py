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
KKT matrix (see `structift.variational.chain_kkt`): eliminating the node and edge blocks
one position at a time (a Schur complement on a block-bidiagonal system) yields these same two
recursions. Because it only reads μ, its cost does not depend on how μ was computed.

There is one implementation of this product in structift, the chain's Hessian-vector product
(``Chain.hvp``, ``structift/structures/chain/_hvp.py``), which re-centres the tangent messages at
every position so that float32 rounding does not grow with T; this function restricts the
marginals to their support (entries above ``tiny``, the support of the KKT system) and calls it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.structures.chain import Chain

__all__ = ["chain_covariance_vector_product"]


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
        scale: a factor s: returns ``s · Cov v`` (= Cov (s v)), e.g. ``s = −1/τ`` for the KKT
            solve.

    The marginals must be exact (consistent) and zero on padding; entries at or below ``tiny``
    (subnormal) count as zero, like everywhere in the variational solve. The directions must be
    finite (their padding entries are then ignored).

    Returns:
        ``(Cov v)_unary`` ``[B, T, Z]`` and ``(Cov v)_binary`` ``[B, T-1, Z, Z]``, zero on padding
        and wherever the marginal is zero (the product is supported on the support of p).
    """
    T = mu_unary.shape[1]
    tiny = torch.finfo(mu_unary.dtype).tiny
    lengths = lengths.to(mu_unary.device)
    valid = torch.arange(T, device=mu_unary.device)[None, :] < lengths[:, None]  # shape: (B, T)
    m = torch.where(valid[..., None] & (mu_unary > tiny), mu_unary, 0.0)
    M = torch.where(mu_binary > tiny, mu_binary, 0.0)
    structure = Chain.build(mu_unary, lengths)
    h_u, h_b = structure.hvp((m, M), (v_unary * scale, v_binary * scale))
    return h_u, h_b
