"""Small NaN-safe tensor helpers shared by the kernels.

The zero of the log semiring is a true ``-inf`` (never a finite stand-in such as ``-1e5``), so
every reduction here must map "all ``-inf``" to ``-inf`` in value and to ``0`` in gradient,
including second derivatives.

``softmax_entropy`` and ``softmax_kl`` are the local terms that every entropy and KL in
structift is a weighted sum of (a categorical is one term; a chain is one term per position and
previous state). Each is a sum of non-negative numbers, so the results are non-negative by
construction and accurate to a few ulps relative, whatever the size of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lengths_to_mask", "logsumexp", "softmax_entropy", "softmax_kl", "sum_to_shape"]


def logsumexp(x: Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """Compute ``log(sum(exp(x)))`` along ``dim`` with a true ``-inf`` zero.

    ``torch.logsumexp`` returns ``-inf`` when every entry is ``-inf`` but its backward then
    evaluates ``exp(-inf - (-inf)) = exp(nan)``. Here the shift is the detached finite maximum
    (``0`` where there is none) and the logarithm only sees positive sums, so:

    * all entries ``-inf``: value ``-inf``, gradient ``0`` (and Hessian ``0``);
    * otherwise: the usual value, gradient ``softmax(x)``; twice differentiable.

    NaN inputs propagate (callers validate); ``+inf`` is not supported.

    Args:
        x: Any shape.
        dim: Dimension(s) to reduce.
        keepdim: Keep the reduced dimension(s) with size 1.

    Returns:
        ``x`` reduced over ``dim``.
    """
    m = torch.amax(x.detach(), dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    positive = s > 0
    # The logarithm sees 1 where the sum is 0, so neither branch of `where` yields NaN/inf
    # gradients; the -inf branch is a constant and passes no gradient.
    safe = torch.where(positive, s, torch.ones_like(s))
    out = torch.where(positive, torch.log(safe) + m, -torch.inf)
    if not keepdim:
        dims = (dim,) if isinstance(dim, int) else dim
        out = out.squeeze(dims)
    return out


def lengths_to_mask(lengths: Tensor, T: int) -> Tensor:
    """Turn sequence lengths into a validity mask.

    Args:
        lengths: LongTensor ``[B]``, each in ``[0, T]``.
        T: Padded length.

    Returns:
        BoolTensor ``[B, T]``, ``True`` exactly at positions ``t < lengths[b]``.
    """
    steps = torch.arange(T, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(-1)


def _softmax_parts(logits: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, gap, log1p_rest)`` of ``softmax(logits)`` along ``dim``, without cancellation.

    With ``m`` the finite maximum, ``gap = m - logits >= 0`` (``+inf`` at ``-inf`` logits) and
    ``s`` the sum of ``exp(-gap)`` over every entry but one maximal one,
    ``-log p = gap + log1p(s)`` exactly in real arithmetic: both terms are non-negative and each
    is computed to a few ulps (``log(1 + s)`` through ``log1p``, which keeps ``s < eps``).
    """
    m = torch.amax(logits, dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    gap = m - logits
    e = torch.exp(-gap)
    first = torch.scatter(torch.zeros_like(e), dim, logits.argmax(dim, keepdim=True), 1.0)
    rest = (e - first).clamp_min(0).sum(dim, keepdim=True)  # 0 for all -inf slices too
    rest_log = torch.log1p(rest)
    return e / (1 + rest), gap, rest_log


def softmax_entropy(logits: Tensor, dim: int = -1) -> Tensor:
    """Compute ``H(softmax(logits)) = sum_k p_k (-log p_k)`` along ``dim``, never negative.

    With ``m`` the finite maximum, ``e_k = exp(logits_k - m)`` and ``s`` the sum of ``e_k`` over
    every entry but one maximal one, ``-log p_k = (m - logits_k) + log1p(s)``, two non-negative
    numbers, so ``H = sum_k e_k (m - logits_k) / (1 + s) + log1p(s) >= 0``, each part to a few
    ulps: ``log1p`` keeps ``s < eps`` (``A - <theta, mu>`` loses peaked rows to cancellation),
    and ``sum e_k (m - logits_k)`` is ``sum entr(e_k)``, 0 for ``-inf`` logits. A slice of all
    ``-inf`` has entropy 0. No gradient: callers attach it (``families.base``).

    Args:
        logits: log-probabilities up to a constant, any shape, ``-inf`` allowed.
        dim: the dimension that is normalised.

    Returns:
        ``logits`` reduced over ``dim``.
    """
    with torch.no_grad():
        m = torch.amax(logits, dim=dim, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - m)  # exactly 1 at every maximum
        top = e == 1
        rest = e.masked_fill(top, 0.0).sum(dim) + (top.sum(dim) - 1).clamp_min(0)
        spread = torch.special.entr(e).sum(dim)  # sum e_k (m - logits_k): e log(1/e)
        return spread / (1 + rest) + torch.log1p(rest)


def softmax_kl(p_logits: Tensor, q_logits: Tensor, dim: int = -1) -> Tensor:
    """Compute ``KL(softmax(p_logits) || softmax(q_logits))`` along ``dim``, never negative.

    With ``d_k = log p_k - log q_k`` (each log-probability formed as in ``softmax_entropy``),
    ``KL = sum_{p_k > 0} p_k (d_k + exp(-d_k) - 1) + sum_{p_k = 0} q_k``: the two sums differ
    from ``sum p_k d_k`` by ``sum q_k - 1 = 0``, and every term is non-negative
    (``x + exp(-x) - 1 >= 0``), so no cancellation between positive and negative terms happens
    and ``KL = 0`` exactly when the rows agree. ``+inf`` where q forbids what p allows. No
    gradient: callers attach it.

    Args:
        p_logits, q_logits: log-probabilities up to a constant, same shape, ``-inf`` allowed.
        dim: the dimension that is normalised.

    Returns:
        The inputs reduced over ``dim``.
    """
    with torch.no_grad():
        p, p_gap, p_rest = _softmax_parts(p_logits, dim)
        q, q_gap, q_rest = _softmax_parts(q_logits, dim)
        d = (q_gap + q_rest) - (p_gap + p_rest)  # log p - log q on p's support
        # p (d + expm1(-d)) for moderate d; where q >> p (d < -1) the same value as
        # p d + q - p, which never forms exp(-d) (it can overflow for denormal p).
        near = p * (d + torch.expm1(-d.clamp_min(-1.0)))
        far = p * d + (q - p)
        term = torch.where(d >= -1, near, far).clamp_min(0)
        term = torch.where(p > 0, term, q)
        return term.sum(dim)


def sum_to_shape(x: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the reverse of ``expand``)."""
    shape = torch.Size(shape)
    if x.shape == shape:
        return x
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead > 0 else x
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x
