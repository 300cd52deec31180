"""Fused tangent sweeps of the chain Hessian-vector product in Triton (see ``_hvp``).

``_hvp.hvp`` forms ``H v`` from the marginals with a few whole-tensor passes and two linear
recursions over ``t``: the forward one for ``ra`` and the backward one for ``rb``. On a GPU each
step of those loops is four small kernel launches; here one launch runs both, one program per
(sequence, direction), each keeping its message in registers and loading one ``[Z, Z]`` tile of
``mu_b`` per step::

    ra[0] = vu[0] - <vu[0], mu_u[0]>
    ra[t] = c(g_f[t-1] + inv_to[t-1] * (ra[t-1] @ mu_b[t-1]))          t = 1 .. T-1
    rb[T-1] = 0
    rb[t] = c(g_b[t] + inv_from[t] * (mu_b[t] @ rb[t+1]))              t = T-2 .. 0

with ``c(x) = x - <x, mu_u[t]>`` the per-step centring. Same arithmetic as the loops, so the
same float32 behaviour; inputs come from ``_hvp`` (contiguous, the working dtype).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from structift.structures.chain._fused import interpreting, jit

tl: Any = None  # `triton.language`, imported on first use (see `_fused`)


def _sweep_kernel(
    MU_B, G_F, INV_TO, G_B, INV_FROM, MU_U, VU, RA, RB,
    T, Z,
    BZ: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    backward = tl.program_id(1) == 1
    r = tl.arange(0, BZ)
    ok = r < Z
    ok2 = ok[:, None] & ok[None, :]
    tile = r[:, None] * Z + r[None, :]
    m_row = MU_B + b * (T - 1) * Z * Z
    v_row = b * (T - 1) * Z  # offset of (b, 0) in the [B, T-1, Z] inputs
    n_row = b * T * Z  # offset of (b, 0) in the [B, T, Z] tensors
    if backward:
        rb = tl.zeros([BZ], dtype=RB.dtype.element_ty)
        tl.store(RB + n_row + (T - 1) * Z + r, rb, mask=ok)
        for s in range(0, T - 1):
            t = T - 2 - s
            m = tl.load(m_row + t * Z * Z + tile, mask=ok2, other=0.0)
            g = tl.load(G_B + v_row + t * Z + r, mask=ok, other=0.0)
            inv = tl.load(INV_FROM + v_row + t * Z + r, mask=ok, other=0.0)
            new = g + inv * tl.sum(m * rb[None, :], 1)
            w = tl.load(MU_U + n_row + t * Z + r, mask=ok, other=0.0)
            rb = new - tl.sum(new * w, 0)
            tl.store(RB + n_row + t * Z + r, rb, mask=ok)
    else:
        v = tl.load(VU + b * Z + r, mask=ok, other=0.0)
        w = tl.load(MU_U + n_row + r, mask=ok, other=0.0)
        ra = v - tl.sum(v * w, 0)
        tl.store(RA + n_row + r, ra, mask=ok)
        for t in range(1, T):
            m = tl.load(m_row + (t - 1) * Z * Z + tile, mask=ok2, other=0.0)
            g = tl.load(G_F + v_row + (t - 1) * Z + r, mask=ok, other=0.0)
            inv = tl.load(INV_TO + v_row + (t - 1) * Z + r, mask=ok, other=0.0)
            new = g + inv * tl.sum(ra[:, None] * m, 0)
            w = tl.load(MU_U + n_row + t * Z + r, mask=ok, other=0.0)
            ra = new - tl.sum(new * w, 0)
            tl.store(RA + n_row + t * Z + r, ra, mask=ok)


@functools.cache
def _kernels(interpret: bool) -> Any:
    """The sweep kernel, compiled or interpreted (once per mode)."""
    return jit(globals(), _sweep_kernel)[0]


def sweeps(
    mu_u: Tensor,
    mu_b: Tensor,
    vu0: Tensor,
    g_f: Tensor,
    inv_to: Tensor,
    g_b: Tensor,
    inv_from: Tensor,
) -> tuple[Tensor, Tensor]:
    """Return the centred tangent messages ``(ra, rb)``, each ``[B, T, Z]``, in one launch.

    Args:
        mu_u: ``[B, T, Z]`` unary marginals (the centring weights).
        mu_b: ``[B, T-1, Z, Z]`` binary marginals.
        vu0: ``[B, Z]`` the unary direction at ``t = 0``.
        g_f, inv_to, g_b, inv_from: ``[B, T-1, Z]`` step terms and inverse column / row sums
            of ``mu_b``, as in ``_hvp.hvp``.
    """
    B, T, Z = mu_u.shape
    args = [x.contiguous() for x in (mu_b, g_f, inv_to, g_b, inv_from, mu_u, vu0)]
    ra = torch.empty_like(args[5])
    rb = torch.empty_like(args[5])
    bz = max(16, 1 << (Z - 1).bit_length())
    if B:
        _kernels(interpreting())[(B, 2)](
            *args, ra, rb, T, Z, BZ=bz, num_warps=max(1, min(8, bz * bz // 512))
        )
    return ra, rb
