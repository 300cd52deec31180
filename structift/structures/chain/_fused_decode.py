"""Fused Viterbi and sampling in Triton: one program per sequence (and block of samples).

Companions of ``_fused`` (same dispatch, layout and lazy compilation): Viterbi runs the max-plus
forward with int32 back-pointers and backtracks in the same program; sampling reuses the fused
forward messages and draws backwards by inverting each step's CDF at uniforms that torch draws
from the caller's generator.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from structift.structures.chain._fused import _launch_args, forward, interpreting, jit

tl: Any = None  # `triton.language`, imported on first use (see `_fused`)


def _viterbi_kernel(
    U, W, LEN, PTR, TAGS,
    su_b, su_t, su_z, sw_b, sw_t, sw_i, sw_j,
    T, Z,
    BZ: tl.constexpr,
):  # fmt: skip
    # Max-plus forward with back-pointers PTR [B, T, Z] (int32), then the backtrack in the same
    # program. Messages are centred each step (argmax is shift-invariant); ties go to the lowest
    # state, as in the log-space path.
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + b)
    r = tl.arange(0, BZ)
    ok = r < Z
    ok2 = ok[:, None] & ok[None, :]
    u_row = U + b * su_b
    w_row = W + b * sw_b
    p_row = PTR + b * T * Z
    tag_row = TAGS + b * T
    tile = r[:, None] * sw_i + r[None, :] * sw_j
    a = tl.load(u_row + r * su_z, mask=ok, other=float("-inf"))
    for t in range(1, n):
        x = a[:, None] + tl.load(w_row + (t - 1) * sw_t + tile, mask=ok2, other=float("-inf"))
        best, arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(p_row + t * Z + r, arg.to(tl.int32), mask=ok)
        a = best + tl.load(u_row + t * su_t + r * su_z, mask=ok, other=float("-inf"))
        m = tl.max(a, 0)
        a = a - tl.where(m == float("-inf"), 0.0, m)
    _, cur = tl.max(a, 0, return_indices=True, return_indices_tie_break_left=True)
    cur = cur.to(tl.int32)
    tl.store(tag_row + n - 1, cur.to(tl.int64))
    for s in range(0, n - 1):
        t = n - 1 - s
        cur = tl.load(p_row + t * Z + cur)
        tl.store(tag_row + t - 1, cur.to(tl.int64))
    for t in range(n, T):
        tl.store(tag_row + t, 0)


def _sample_kernel(
    W, LEN, ALPHA, RAND, OUT,
    sw_b, sw_t, sw_i, sw_j,
    B, T, Z, S,
    BZ: tl.constexpr,
    BS: tl.constexpr,
):  # fmt: skip
    # Backward sampling for a block of BS samples of one sequence (grid: B x ceil(S / BS)):
    # z_{L-1} ~ softmax(alpha_{L-1}), z_t ~ softmax_i(alpha_t[i] + binary_t[i, z_{t+1}]), each
    # drawn by inverting the CDF at one uniform u in (0, 1] from RAND [S, B, T]. The first
    # index whose cumulative mass reaches u * total has positive probability; rounding past the
    # end is clamped to the last state of positive probability.
    b = tl.program_id(0).to(tl.int64)
    sid = tl.program_id(1).to(tl.int64) * BS + tl.arange(0, BS)
    s_ok = sid < S
    n = tl.load(LEN + b)
    r = tl.arange(0, BZ)
    ok = r < Z
    w_row = W + b * sw_b
    a_row = ALPHA + b * T * Z
    at = sid * B * T + b * T  # shape: (BS,) offsets of (s, b, 0) in RAND and OUT
    z = tl.zeros([BS], dtype=tl.int32)
    for s in range(0, n):
        t = n - 1 - s
        a = tl.load(a_row + t * Z + r, mask=ok, other=float("-inf"))
        inner = ok & (r * 0 + t < n - 1)  # a transition into z_{t+1} exists
        col = tl.load(
            w_row + t * sw_t + r[None, :] * sw_i + z[:, None] * sw_j,
            mask=s_ok[:, None] & inner[None, :],
            other=0.0,
        )  # binary_t[i, z_{t+1}], shape: (BS, BZ)
        x = a[None, :] + col
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(x - m[:, None])
        total = tl.sum(p, 1)
        u = tl.load(RAND + at + t, mask=s_ok, other=1.0)
        below = tl.cumsum(p, 1) < (u * total)[:, None]
        first = tl.sum(below.to(tl.int32), 1)
        last = tl.max(tl.where(p > 0, r[None, :], 0), 1)
        z = tl.minimum(first, last).to(tl.int32)
        tl.store(OUT + at + t, z.to(tl.int64), mask=s_ok)
    for t in range(n, T):
        tl.store(OUT + at + t, tl.zeros([BS], dtype=tl.int64), mask=s_ok)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, ...]:
    """The Viterbi and sampling kernels, compiled or interpreted (once per mode)."""
    return jit(globals(), _viterbi_kernel, _sample_kernel)


def viterbi(unary: Tensor, binary: Tensor, lengths: Tensor, warps: int | None = None) -> Tensor:
    """Return the MAP tags LongTensor ``[B, T]`` (0 beyond each length) in one launch.

    Ties go to the lowest state index. Keeps back-pointers ``[B, T, Z]`` (int32); no autograd.
    ``warps``: warps per program (``None``: the default of ``_fused._launch_args``).
    """
    B, T, Z = unary.shape
    u = unary.detach()
    w, strides, bz, warps = _launch_args(u, binary.detach(), warps)
    lengths = lengths.to(device=u.device, dtype=torch.int64).contiguous()
    tags = torch.empty(B, T, dtype=torch.int64, device=u.device)
    ptr = torch.empty(B, T, Z, dtype=torch.int32, device=u.device)
    if B:
        vit = _kernels(interpreting())[0]
        vit[(B,)](u, w, lengths, ptr, tags, *strides, T, Z, BZ=bz, num_warps=warps)
    return tags


def _sample_block(n: int, bz: int) -> int:
    """Samples per program: a [BS, BZ] tile of at most 4096 entries (registers), at most 64.

    The interpreter runs programs one after another, so there larger blocks (1024) are faster.
    """
    cap = 1024 if interpreting() else min(64, max(16, 4096 // bz))
    return max(16, min(cap, 1 << max(0, n - 1).bit_length()))


def sample(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw exact samples LongTensor ``[*S, B, T]`` (0 beyond each length) in two launches.

    The forward kernel's messages, then backward sampling by inverse CDF with uniforms drawn by
    torch from ``generator`` (``[S, B, T]``), so seeding works as on the other path, though the
    two paths turn a seed into different samples.
    """
    B, T, Z = unary.shape
    u = unary.detach()
    n = 1
    for d in sample_shape:
        n *= int(d)
    _, state = forward(u, binary, lengths)
    w, strides, bz, _ = _launch_args(u, binary.detach())
    lengths = lengths.to(device=u.device, dtype=torch.int64).contiguous()
    # 1 - U[0, 1) is in (0, 1]: a zero would select a state of probability 0.
    rand = 1.0 - torch.rand(n, B, T, generator=generator, device=u.device, dtype=u.dtype)
    out = torch.empty(n, B, T, dtype=torch.int64, device=u.device)
    bs = _sample_block(n, bz)
    if B and n:
        draw = _kernels(interpreting())[1]
        draw[(B, -(-n // bs))](
            w, lengths, state.alpha, rand, out, *strides[3:], B, T, Z, n,
            BZ=bz, BS=bs, num_warps=max(1, min(8, bs * bz // 512)),
        )  # fmt: skip
    return out.reshape(*sample_shape, B, T)
