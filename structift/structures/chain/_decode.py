"""Decoding on a chain: score of a tag sequence, Viterbi (MAP) and exact sampling."""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.semiring import Max
from structift.structures.chain import _log


def score(unary: Tensor, binary: Tensor, lengths: Tensor, tags: Tensor) -> Tensor:
    """Compute ``<theta, phi(tags)>`` respecting lengths (differentiable).

    ``sum_{t<L} unary[t, z_t] + sum_{t<L-1} binary[t, z_t, z_{t+1}]``.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.
        tags: LongTensor ``[B, T]``; entries beyond each length are ignored (any value).

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
        flat = _log.expand_binary(binary, B, T, Z).reshape(B, T - 1, Z * Z)
        pair = (tags[:, :-1] * Z + tags[:, 1:]).unsqueeze(-1)
        e = flat.gather(2, pair).squeeze(-1)  # shape: (B, T-1)
        total = total + torch.where(mask[:, 1:], e, zero).sum(-1)
    return total


def viterbi(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Find the MAP tags ``[B, T]`` by a max-plus loop in torch (any device).

    The loop behind the ``Log`` and ``Scaled`` backends' ``viterbi``: the max semiring's
    ``matvec`` with back-pointers, messages centred at every step (the argmax is
    shift-invariant, and centring keeps float32 ties as resolvable at step 10,000 as at step 1).
    Ties go to the lowest state. Tags beyond each length are 0.
    """
    with torch.no_grad():
        B, T, Z = unary.shape
        b = _log.expand_binary(binary, B, T, Z)
        mask = lengths_to_mask(lengths.to(unary.device), T)
        ident = torch.arange(Z, device=unary.device).expand(B, Z)
        alpha = _centre(unary[:, 0])
        pointers = []
        for t in range(1, T):
            best, arg = Max.matvec_argmax(alpha, b[:, t - 1])  # shape: (B, Z)
            valid = mask[:, t, None]
            alpha = torch.where(valid, _centre(best + unary[:, t]), alpha)
            # Padding points each state to itself, so backtracking carries the last tag through.
            pointers.append(torch.where(valid, arg, ident))
        last = alpha.argmax(dim=-1)
        tags = [last]
        for ptr in reversed(pointers):
            last = ptr.gather(1, last.unsqueeze(-1)).squeeze(-1)
            tags.append(last)
        path = torch.stack(tags[::-1], dim=1)
        return torch.where(mask, path, torch.zeros_like(path))


def _centre(alpha: Tensor) -> Tensor:
    """Subtract each row's finite maximum (rows of all ``-inf`` stay as they are)."""
    m = alpha.amax(-1, keepdim=True)
    return alpha - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def sample(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw exact samples by forward-filtering backward-sampling in a log-space loop.

    The path behind ``structift.chain.sample`` (arguments and returns as there), drawing
    ``z_t`` with the Gumbel-max trick from the log-space forward messages.
    """
    with torch.no_grad():
        B, T, Z = unary.shape
        b = _log.expand_binary(binary, B, T, Z)
        lens = lengths.to(unary.device)
        mask = lengths_to_mask(lens, T)
        alpha, _ = _log.centred_forward(unary, b, mask)  # centred: float32 logits stay O(1 step)
        n = 1
        for s in sample_shape:
            n *= int(s)
        rows = torch.arange(B, device=unary.device)
        tiny = torch.finfo(alpha.dtype).tiny
        nxt = torch.zeros(n, B, dtype=torch.long, device=unary.device)
        out = torch.zeros(n, B, T, dtype=torch.long, device=unary.device)
        for t in range(T - 1, -1, -1):
            logits = alpha[:, t].expand(n, B, Z)
            if t < T - 1:
                into = b[:, t].transpose(1, 2)[rows, nxt]  # binary_t[:, z_{t+1}], shape: (n, B, Z)
                inner = (t < lens - 1)[None, :, None]
                logits = torch.where(inner, logits + into, logits)
            u = torch.rand(n, B, Z, generator=generator, device=unary.device, dtype=alpha.dtype)
            gumbel = -torch.log(-torch.log(u.clamp_min(tiny)))
            z = (logits + gumbel).argmax(dim=-1)
            z = torch.where(mask[:, t].expand(n, B), z, torch.zeros_like(z))
            out[:, :, t] = z
            nxt = z
    return out.reshape(*sample_shape, B, T)
