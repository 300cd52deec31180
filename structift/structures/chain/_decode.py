"""Decoding on a chain: score of a tag sequence, Viterbi (MAP) and exact sampling."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from structift._ops import lengths_to_mask
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
    B, T, _ = unary.shape
    mask = lengths_to_mask(lengths.to(unary.device), T)
    tags = torch.where(mask, tags, torch.zeros_like(tags))
    zero = unary.new_zeros(())
    u = unary.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # shape: (B, T)
    total = torch.where(mask, u, zero).sum(-1)
    if T > 1:
        # Index the stored blocks (a shared [Z, Z] is read as is), never the expanded view:
        # the backward of a gather on an expanded view allocates the full [B, T-1, Z, Z].
        base = binary
        while base.dim() < 4:
            base = base.unsqueeze(0)
        rows = torch.arange(B, device=unary.device)[:, None] if base.shape[0] > 1 else 0
        steps = torch.arange(T - 1, device=unary.device)[None, :] if base.shape[1] > 1 else 0
        e = base[rows, steps, tags[:, :-1], tags[:, 1:]]  # shape: (B, T-1)
        total = total + torch.where(mask[:, 1:], e, zero).sum(-1)
    return total


# From this many states on, the forward pass keeps only the maxima (``amax`` is many times
# faster than ``max`` with indices over a [Z, B, Z] block) and the back-pointers are recomputed
# while backtracking, one [B, Z] row a step (ties resolve identically: same sums, first index).
RECOMPUTE_POINTERS_FROM = 16


def viterbi(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Find the MAP tags ``[B, T]`` by a max-plus loop in torch (any device).

    The loop behind the ``Log`` and ``Scaled`` backends' ``viterbi``: the max semiring's
    ``matvec`` with back-pointers, messages centred at every step (the argmax is
    shift-invariant, and centring keeps float32 ties as resolvable at step 10,000 as at step 1).
    Ties go to the lowest state. Tags beyond each length are 0.

    Each step is six ops on preallocated buffers, none for padding (the per-op overhead is the
    whole cost for small ``B Z``). The scores are laid out ``[from, B, to]``, so the max over
    ``from`` is an element-wise maximum of contiguous ``[B, Z]`` slices (vectorised for any ``Z``; a
    reduction over the last dimension is not). For ``Z < RECOMPUTE_POINTERS_FROM`` the
    back-pointers are taken in the forward pass; from there on only the centred messages are
    kept and each pointer is recomputed as ``argmax_i alpha_{t-1}[i] + binary[i, z_t]`` while
    backtracking.
    """
    with torch.no_grad():
        B, T, Z = unary.shape
        device = unary.device
        lengths = lengths.to(device)
        mask = lengths_to_mask(lengths, T)
        blocks = _blocks(binary, B, T)
        recompute = Z >= RECOMPUTE_POINTERS_FROM
        lowest = torch.finfo(unary.dtype).min
        U = unary.transpose(0, 1)  # shape: (T, B, Z), a view
        pointers = torch.empty(0 if recompute else max(T - 1, 0), B, Z, dtype=torch.long,
                               device=device)  # fmt: skip
        alphas = unary.new_empty(T, B, Z)
        P, A = pointers.unbind(0), alphas.unbind(0)
        cand = unary.new_empty(Z, B, Z)
        top = unary.new_empty(B, 1)
        A[0].copy_(_centre(unary[:, 0]))
        # Steps past a row's length run on (rows never mix; padding may hold anything, even
        # NaN): the final state is read at L - 1 and backtracking starts there.
        for t in range(1, T):
            blk = blocks[0] if len(blocks) == 1 else blocks[t - 1]
            torch.add(A[t - 1].T.unsqueeze(-1), blk, out=cand)  # cand[i, b, j], (Z, B, Z)
            new = A[t]
            if recompute:
                torch.amax(cand, dim=0, out=new)
            else:
                torch.max(cand, dim=0, out=(new, P[t - 1]))  # ties: the first (lowest) i
            new.add_(U[t])
            # Centre: subtract the row maximum; clamping keeps all--inf rows at -inf (no NaN).
            torch.amax(new, -1, keepdim=True, out=top)
            new.sub_(top.clamp_min_(lowest))
        rows = torch.arange(B, device=device)
        last = alphas[(lengths - 1).clamp_min(0), rows].argmax(dim=-1)
        if recompute:
            path = _backtrack_recompute(alphas, blocks, mask, last)
        else:
            path = _backtrack(pointers, mask, last)
        return torch.where(mask, path, torch.zeros_like(path))


def _blocks(binary: Tensor, B: int, T: int) -> list[Tensor]:
    """The transition blocks as ``[from, 1 or B, to]`` views: one if shared over time."""
    b = binary
    while b.dim() < 4:
        b = b.unsqueeze(0)
    if b.shape[0] > 1 and b.stride(0) == 0:
        b = b[:1]
    if b.shape[1] > 1 and b.stride(1) == 0:
        b = b[:, :1]
    if T < 2:
        return []
    b = b.permute(1, 2, 0, 3)  # shape: (Tb, from, Bb, to)
    return [b[0]] if b.shape[0] == 1 else list(b.unbind(0))


def _backtrack(pointers: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """Follow ``pointers`` ``[T-1, B, Z]`` back from the final states ``last`` ``[B]``.

    Row ``b`` starts at position ``L_b - 1``: beyond it the state is carried unchanged.
    """
    n, B = pointers.shape[0], last.shape[0]
    if pointers.device.type == "cpu":
        # One numpy fancy-index a step costs a fraction of a torch gather's dispatch.
        ptr, V = pointers.numpy(), mask.numpy()
        rows = np.arange(B)
        out = np.empty((B, n + 1), dtype=np.int64)
        state = last.numpy()
        out[:, n] = state
        for t in range(n - 1, -1, -1):
            state = np.where(V[:, t + 1], ptr[t, rows, state], state)
            out[:, t] = state
        return torch.from_numpy(out)
    tags = [last]
    for t in range(n - 1, -1, -1):
        prev = pointers[t].gather(1, last.unsqueeze(-1)).squeeze(-1)
        last = torch.where(mask[:, t + 1], prev, last)
        tags.append(last)
    return torch.stack(tags[::-1], dim=1)


def _backtrack_recompute(
    alphas: Tensor, blocks: list[Tensor], mask: Tensor, last: Tensor
) -> Tensor:
    """Backtrack with pointers recomputed: ``z_{t-1} = argmax_i alphas[t-1, i] + W_t[i, z_t]``.

    ``alphas`` ``[T, B, Z]`` are the forward pass's centred messages and ``blocks`` its
    ``[from, 1 or B, to]`` transition blocks: the sums are the forward pass's own, so the first
    maximal index is the pointer it would have stored. Padding (``t >= L``) keeps the state.
    """
    T, B, _ = alphas.shape
    if alphas.device.type == "cpu":
        A, V = alphas.numpy(), mask.numpy()
        W = [blk.numpy() for blk in blocks]
        rows = np.arange(B)
        out = np.empty((B, T), dtype=np.int64)
        state = last.numpy()
        out[:, T - 1] = state
        for t in range(T - 1, 0, -1):
            w = W[0] if len(W) == 1 else W[t - 1]
            col = w[:, 0, state] if w.shape[1] == 1 else w[:, rows, state]  # shape: (Z, B)
            prev = (A[t - 1] + col.T).argmax(-1)  # numpy: the first maximal index
            state = np.where(V[:, t], prev, state)
            out[:, t - 1] = state
        return torch.from_numpy(out)
    rows_t = torch.arange(B, device=alphas.device)
    tags = [last]
    for t in range(T - 1, 0, -1):
        blk = blocks[0] if len(blocks) == 1 else blocks[t - 1]
        col_t = blk[:, 0, last] if blk.shape[1] == 1 else blk[:, rows_t, last]  # shape: (Z, B)
        prev_t = (alphas[t - 1] + col_t.T).argmax(-1)
        last = torch.where(mask[:, t], prev_t, last)
        tags.append(last)
    return torch.stack(tags[::-1], dim=1)


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
