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

Values only, no autograd graph: the families attach the exact gradient (``families.base``).
Cost: one log-space backward sweep per distribution plus one pass over ``[B, T-1, Z, Z]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, softmax_entropy, softmax_kl
from structift.structures.chain import _log


def conditional_logits(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Return the chain's log-conditionals up to a constant per row, and the validity mask.

    Args:
        unary: ``[B, T, Z]``; binary: broadcastable to ``[B, T-1, Z, Z]`` (``[from, to]``);
            lengths: LongTensor ``[B]``.

    Returns:
        ``init`` ``[B, Z]`` (logits of ``p(z_0)``) and ``rows`` ``[B, T-1, Z, Z]`` (row
        ``[t, i]``: logits of ``p(z_{t+1} | z_t = i)``; rows at ``t >= L-1`` are meaningless and
        weighted 0 by the callers).
    """
    with torch.no_grad():
        u, b, mask = _log.prepare(unary.detach(), binary.detach(), lengths)
        beta = _log.centred_backward(u, b, mask)
        init = u[:, 0] + beta[:, 0]
        rows = b + (u[:, 1:] + beta[:, 1:]).unsqueeze(-2)  # shape: (B, T-1, Z, Z)
    return init, rows


def _row_weights(mu_unary: Tensor, lengths: Tensor) -> Tensor:
    """``p(z_t = i)`` for the transitions ``t < L-1``, 0 elsewhere: ``[B, T-1, Z]``."""
    T = mu_unary.shape[1]
    inner = lengths_to_mask(lengths.to(mu_unary.device), T)[:, 1:, None]
    return torch.where(inner, mu_unary.detach()[:, :-1], 0.0)


def _weighted(weights: Tensor, terms: Tensor) -> Tensor:
    """``sum_{t, i} w[t, i] terms[t, i]`` with ``0 * inf = 0`` (rows p never visits)."""
    return torch.where(weights > 0, weights * terms, 0.0).sum((1, 2))


def entropy(unary: Tensor, binary: Tensor, lengths: Tensor, mu_unary: Tensor) -> Tensor:
    """Compute ``H(p)`` ``[B]`` of the chain from its potentials and unary marginals.

    Args:
        unary, binary, lengths: the chain (see ``conditional_logits``).
        mu_unary: its unary marginals ``[B, T, Z]`` (the weights of the local terms).
    """
    init, rows = conditional_logits(unary, binary, lengths)
    with torch.no_grad():
        if rows.shape[1] == 0:
            return softmax_entropy(init)
        return softmax_entropy(init) + _weighted(
            _row_weights(mu_unary, lengths), softmax_entropy(rows)
        )


def kl(p: tuple[Tensor, Tensor], q: tuple[Tensor, Tensor], lengths: Tensor, mu_p: Tensor) -> Tensor:
    """Compute ``KL(p || q)`` ``[B]`` of two chains on the same lengths.

    Args:
        p, q: ``(unary, binary)`` potentials of each chain.
        lengths: LongTensor ``[B]`` shared by both.
        mu_p: the unary marginals of p ``[B, T, Z]``.

    Returns:
        ``[B]``, ``+inf`` where q forbids a path that p allows.
    """
    init_p, rows_p = conditional_logits(*p, lengths)
    init_q, rows_q = conditional_logits(*q, lengths)
    with torch.no_grad():
        total = softmax_kl(init_p, init_q)
        if rows_p.shape[1] == 0:
            return total
        return total + _weighted(_row_weights(mu_p, lengths), softmax_kl(rows_p, rows_q))
