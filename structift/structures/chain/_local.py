"""Entropy and KL of chains as sums of non-negative local terms.

The posterior of a chain is a Markov chain in the forward direction,
``p(z) = p(z_0) prod_t p(z_{t+1} | z_t)``, with log-conditionals formed from local potentials
and the (centred, log-space) backward messages:

    log p(z_0 = i)              = softmax-log of  init[i]      = unary_0[i] + beta_0[i]
    log p(z_{t+1} = j | z_t = i) = softmax-log of  rows[t, i, j] = binary_t[i, j]
                                                                  + unary_{t+1}[j] + beta_{t+1}[j]

(each row normalised over its last dimension). By the chain rule of entropy and of KL,

    H(p)     = H(p(z_0)) + sum_t sum_i p(z_t = i) H(p(. | z_t = i)),
    KL(p||q) = KL(p(z_0) || q(z_0)) + sum_t sum_i p(z_t = i) KL(p(. | z_t = i) || q(. | z_t = i)),

sums of non-negative terms weighted by marginals, each term computed from one row of logits
(``structift._ops.softmax_entropy`` / ``softmax_kl``). Nothing of the size of ``log Z`` is
subtracted, so float32 accuracy does not depend on ``|log Z|`` or ``T``, and ``H >= 0``,
``KL >= 0`` hold exactly. (``H = A - <theta, mu>`` subtracts two numbers of size ``|log Z|``.)

One log-space backward sweep per distribution gives the messages; the rows are then formed in
chunks of time steps that fit in cache, used for their local terms and dropped, so nothing of
size ``[B, T-1, Z, Z]`` is allocated.
Values only, no autograd graph: the families attach the exact gradient (``families.base``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, softmax_entropy, softmax_kl

# Rows are formed and consumed in chunks of time steps of about this many bytes, so that each
# chunk's temporaries stay in cache: one pass over memory instead of one per operation.
CHUNK_BYTES = 1 << 19


def _betas(unary: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Centred log-space backward messages ``[B, T, Z]`` (0 from ``L-1`` on), no graph."""
    B, T, Z = unary.shape
    betas = unary.new_zeros(B, T, Z)
    beta = betas[:, -1]
    for t in range(T - 2, -1, -1):
        x = b[:, t] + (unary[:, t + 1] + beta).unsqueeze(-2)  # shape: (B, Z, Z)
        m = x.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        new = (x - m).exp_().sum(-1).log_().add_(m.squeeze(-1))  # logsumexp over "to"
        top = new.amax(-1, keepdim=True)
        new = new - torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # centred
        beta = torch.where(valid[:, t + 1, None], new, beta)
        betas[:, t] = beta
    return betas


def _rows(unary: Tensor, binary: Tensor, lengths: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(steps, rows)`` over chunks of ``t = 0 .. T-2``, then ``(None, init)``.

    ``rows`` ``[B, K, Z, Z]``: row ``[k, i]`` holds the logits of ``p(z_{t+1} | z_t = i)`` for
    ``t = steps.start + k`` (up to a constant per row); ``init`` ``[B, Z]`` those of
    ``p(z_0)``. Rows at ``t >= L-1`` hold anything (padding is never read into a valid row)
    and must be weighted 0 by the caller.
    """
    B, T, Z = unary.shape
    b = binary.expand(B, T - 1, Z, Z)
    beta = _betas(unary, b, lengths_to_mask(lengths.to(unary.device), T))
    step = max(1, CHUNK_BYTES // max(1, B * Z * Z * unary.element_size()))
    for t0 in range(0, T - 1, step):
        t1 = min(T - 1, t0 + step)
        yield (
            slice(t0, t1),
            b[:, t0:t1] + (unary[:, t0 + 1 : t1 + 1] + beta[:, t0 + 1 : t1 + 1]).unsqueeze(-2),
        )
    yield slice(0, 0), unary[:, 0] + beta[:, 0]


def _row_weights(mu_unary: Tensor, lengths: Tensor) -> Tensor:
    """``p(z_t = i)`` for the transitions ``t < L-1``, 0 elsewhere: ``[B, T-1, Z]``."""
    T = mu_unary.shape[1]
    inner = lengths_to_mask(lengths.to(mu_unary.device), T)[:, 1:, None]
    return torch.where(inner, mu_unary.detach()[:, :-1], 0.0)


def _weighted(weights: Tensor, terms: Tensor) -> Tensor:
    """``sum_{t, i} w[t, i] terms[t, i]`` per batch element with ``0 * inf = 0``."""
    return torch.where(weights > 0, weights * terms, 0.0).sum((1, 2))


def entropy(unary: Tensor, binary: Tensor, lengths: Tensor, mu_unary: Tensor) -> Tensor:
    """Compute ``H(p)`` ``[B]`` of the chain from its potentials and unary marginals.

    Args:
        unary: ``[B, T, Z]``; binary: broadcastable to ``[B, T-1, Z, Z]`` (``[from, to]``);
            lengths: LongTensor ``[B]``.
        mu_unary: its unary marginals ``[B, T, Z]`` (the weights of the local terms).
    """
    with torch.no_grad():
        u, b = unary.detach(), binary.detach()
        weights = _row_weights(mu_unary, lengths)
        total = u.new_zeros(u.shape[0])
        for steps, x in _rows(u, b, lengths):
            if steps.stop == 0:
                return total + softmax_entropy(x)
            total += _weighted(weights[:, steps], softmax_entropy(x))
    raise AssertionError("unreachable: _rows ends with the initial distribution")


def kl(p: tuple[Tensor, Tensor], q: tuple[Tensor, Tensor], lengths: Tensor, mu_p: Tensor) -> Tensor:
    """Compute ``KL(p || q)`` ``[B]`` of two chains on the same lengths.

    Args:
        p: ``(unary, binary)`` potentials of the first chain.
        q: ``(unary, binary)`` potentials of the second chain.
        lengths: LongTensor ``[B]`` shared by both.
        mu_p: the unary marginals of p ``[B, T, Z]``.

    Returns:
        ``[B]``, ``+inf`` where q forbids a path that p allows.
    """
    with torch.no_grad():
        weights = _row_weights(mu_p, lengths)
        rows_p = _rows(p[0].detach(), p[1].detach(), lengths)
        rows_q = _rows(q[0].detach(), q[1].detach(), lengths)
        total = p[0].new_zeros(p[0].shape[0])
        for (steps, x), (_, y) in zip(rows_p, rows_q):
            if steps.stop == 0:
                return total + softmax_kl(x, y)
            total += _weighted(weights[:, steps], softmax_kl(x, y))
    raise AssertionError("unreachable: _rows ends with the initial distributions")
