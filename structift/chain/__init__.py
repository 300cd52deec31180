"""Linear-chain kernels: log-partition, marginals, Viterbi, score and sampling.

All functions are pure and batch-first. Potentials are log-space scores:

* ``unary`` ``[B, T, Z]``: ``unary[b, t, z]`` scores state ``z`` at position ``t``;
* ``binary`` ``[B, T-1, Z, Z]`` laid out ``[from, to]``: ``binary[b, t, i, j]`` scores the
  transition ``z_t = i -> z_{t+1} = j`` (anything broadcastable to that shape is accepted);
* ``lengths`` LongTensor ``[B]`` with ``1 <= lengths[b] <= T``.

The score of a tag sequence ``z`` of length ``L`` is
``<theta, phi(z)> = sum_{t<L} unary[t, z_t] + sum_{t<L-1} binary[t, z_t, z_{t+1}]`` and
``A(theta) = log sum_z exp <theta, phi(z)>``. Padding (``unary[b, t]`` for ``t >= L``,
``binary[b, t]`` for ``t >= L-1``) is ignored: its value never matters and its gradient is 0.
Potentials may be ``-inf`` (hard constraints). A sequence without a finite-score path has
``A = -inf`` and gradient (marginals) ``0``; no NaN is ever produced from ``-inf``.

No validation beyond cheap shape asserts happens here: the families validate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, logsumexp
from structift.semiring import Log, Semiring

__all__ = ["log_partition", "marginals", "sample", "score", "viterbi"]


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def _prepare(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Zero the padding of the potentials and return them with the validity mask.

    Returns ``unary`` ``[B, T, Z]``, ``binary`` ``[B, T-1, Z, Z]`` with padding set to 0 (so
    padding can hold anything, even NaN, without leaking into values or gradients) and the mask
    ``[B, T]``.
    """
    assert unary.dim() == 3, "unary must be [B, T, Z]"
    B, T, Z = unary.shape
    binary = binary.expand(B, T - 1, Z, Z)
    mask = lengths_to_mask(lengths.to(unary.device), T)
    zero = unary.new_zeros(())
    unary = torch.where(mask.unsqueeze(-1), unary, zero)
    binary = torch.where(mask[:, 1:, None, None], binary, zero)
    return unary, binary, mask


# --------------------------------------------------------------------------------------------
# Log-space recursions (differentiable by autograd; the reference path)
# --------------------------------------------------------------------------------------------


def _forward_log(unary: Tensor, binary: Tensor, mask: Tensor, semiring: Semiring = Log) -> Tensor:
    """Run the forward recursion; return all ``alpha`` ``[B, T, Z]``.

    ``alpha[b, t, j] = sum_i (alpha[b, t-1, i] * binary[b, t-1, i, j]) * unary[b, t, j]`` in the
    semiring; positions ``t >= L`` copy ``alpha[b, L-1]`` so ``alpha[:, -1]`` is the final one.
    """
    alpha = unary[:, 0]
    alphas = [alpha]
    for t in range(1, unary.shape[1]):
        new = semiring.matvec(alpha, binary[:, t - 1]) + unary[:, t]  # shape: (B, Z)
        alpha = torch.where(mask[:, t, None], new, alpha)
        alphas.append(alpha)
    return torch.stack(alphas, dim=1)


def _backward_log(unary: Tensor, binary: Tensor, mask: Tensor) -> Tensor:
    """Run the backward recursion; return all ``beta`` ``[B, T, Z]``.

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


def _marginals_log(unary: Tensor, binary: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Compute ``(log Z, mu_unary, mu_binary)`` by log-space forward-backward.

    Differentiable (twice and more) through autograd when the inputs require grad; this is
    the path used for ``create_graph=True``. Inputs must already be prepared by ``_prepare``.
    """
    alpha = _forward_log(unary, binary, mask)
    beta = _backward_log(unary, binary, mask)
    log_z = logsumexp(alpha[:, -1], dim=-1)  # shape: (B,)
    finite = torch.isfinite(log_z)
    # Sequences without a finite path get marginals 0, not exp(-inf - -inf) = NaN.
    log_z_safe = torch.where(finite, log_z, torch.zeros_like(log_z))
    keep_u = mask & finite[:, None]
    mu_u = torch.exp(alpha + beta - log_z_safe[:, None, None])
    mu_u = torch.where(keep_u.unsqueeze(-1), mu_u, torch.zeros_like(mu_u))
    right = (unary[:, 1:] + beta[:, 1:]).unsqueeze(-2)  # shape: (B, T-1, 1, Z)
    left = alpha[:, :-1].unsqueeze(-1)  # shape: (B, T-1, Z, 1)
    mu_b = torch.exp(left + binary + right - log_z_safe[:, None, None, None])
    keep_b = keep_u[:, 1:, None, None]
    mu_b = torch.where(keep_b, mu_b, torch.zeros_like(mu_b))
    return log_z, mu_u, mu_b


# --------------------------------------------------------------------------------------------
# Custom autograd function: backward = marginals, no per-step graph kept
# --------------------------------------------------------------------------------------------


class _LogPartition(torch.autograd.Function):
    """``A(theta)`` whose backward returns the forward-backward marginals.

    The forward keeps no autograd graph, only its inputs. The first-order backward runs the
    backward recursion without a graph; when a graph is requested (double backward,
    ``create_graph=True``) it recomputes the marginals through the differentiable log-space
    path so Hessian-vector products are exact.
    """

    @staticmethod
    def forward(ctx, unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
        u, b, mask = _prepare(unary, binary, lengths)
        alpha = _forward_log(u, b, mask)
        ctx.save_for_backward(unary, binary, lengths)
        ctx.binary_shape = binary.shape
        ctx.mark_non_differentiable(lengths)
        return logsumexp(alpha[:, -1], dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        unary, binary, lengths = ctx.saved_tensors
        u, b, mask = _prepare(unary, binary, lengths)
        if torch.is_grad_enabled():
            _, mu_u, mu_b = _marginals_log(u, b, mask)
        else:
            _, mu_u, mu_b = _marginals_log(u.detach(), b.detach(), mask)
        g_u = grad[:, None, None] * mu_u if ctx.needs_input_grad[0] else None
        g_b = None
        if ctx.needs_input_grad[1]:
            g_b = grad[:, None, None, None] * mu_b
            g_b = _sum_to_shape(g_b, ctx.binary_shape)
        return g_u, g_b, None


def _sum_to_shape(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the reverse of ``expand``)."""
    if x.shape == shape:
        return x
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead > 0 else x
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def log_partition(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Compute the log-partition ``A(theta) = log sum_z exp <theta, phi(z)>`` of a chain.

    The gradient w.r.t. ``unary`` and ``binary`` is the marginals (0 on padding), computed by
    the backward recursion without storing a per-step graph. Twice differentiable.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths[b] <= T``.

    Returns:
        ``[B]``; ``-inf`` where no tag sequence has a finite score (gradient 0 there).
    """
    return _LogPartition.apply(unary, binary, lengths)


def marginals(
    unary: Tensor, binary: Tensor, lengths: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """Compute the exact marginals ``mu = grad A(theta)`` by forward-backward.

    ``mu_unary[b, t, z] = p(z_t = z)`` and ``mu_binary[b, t, i, j] = p(z_t = i, z_{t+1} = j)``.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths[b] <= T``.
        create_graph: If ``True`` the result is differentiable w.r.t. ``unary`` and ``binary``
            (Hessian-vector products of ``A``); otherwise it is detached.

    Returns:
        ``(mu_unary [B, T, Z], mu_binary [B, T-1, Z, Z])``, zero beyond each length and for
        sequences without a finite-score path.
    """
    if create_graph:
        u, b, mask = _prepare(unary, binary, lengths)
        _, mu_u, mu_b = _marginals_log(u, b, mask)
        return mu_u, mu_b
    with torch.no_grad():
        u, b, mask = _prepare(unary, binary, lengths)
        _, mu_u, mu_b = _marginals_log(u, b, mask)
    return mu_u, mu_b


def score(unary: Tensor, binary: Tensor, lengths: Tensor, tags: Tensor) -> Tensor:
    """Compute ``<theta, phi(tags)>`` respecting lengths (differentiable).

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.
        tags: LongTensor ``[B, T]``; entries beyond each length are ignored.

    Returns:
        ``[B]`` scores (``-inf`` if the sequence uses a forbidden potential).
    """
    B, T, Z = unary.shape
    mask = lengths_to_mask(lengths.to(unary.device), T)
    tags = torch.where(mask, tags, torch.zeros_like(tags))
    zero = unary.new_zeros(())
    u = unary.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # shape: (B, T)
    total = torch.where(mask, u, zero).sum(-1)
    if T > 1:
        flat = binary.expand(B, T - 1, Z, Z).reshape(B, T - 1, Z * Z)
        pair = (tags[:, :-1] * Z + tags[:, 1:]).unsqueeze(-1)
        e = flat.gather(2, pair).squeeze(-1)  # shape: (B, T-1)
        total = total + torch.where(mask[:, 1:], e, zero).sum(-1)
    return total


def viterbi(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Find the highest-scoring tag sequence (MAP) by max-product dynamic programming.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.

    Returns:
        ``(tags LongTensor [B, T], score [B])``. Tags beyond each length are 0. ``score`` is
        ``score(unary, binary, lengths, tags)`` (differentiable; ``-inf`` and an arbitrary path
        when no finite path exists). Ties go to the lowest state index.
    """
    with torch.no_grad():
        u, b, mask = _prepare(unary, binary, lengths)
        B, T, Z = u.shape
        ident = torch.arange(Z, device=u.device).expand(B, Z)
        alpha = u[:, 0]
        pointers = []
        for t in range(1, T):
            best, arg = (alpha.unsqueeze(-1) + b[:, t - 1]).max(dim=1)  # shape: (B, Z)
            valid = mask[:, t, None]
            alpha = torch.where(valid, best + u[:, t], alpha)
            # Padding points each state to itself, so backtracking carries the last tag through.
            pointers.append(torch.where(valid, arg, ident))
        last = alpha.argmax(dim=-1)
        tags = [last]
        for ptr in reversed(pointers):
            last = ptr.gather(1, last.unsqueeze(-1)).squeeze(-1)
            tags.append(last)
        path = torch.stack(tags[::-1], dim=1)
        path = torch.where(mask, path, torch.zeros_like(path))
    return path, score(unary, binary, lengths, path)


def sample(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw exact samples ``z ~ p(z) = exp(<theta, phi(z)> - A)`` (forward-filtering
    backward-sampling).

    Each ``z_t`` is drawn from ``p(z_t | z_{t+1}) ∝ exp(alpha_t(z_t) + binary_t(z_t, z_{t+1}))``
    with the Gumbel-max trick, from the last valid position backwards.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.
        sample_shape: Leading sample dimensions ``S``.
        generator: Optional ``torch.Generator`` on the potentials' device.

    Returns:
        LongTensor ``[*S, B, T]``; padding positions are 0. Sequences without a finite path
        get an arbitrary (but NaN-free) sequence.
    """
    with torch.no_grad():
        u, b, mask = _prepare(unary, binary, lengths)
        B, T, Z = u.shape
        alpha = _forward_log(u, b, mask)
        n = 1
        for s in sample_shape:
            n *= int(s)
        lens = lengths.to(u.device)
        rows = torch.arange(B, device=u.device)
        tiny = torch.finfo(u.dtype).tiny
        nxt = torch.zeros(n, B, dtype=torch.long, device=u.device)
        out = torch.zeros(n, B, T, dtype=torch.long, device=u.device)
        for t in range(T - 1, -1, -1):
            logits = alpha[:, t].expand(n, B, Z)
            if t < T - 1:
                # column b[:, t, :, z_{t+1}] for each sample: shape (n, B, Z)
                into = b[:, t].transpose(1, 2)[rows, nxt]
                inner = (t < lens - 1)[None, :, None]
                logits = torch.where(inner, logits + into, logits)
            gumbel = torch.rand(n, B, Z, generator=generator, device=u.device, dtype=u.dtype)
            gumbel = -torch.log(-torch.log(gumbel.clamp_min(tiny)))
            z = (logits + gumbel).argmax(dim=-1)
            z = torch.where(mask[:, t].expand(n, B), z, torch.zeros_like(z))
            out[:, :, t] = z
            nxt = z
    return out.reshape(*sample_shape, B, T)
