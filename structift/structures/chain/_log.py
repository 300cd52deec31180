"""Log-space chain recursions: the reference path, differentiable by autograd.

Used for third derivatives (a graph of the Hessian-vector product), for the rows that the
scaled probability-space path cannot certify, for sampling, and for the log-conditionals that
entropy and KL are built from (``_local``). Every reduction uses the NaN-safe logsumexp, so
``-inf`` potentials give ``-inf`` values and zero gradients.

Numerics by construction. The messages are *centred* at every step (their finite maximum is
subtracted and kept on the side), so they stay at the size of one step's scores instead of the
prefix's, and each position's marginals are normalised by their own total,

    mu_unary[t] = softmax_z(alpha_t + beta_t),
    mu_binary[t] = softmax_{i,j}(alpha_t[i] + binary_t[i, j] + unary_{t+1}[j] + beta_{t+1}[j]),

formed as ``exp(y - max y) / sum exp(y - max y)``. No number of the size of ``log Z`` is ever
subtracted, so the float32 error of the marginals does not grow with ``|log Z|`` or ``T``, and
in float64 even potentials of 1e20 give ties of exactly one half. (Subtracting a global
``log Z``, or a per-position ``logsumexp`` that rounds ``m + log 2`` to ``m``, does not.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, logsumexp
from structift.semiring import Log, Semiring


def expand_binary(binary: Tensor, B: int, T: int, Z: int) -> Tensor:
    """View ``binary`` (broadcastable) as ``[B, T-1, Z, Z]`` without copying."""
    return binary.expand(B, T - 1, Z, Z)


def prepare(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero the padding of the potentials and return them with the validity mask.

    Returns ``unary`` ``[B, T, Z]`` and ``binary`` ``[B, T-1, Z, Z]`` with padding set to 0 (so
    padding can hold anything, even NaN, without leaking into values or gradients) and the mask
    ``[B, T]``. This copies ``binary`` in full: only the log-space path uses it.
    """
    B, T, Z = unary.shape
    binary = expand_binary(binary, B, T, Z)
    mask = lengths_to_mask(lengths.to(unary.device), T)
    zero = unary.new_zeros(())
    unary = torch.where(mask.unsqueeze(-1), unary, zero)
    binary = torch.where(mask[:, 1:, None, None], binary, zero)
    return unary, binary, mask


def _finite_max(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """Detached maximum over ``dim`` (kept), 0 where it is not finite."""
    m = torch.amax(x.detach(), dim=dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def forward(unary: Tensor, binary: Tensor, mask: Tensor, semiring: Semiring = Log) -> Tensor:
    """Run the forward recursion in ``semiring``; return every ``alpha`` ``[B, T, Z]``.

    ``alpha[b, t, j] = (+)_i alpha[b, t-1, i] + binary[b, t-1, i, j]`` then ``+ unary[b, t, j]``
    with ``(+)`` the semiring sum. Positions ``t >= L`` copy ``alpha[b, L-1]`` (selected with
    ``where``, so padding garbage never leaks), hence ``alpha[:, -1]`` is the final one. The
    messages are not centred: their size grows with the prefix (use ``centred_forward`` for
    the log semiring).
    """
    alpha = unary[:, 0]
    alphas = [alpha]
    for t in range(1, unary.shape[1]):
        new = semiring.matvec(alpha, binary[:, t - 1]) + unary[:, t]  # shape: (B, Z)
        alpha = torch.where(mask[:, t, None], new, alpha)
        alphas.append(alpha)
    return torch.stack(alphas, dim=1)


def centred_forward(unary: Tensor, binary: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Centred log-space forward messages and their shifts.

    Returns ``alpha`` ``[B, T, Z]`` with finite maximum 0 at every valid position (padding copies
    the last valid message) and the detached shifts ``c`` ``[B, T]`` (0 on padding), such that
    the unnormalised message is ``alpha_t + sum_{s <= t} c_s`` and
    ``log Z = sum_t c_t + logsumexp(alpha[:, -1])``. The shifts are constants for autograd:
    every quantity built here is invariant to them (``log Z`` adds them back), so gradients of
    any order are exact.
    """
    c0 = _finite_max(unary[:, 0], -1)
    alpha = unary[:, 0] - c0
    alphas, shifts = [alpha], [c0.squeeze(-1)]
    zero = unary.new_zeros(())
    for t in range(1, unary.shape[1]):
        new = Log.matvec(alpha, binary[:, t - 1]) + unary[:, t]  # shape: (B, Z)
        c = _finite_max(new, -1)
        valid = mask[:, t, None]
        alpha = torch.where(valid, new - c, alpha)
        alphas.append(alpha)
        shifts.append(torch.where(valid, c, zero).squeeze(-1))
    return torch.stack(alphas, dim=1), torch.stack(shifts, dim=1)


def centred_backward(unary: Tensor, binary: Tensor, mask: Tensor) -> Tensor:
    """Centred log-space backward messages ``beta`` ``[B, T, Z]`` (0 from ``L-1`` on).

    ``beta_t[i] = logsumexp_j(binary_t[i, j] + unary_{t+1}[j] + beta_{t+1}[j]) - c_t`` with
    ``c_t`` the detached finite maximum, so ``beta_t`` is the backward message up to a constant
    per position (which cancels in every normalised quantity).
    """
    T = unary.shape[1]
    beta = torch.zeros_like(unary[:, 0])
    betas = [beta]
    for t in range(T - 2, -1, -1):
        nxt = (unary[:, t + 1] + beta).unsqueeze(-2)  # shape: (B, 1, Z)
        new = logsumexp(binary[:, t] + nxt, dim=-1)
        new = new - _finite_max(new, -1)
        beta = torch.where(mask[:, t + 1, None], new, beta)
        betas.append(beta)
    return torch.stack(betas[::-1], dim=1)


def normalise(y: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """``softmax`` of log-scores over ``dim`` as a ratio, ``0`` where every entry is ``-inf``.

    ``exp(y - m) / sum(exp(y - m))`` with the detached finite maximum ``m``: the largest term is
    exactly 1, so the total never rounds to 0 and ties stay exact. Differentiable (any order).
    """
    e = torch.exp(y - _finite_max(y, dim))
    s = e.sum(dim=dim, keepdim=True)
    positive = s > 0
    return torch.where(positive, e / torch.where(positive, s, torch.ones_like(s)), 0.0)


def forward_backward(
    unary: Tensor, binary: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute ``(log Z [B], mu_unary [B, T, Z], mu_binary [B, T-1, Z, Z])`` in log space.

    Marginals are normalised per position (module docstring). Differentiable (any order)
    through autograd when the inputs require grad. Sequences without a finite path get
    ``log Z = -inf`` and marginals 0.
    """
    unary, binary, mask = prepare(unary, binary, lengths)
    alpha, shift = centred_forward(unary, binary, mask)
    beta = centred_backward(unary, binary, mask)
    log_z = shift.sum(-1) + logsumexp(alpha[:, -1], dim=-1)
    mu_u = normalise(alpha + beta, -1)
    mu_u = torch.where(mask.unsqueeze(-1), mu_u, 0.0)
    right = (unary[:, 1:] + beta[:, 1:]).unsqueeze(-2)  # shape: (B, T-1, 1, Z)
    left = alpha[:, :-1].unsqueeze(-1)  # shape: (B, T-1, Z, 1)
    mu_b = normalise(left + binary + right, (-2, -1))
    mu_b = torch.where(mask[:, 1:, None, None], mu_b, 0.0)
    return log_z, mu_u, mu_b


def log_partition(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Compute ``log Z`` ``[B]`` by the centred log-space forward recursion only."""
    B, T, Z = unary.shape
    mask = lengths_to_mask(lengths.to(unary.device), T)
    alpha, shift = centred_forward(unary, expand_binary(binary, B, T, Z), mask)
    return shift.sum(-1) + logsumexp(alpha[:, -1], dim=-1)
