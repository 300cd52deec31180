"""Log-space chain recursions: the reference path, differentiable by autograd.

Used for third derivatives (a graph of the Hessian-vector product), for the rows that the
scaled probability-space path cannot certify, and by Viterbi and sampling. Every reduction uses the
NaN-safe logsumexp, so ``-inf`` potentials give ``-inf`` values and zero gradients.
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


def forward(unary: Tensor, binary: Tensor, mask: Tensor, semiring: Semiring = Log) -> Tensor:
    """Run the forward recursion; return every ``alpha`` ``[B, T, Z]``.

    ``alpha[b, t, j] = (+)_i alpha[b, t-1, i] + binary[b, t-1, i, j]`` then ``+ unary[b, t, j]``
    with ``(+)`` the semiring sum. Positions ``t >= L`` copy ``alpha[b, L-1]`` (selected with
    ``where``, so padding garbage never leaks), hence ``alpha[:, -1]`` is the final one.
    """
    alpha = unary[:, 0]
    alphas = [alpha]
    for t in range(1, unary.shape[1]):
        new = semiring.matvec(alpha, binary[:, t - 1]) + unary[:, t]  # shape: (B, Z)
        alpha = torch.where(mask[:, t, None], new, alpha)
        alphas.append(alpha)
    return torch.stack(alphas, dim=1)


def backward(unary: Tensor, binary: Tensor, mask: Tensor) -> Tensor:
    """Run the backward recursion; return every ``beta`` ``[B, T, Z]``.

    ``beta[b, t, i] = logsumexp_j binary[b, t, i, j] + unary[b, t+1, j] + beta[b, t+1, j]`` for
    ``t < L-1`` and ``beta[b, t] = 0`` for ``t >= L-1``.
    """
    T = unary.shape[1]
    beta = torch.zeros_like(unary[:, 0])
    betas = [beta]
    for t in range(T - 2, -1, -1):
        nxt = (unary[:, t + 1] + beta).unsqueeze(-2)  # shape: (B, 1, Z)
        new = logsumexp(binary[:, t] + nxt, dim=-1)
        beta = torch.where(mask[:, t + 1, None], new, beta)
        betas.append(beta)
    return torch.stack(betas[::-1], dim=1)


def forward_backward(
    unary: Tensor, binary: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute ``(log Z [B], mu_unary [B, T, Z], mu_binary [B, T-1, Z, Z])`` in log space.

    ``mu_unary[t] = exp(alpha_t + beta_t - log Z)`` and
    ``mu_binary[t, i, j] = exp(alpha_t[i] + binary_t[i, j] + unary_{t+1}[j] + beta_{t+1}[j] -
    log Z)``. Differentiable (any order) through autograd when the inputs require grad.
    Sequences without a finite path get ``log Z = -inf`` and marginals 0.
    """
    unary, binary, mask = prepare(unary, binary, lengths)
    alpha = forward(unary, binary, mask)
    beta = backward(unary, binary, mask)
    log_z = logsumexp(alpha[:, -1], dim=-1)
    finite = torch.isfinite(log_z)
    # exp(-inf - -inf) would be NaN: dead sequences use a 0 normaliser and are zeroed below.
    log_z_safe = torch.where(finite, log_z, torch.zeros_like(log_z))
    keep = mask & finite[:, None]
    mu_u = torch.exp(alpha + beta - log_z_safe[:, None, None])
    mu_u = torch.where(keep.unsqueeze(-1), mu_u, torch.zeros_like(mu_u))
    right = (unary[:, 1:] + beta[:, 1:]).unsqueeze(-2)  # shape: (B, T-1, 1, Z)
    left = alpha[:, :-1].unsqueeze(-1)  # shape: (B, T-1, Z, 1)
    mu_b = torch.exp(left + binary + right - log_z_safe[:, None, None, None])
    mu_b = torch.where(keep[:, 1:, None, None], mu_b, torch.zeros_like(mu_b))
    return log_z, mu_u, mu_b


def log_partition(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Compute ``log Z`` ``[B]`` by the log-space forward recursion only."""
    B, T, Z = unary.shape
    mask = lengths_to_mask(lengths.to(unary.device), T)
    alpha = forward(unary, expand_binary(binary, B, T, Z), mask)
    return logsumexp(alpha[:, -1], dim=-1)
