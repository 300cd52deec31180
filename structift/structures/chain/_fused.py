"""Fused forward-backward in Triton: one program per sequence, the whole chain in one launch.

On a GPU the per-step loops of ``_scaled`` and ``_log`` launch several small kernels per time
step; at ``B = 256, T = 128, Z = 32`` launch latency, not arithmetic or memory traffic, is
their cost. Here one Triton program walks one sequence: the message stays in registers and each
step loads one ``[Z, Z]`` transition tile, so a forward-backward is two launches that read the
potentials twice and write the marginals once (the bandwidth floor of the problem).

The recursions are the log-space ones of ``_log`` (``m + log sum exp(x - m)`` with the maximum
``m`` replaced by 0 where it is ``-inf``, so ``-inf`` potentials give ``-inf`` and never NaN)::

    alpha_0 = unary_0
    alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + binary_{t-1}[i, j]) + unary_t[j]     t < L
    beta_{L-1} = 0
    beta_t[i] = logsumexp_j(binary_t[i, j] + unary_{t+1}[j] + beta_{t+1}[j])         t < L-1
    mu_unary[t, j] = exp(alpha_t[j] + beta_t[j] - log Z)
    mu_binary[t, i, j] = exp(alpha_t[i] + binary_t[i, j] + unary_{t+1}[j] + beta_{t+1}[j] - log Z)

Both messages are re-centred every step (maximum 0; the forward sums the shifts into ``log Z``)
and each position's marginals are normalised by their own total, as a ratio ``exp(y - max y) /
sum exp(y - max y)`` over the step, so float32 rounding does not grow with ``T`` or ``|log Z|``.

Positions at or beyond a sequence's length are never read (padding may hold anything) and get a
zero gradient. A sequence without a finite-score path has ``log Z = -inf`` and zero marginals.

The forward keeps ``alpha`` ``[B, T, Z]`` (``O(B T Z)``); the backward recomputes ``beta`` on the
fly. A transition matrix shared over time (``[Z, Z]`` or ``[B, 1, Z, Z]``) has its gradient summed
over time in registers (``[B, Z, Z]`` written, then summed over a shared batch); one shared over
the batch only (``[1, T-1, Z, Z]``) is written per sequence and summed afterwards.

Triton is optional: without it (or for ``Z > MAX_Z``, where a ``[Z, Z]`` tile no longer fits in
registers) the dispatcher in ``structift.chain`` uses the scaled path. With ``TRITON_INTERPRET=1``
the same kernels run on CPU tensors through Triton's interpreter, which is how CI tests them.
Viterbi and sampling kernels are in ``_fused_decode``, the HVP sweeps in ``_fused_hvp``.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from structift import config
from structift.structures.chain import _log
from structift.structures.chain._scaled import as_4d

# `triton.language`, imported on first use by `_kernels` (the kernels resolve `tl` as a module
# global when Triton compiles them). Importing late keeps `import structift` light and lets
# TRITON_INTERPRET be set before Triton reads it: Triton fixes the mode of its own standard
# library at import, so compiled and interpreted kernels cannot be mixed in one process.
tl: Any = None

# Largest state count run fused: a [128, 128] float32 tile is 64 registers a thread at 8 warps.
MAX_Z = 128


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` is installed (looked up once: the dispatcher asks on every call)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return config.triton_interpret()


def supports(unary: Tensor) -> bool:
    """Whether the fused kernels can run on these potentials (device, size, Triton present)."""
    on_device = unary.is_cuda or (unary.device.type == "cpu" and interpreting())
    return on_device and unary.shape[1] > 1 and unary.shape[2] <= MAX_Z and triton_available()


@functools.cache
def works_on(device: torch.device) -> bool:
    """Whether the fused forward-backward compiles and gives the right answer on ``device``.

    Run once per device on a tiny chain (checked against the log-space path) before ``auto``
    dispatch first picks the fused kernel: if this Triton build cannot compile or miscompiles
    the kernels, warn once and let the scaled kernel serve instead of failing every call.
    """
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(2, 3, 3, generator=g).to(device)
    binary = torch.randn(2, 2, 3, 3, generator=g).to(device)
    lengths = torch.tensor([3, 2], device=device)
    try:
        log_z, state = forward(unary, binary, lengths)
        mu_u, mu_b = backward(state, unary, binary, lengths, torch.ones_like(log_z), binary.shape)
        assert mu_b is not None
        ref = _log.forward_backward(unary, binary, lengths)
        ok = all(
            bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
            for a, b in zip((log_z, mu_u, mu_b), ref)
        )
        problem = "" if ok else "its results differ from the log-space path"
    except Exception as err:  # any failure to build or run means: do not use it
        ok, problem = False, f"{type(err).__name__}: {err}"
    if not ok:
        warnings.warn(
            f"structift: the fused Triton chain kernel does not work on {device} ({problem}); "
            "using the scaled kernel instead. Pick backend='scaled' to silence this, or "
            "backend='fused' to see the error.",
            RuntimeWarning,
            stacklevel=3,
        )
    return ok


# --------------------------------------------------------------------------------------------
# Kernels. Written as plain functions and compiled lazily by `_kernels`: `triton.jit` decides
# at decoration time between the compiler and the interpreter, and the import stays optional.


def _forward_kernel(
    U, W, LEN, ALPHA, LOGZ,
    su_b, su_t, su_z, sw_b, sw_t, sw_i, sw_j,
    T, Z,
    BZ: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + b)
    r = tl.arange(0, BZ)
    ok = r < Z
    ok2 = ok[:, None] & ok[None, :]
    u_row = U + b * su_b
    w_row = W + b * sw_b
    a_row = ALPHA + b * T * Z
    tile = r[:, None] * sw_i + r[None, :] * sw_j
    a = tl.load(u_row + r * su_z, mask=ok, other=float("-inf"))
    c = tl.max(a, 0)
    c = tl.where(c == float("-inf"), 0.0, c)
    a = a - c  # centred: entries stay O(one step's span), so float32 rounding does not grow with T
    tl.store(a_row + r, a, mask=ok)
    # Step t's tile and unary row, loaded one step ahead (PREFETCH) so that the load latency
    # overlaps the previous step's arithmetic instead of stalling the dependent chain.
    more = ok & (r * 0 + 1 < n)  # a block, not a scalar: the interpreter masks with blocks only
    w_nx = tl.load(w_row + tile, mask=more[:, None] & more[None, :], other=float("-inf"))
    u_nx = tl.load(u_row + su_t + r * su_z, mask=more, other=float("-inf"))
    for t in range(1, n):
        if PREFETCH:
            w_t, u_t = w_nx, u_nx
            more = ok & (r * 0 + t + 1 < n)
            more2 = more[:, None] & more[None, :]
            w_nx = tl.load(w_row + t * sw_t + tile, mask=more2, other=float("-inf"))
            u_nx = tl.load(u_row + (t + 1) * su_t + r * su_z, mask=more, other=float("-inf"))
        else:
            w_t = tl.load(w_row + (t - 1) * sw_t + tile, mask=ok2, other=float("-inf"))
            u_t = tl.load(u_row + t * su_t + r * su_z, mask=ok, other=float("-inf"))
        x = a[:, None] + w_t
        m = tl.max(x, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(tl.exp(x - m[None, :]), 0)
        a = m + tl.log(s) + u_t
        m = tl.max(a, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        a = a - m
        c += m
        tl.store(a_row + t * Z + r, a, mask=ok)
    tl.store(LOGZ + b, c + tl.log(tl.sum(tl.exp(a), 0)))


def _backward_kernel(
    U, W, LEN, ALPHA, LOGZ, GRAD, GU, GW,
    su_b, su_t, su_z, sw_b, sw_t, sw_i, sw_j,
    T, Z,
    BZ: tl.constexpr,
    SUM_T: tl.constexpr,
    WANT_B: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    # Both messages are centred, and each position's marginals are normalised locally (they sum
    # to 1): mu_b[t] = softmax(y) with y = alpha_t[i] + binary_t[i, j] + unary_{t+1}[j]
    # + beta_{t+1}[j], so no O(T)-sized number (log Z, unnormalised messages) is ever subtracted.
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(LEN + b)
    live = tl.load(LOGZ + b) > float("-inf")
    g = tl.where(live, tl.load(GRAD + b), 0.0)  # rows without a finite path: zero gradient
    r = tl.arange(0, BZ)
    ok = r < Z
    ok2 = ok[:, None] & ok[None, :]
    u_row = U + b * su_b
    w_row = W + b * sw_b
    a_row = ALPHA + b * T * Z
    gu_row = GU + b * T * Z
    tile = r[:, None] * sw_i + r[None, :] * sw_j
    out_tile = r[:, None] * Z + r[None, :]
    zero = tl.zeros([BZ], dtype=GU.dtype.element_ty)
    zero2 = tl.zeros([BZ, BZ], dtype=GW.dtype.element_ty)

    a = tl.load(a_row + (n - 1) * Z + r, mask=ok, other=float("-inf"))
    e = tl.exp(a)  # alpha is centred: its max is 0 on live rows, so one term is exactly 1
    total = tl.sum(e, 0)
    w = tl.where(total > 0, g / tl.where(total > 0, total, 1.0), 0.0)  # never 0 / 0
    tl.store(gu_row + (n - 1) * Z + r, e * w, mask=ok)
    beta = tl.zeros([BZ], dtype=GU.dtype.element_ty)
    acc = zero2
    # Step n-2's inputs, then each step loads the next one's (see the forward).
    more = ok & (r * 0 + 1 < n)
    more2 = more[:, None] & more[None, :]
    u_nx = tl.load(u_row + (n - 1) * su_t + r * su_z, mask=more, other=float("-inf"))
    w_nx = tl.load(w_row + (n - 2) * sw_t + tile, mask=more2, other=float("-inf"))
    a_nx = tl.load(a_row + (n - 2) * Z + r, mask=more, other=float("-inf"))
    for s in range(0, n - 1):
        t = n - 2 - s
        if PREFETCH:
            u_t, w_t, a = u_nx, w_nx, a_nx
            more = ok & (r * 0 + t > 0)
            more2 = more[:, None] & more[None, :]
            u_nx = tl.load(u_row + t * su_t + r * su_z, mask=more, other=float("-inf"))
            w_nx = tl.load(w_row + (t - 1) * sw_t + tile, mask=more2, other=float("-inf"))
            a_nx = tl.load(a_row + (t - 1) * Z + r, mask=more, other=float("-inf"))
        else:
            u_t = tl.load(u_row + (t + 1) * su_t + r * su_z, mask=ok, other=float("-inf"))
            w_t = tl.load(w_row + t * sw_t + tile, mask=ok2, other=float("-inf"))
            a = tl.load(a_row + t * Z + r, mask=ok, other=float("-inf"))
        x = w_t + (u_t + beta)[None, :]
        m = tl.max(x, 1)
        m = tl.where(m == float("-inf"), 0.0, m)
        beta = m + tl.log(tl.sum(tl.exp(x - m[:, None]), 1))  # shape: (BZ,) indexed by from-state
        y = a + beta
        m = tl.max(y, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        # Normalise by the step's own total as a ratio (its largest term is exactly 1): never
        # `exp(y - logsumexp(y))`, whose m + log(total) can round to m (ties of 1e20 in float64).
        e = tl.exp(y - m)
        total = tl.sum(e, 0)
        w = tl.where(total > 0, g / tl.where(total > 0, total, 1.0), 0.0)
        if WANT_B:  # the binary gradient: one more exp per tile entry, skipped when unwanted
            mu_b = tl.exp(a[:, None] + x - m) * w  # a_i + x_ij <= y_i <= m: at most 1 before w
            if SUM_T:
                acc += mu_b
            else:
                tl.store(GW + (b * (T - 1) + t) * Z * Z + out_tile, mu_b, mask=ok2)
        tl.store(gu_row + t * Z + r, e * w, mask=ok)
        mb = tl.max(beta, 0)
        beta = beta - tl.where(mb == float("-inf"), 0.0, mb)
    # Padding: zero gradient, written here so the outputs need no zero-filling pass.
    for t in range(n, T):
        tl.store(gu_row + t * Z + r, zero, mask=ok)
    if WANT_B:
        if SUM_T:
            tl.store(GW + b * Z * Z + out_tile, acc, mask=ok2)
        else:
            for t in range(n - 1, T - 1):
                tl.store(GW + (b * (T - 1) + t) * Z * Z + out_tile, zero2, mask=ok2)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, ...]:
    """The forward and backward kernels, compiled or interpreted (cached per mode: the key)."""
    return jit(globals(), _forward_kernel, _backward_kernel)


def jit(module_globals: dict[str, Any], *kernels: Any) -> tuple[Any, ...]:
    """Import Triton, bind ``tl`` in the kernels' module and return the kernels ``triton.jit``-ed.

    Each module of fused kernels calls this from its own cached ``_kernels(interpreting())``.
    """
    import triton
    import triton.language

    module_globals["tl"] = triton.language
    return tuple(triton.jit(k) for k in kernels)


# Launch settings are fields of the `Fused` backend (`backends.py`). The defaults are reasoned,
# not measured on a GPU yet: `benchmarks/tune_fused.py` times the alternatives.


def _launch_args(
    unary: Tensor, binary: Tensor, warps: int | None = None
) -> tuple[Tensor, tuple[int, ...], int, int]:
    """The ``[B, T-1, Z, Z]`` view of ``binary`` (stride 0 where broadcast), strides, tile, warps.

    ``warps`` ``None``: one warp per 512 tile entries (1..8).
    """
    B, T, Z = unary.shape
    w = as_4d(binary).expand(B, T - 1, Z, Z)
    strides = (*unary.stride(), *w.stride())
    bz = max(16, 1 << (Z - 1).bit_length())
    warps = warps if warps is not None else max(1, min(8, bz * bz // 512))
    return w, strides, bz, warps


# Prefetching holds two [BZ, BZ] tiles in registers: up to BZ = 64 (32 registers a thread each
# at the default warp counts); at BZ = 128 it would spill.
def _prefetch(bz: int, prefetch: bool | None = None) -> bool:
    return prefetch if prefetch is not None else bz <= 64


@dataclass
class State:
    """What the backward needs from the forward: the centred forward messages and ``log Z``."""

    alpha: Tensor  # centred log-space messages (maximum 0 per position), shape: (B, T, Z)
    log_z: Tensor  # shape: (B,)


def forward(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    warps: int | None = None,
    prefetch: bool | None = None,
) -> tuple[Tensor, State]:
    """Compute ``log Z`` ``[B]`` and the forward messages in one launch.

    ``unary`` and ``binary`` are float32 or float64 on the same device; no autograd graph.
    ``warps`` and ``prefetch``: launch settings (``None``: the defaults of ``_launch_args``).
    """
    B, T, Z = unary.shape
    u = unary.detach()
    w, strides, bz, warps = _launch_args(u, binary.detach(), warps)
    lengths = lengths.to(device=u.device, dtype=torch.int64).contiguous()
    alpha = u.new_empty(B, T, Z)
    log_z = u.new_empty(B)
    if B:
        fwd = _kernels(interpreting())[0]
        fwd[(B,)](
            u, w, lengths, alpha, log_z, *strides, T, Z,
            BZ=bz, PREFETCH=_prefetch(bz, prefetch), num_warps=warps,
        )  # fmt: skip
    return log_z, State(alpha, log_z)


def backward(
    state: State,
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    grad: Tensor,
    binary_shape: tuple[int, ...] | None,
    warps: int | None = None,
    prefetch: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Return ``(grad * mu_unary, sum-to-shape(grad * mu_binary))`` in one launch.

    ``binary_shape`` is the shape of the wanted binary gradient (``None``: not needed, and not
    computed); it must broadcast to ``[B, T-1, Z, Z]``. ``warps``, ``prefetch``: as in
    ``forward``.
    """
    B, T, Z = unary.shape
    u = unary.detach()
    w, strides, bz, warps = _launch_args(u, binary.detach(), warps)
    want_b = binary_shape is not None
    shape4 = (1,) * (4 - len(binary_shape)) + tuple(binary_shape) if binary_shape else (B, 1, Z, Z)
    sum_t = shape4[1] == 1  # (only read when the binary gradient is wanted)
    lengths = lengths.to(device=u.device, dtype=torch.int64).contiguous()
    grad = grad.detach().to(u.dtype).contiguous()
    gu = u.new_empty(B, T, Z)
    gw = u.new_empty(B, 1 if sum_t else T - 1, Z, Z) if want_b else u.new_empty(1)  # 1: a dummy
    if B:
        bwd = _kernels(interpreting())[1]
        bwd[(B,)](
            u, w, lengths, state.alpha, state.log_z, grad, gu, gw,
            *strides, T, Z, BZ=bz, SUM_T=sum_t, WANT_B=want_b, PREFETCH=_prefetch(bz, prefetch),
            num_warps=warps,
        )  # fmt: skip
    if binary_shape is None:
        return gu, None
    if shape4[0] == 1:
        gw = gw.sum(0, keepdim=True)
    return gu, gw.reshape(binary_shape)
