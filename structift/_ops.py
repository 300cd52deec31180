"""Small NaN-safe tensor helpers shared by the kernels.

The zero of the log semiring is a true ``-inf`` (never a finite stand-in such as ``-1e5``), so
every reduction here must map "all ``-inf``" to ``-inf`` in value and to ``0`` in gradient,
including second derivatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lengths_to_mask", "logsumexp"]


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
