"""Probability-space forward-backward with per-step rescaling: the fast path.

The potentials are exponentiated once, each ``[Z, Z]`` block shifted by its own maximum:
``E_t = exp(binary_t - m_t)`` (stored at the smallest broadcast shape of ``binary``: a shared
transition matrix is exponentiated once) and ``e_t = exp(unary_t - n_t)`` (recomputed per step,
``O(B Z)``). The messages are kept max-normalised, with their scales on the side::

    alpha_t = (alpha_{t-1} E_{t-1}) * e_t / S_t          S_t = max(alpha_{t-1} E_{t-1} * e_t)
    beta_t  = E_t (e_{t+1} * beta_{t+1}) / R_t           R_t = max(...)

so ``log Z = sum_t (log S_t + n_t + m_{t-1}) + log sum(alpha_{L-1})`` and, with
``D_t = <alpha_t, beta_t>``::

    mu_unary[t]      = alpha_t * beta_t / D_t
    mu_binary[t, i, j] = alpha_t[i] E_t[i, j] e_{t+1}[j] beta_{t+1}[j] / (S_{t+1} D_{t+1})

Each step is a vector-matrix product (a GEMM for shared transitions) instead of a
logsumexp over ``[B, Z, Z]``. When ``binary`` has one block per (b, t), the ``E`` buffer is
turned into the binary marginals in place, so it is the only potentials-sized allocation.

Certification. Entries of ``E``, ``e``, ``alpha`` and ``beta`` that underflow lose at most
``tiny`` (the smallest normal number) each, in units where every vector has maximum 1. Such a
loss changes the total mass, relative to ``Z``, by at most ``Z * tiny / min(D_t, S_{t+1} D_{t+1})``
(perturbing ``alpha_t[i]`` by ``d`` moves ``Z`` by ``d beta_t[i] / D_t`` in relative terms). So a
row is certified when every ``D_t`` and every ``S_{t+1} D_{t+1}`` is at least
``exp(-certified_nats(dtype))`` (50 nats in float32, 671 in float64), which bounds the relative
error from underflow by ``T Z exp(-37)``. Rows that fail (extreme dynamic range combined with
``-inf`` masks, a sequence without finite path, NaN) are recomputed in log space. Without ``-inf``
masks a row is certified whenever no step's potentials span more than about 45 nats (float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.chain import _log


def certified_nats(dtype: torch.dtype) -> float:
    """Smallest certified normaliser, ``-log`` of it: ``-log(tiny) - 37`` nats."""
    return -math.log(torch.finfo(dtype).tiny) - 37.0


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def as_4d(binary: Tensor) -> Tensor:
    """View broadcastable ``binary`` as ``[Bb, Tb, Z, Z]`` (leading singleton dims added)."""
    while binary.dim() < 4:
        binary = binary.unsqueeze(0)
    return binary


class Transitions:
    """``E = exp(binary - m)`` at the smallest broadcast shape ``[Bb, Tb, Z, Z]`` of ``binary``.

    ``Bb`` is 1 or B and ``Tb`` is 1 or T-1; dimensions that are broadcast (size 1, or expanded
    with stride 0) are stored once. ``m`` ``[Bb, Tb]`` is each block's finite maximum (0 if none).
    """

    def __init__(self, binary: Tensor, B: int, T: int) -> None:
        base = as_4d(binary).detach()
        if base.shape[0] > 1 and base.stride(0) == 0:
            base = base[:1]
        if base.shape[1] > 1 and base.stride(1) == 0:
            base = base[:, :1]
        self.Bb, self.Tb = int(base.shape[0]), int(base.shape[1])
        self.full = self.Bb == B and self.Tb == T - 1
        self.shift = _finite_or_zero(base.amax(dim=(-2, -1)))  # shape: (Bb, Tb)
        self.E = torch.sub(base, self.shift[..., None, None]).exp_()  # shape: (Bb, Tb, Z, Z)

    def block(self, t: int) -> Tensor:
        """``E_t`` ``[Bb, Z, Z]``."""
        return self.E[:, t if self.Tb > 1 else 0]

    def vecmat(self, alpha: Tensor, t: int) -> Tensor:
        """``alpha @ E_t``: ``[B, Z] -> [B, Z]``."""
        Et = self.block(t)
        if self.Bb == 1:
            return alpha @ Et[0]
        return torch.bmm(alpha.unsqueeze(1), Et).squeeze(1)

    def matvec(self, r: Tensor, t: int) -> Tensor:
        """``E_t @ r``: ``[B, Z] -> [B, Z]``."""
        Et = self.block(t)
        if self.Bb == 1:
            return r @ Et[0].T
        # (r^T E_t^T) is several times faster than E_t r for batched small blocks on CPU.
        return torch.bmm(r.unsqueeze(1), Et.transpose(1, 2)).squeeze(1)


@dataclass
class State:
    """What the backward pass needs from the forward pass (all ``alpha`` max-normalised)."""

    alpha: Tensor  # shape: (B, T, Z)
    scale: Tensor  # S, shape: (B, T)
    norm: Tensor  # D = <alpha_t, beta_t>, shape: (B, T)
    u_shift: Tensor  # n, shape: (B, T)
    ok: Tensor  # certified rows, shape: (B,)
    mask: Tensor  # shape: (B, T)
    min_len: int
    trans: Transitions


def _unary_factor(unary: Tensor, u_shift: Tensor, t: int) -> Tensor:
    return torch.exp(unary[:, t] - u_shift[:, t, None])


def forward(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, State]:
    """Compute ``log Z`` ``[B]`` (certified, uncertified rows redone in log space) and the state.

    Runs without autograd. ``unary`` must be float32 or float64 here.
    """
    B, T, Z = unary.shape
    u = unary.detach()
    lengths = lengths.to(u.device)
    mask = lengths_to_mask(lengths, T)
    min_len = int(lengths.min()) if B > 0 else T  # one host sync: steps below need no `where`
    tiny = torch.finfo(u.dtype).tiny
    trans = Transitions(binary, B, T)
    u_shift = _finite_or_zero(u.amax(-1))  # shape: (B, T)

    alpha = u.new_empty(B, T, Z)
    scale = u.new_empty(B, T)
    a = u.new_zeros(B, Z)
    for t in range(T):
        raw = _unary_factor(u, u_shift, t)
        if t > 0:
            raw = trans.vecmat(a, t - 1) * raw
        s = raw.amax(-1, keepdim=True)
        new = raw / s.clamp_min(tiny)
        a = new if t < min_len else torch.where(mask[:, t, None], new, a)
        alpha[:, t] = a
        scale[:, t] = s.squeeze(-1)

    inc = torch.log(scale) + u_shift
    if T > 1:
        inc[:, 1:] += trans.shift.expand(B, T - 1)
    log_z = torch.where(mask, inc, torch.zeros_like(inc)).sum(-1) + torch.log(a.sum(-1))

    # Backward messages only to certify the row (their normalisers D_t).
    norm = u.new_empty(B, T)
    b = torch.ones_like(a)
    ones = b
    norm[:, T - 1] = alpha[:, T - 1].sum(-1)
    for t in range(T - 2, -1, -1):
        raw = trans.matvec(_unary_factor(u, u_shift, t + 1) * b, t)
        new = raw / raw.amax(-1, keepdim=True).clamp_min(tiny)
        b = new if t + 1 < min_len else torch.where(mask[:, t + 1, None], new, ones)
        norm[:, t] = (alpha[:, t] * b).sum(-1)

    thr = math.exp(-certified_nats(u.dtype))
    good = ((norm >= thr) | ~mask).all(-1)
    if T > 1:
        good &= ((scale[:, 1:] * norm[:, 1:] >= thr) | ~mask[:, 1:]).all(-1)
    ok = torch.isfinite(log_z) & good
    state = State(alpha, scale, norm, u_shift, ok, mask, min_len, trans)
    bad = (~ok).nonzero().squeeze(-1)  # one host sync
    if bad.numel():
        rows = as_4d(binary).expand(B, T - 1, Z, Z)[bad]
        log_z[bad] = _log.log_partition(u[bad], rows, lengths[bad]).to(log_z.dtype)
    return log_z, state


def backward(
    state: State,
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    grad: Tensor,
    binary_shape: tuple[int, ...] | None,
) -> tuple[Tensor, Tensor | None]:
    """Return ``(grad * mu_unary, sum-to-shape(grad * mu_binary))`` from a forward ``State``.

    ``binary_shape`` is the shape of the wanted binary gradient (``None``: not needed); it must
    broadcast to ``[B, T-1, Z, Z]``. Consumes the state: ``alpha`` becomes the unary gradient
    and, when ``binary`` has one block per (b, t), ``E`` becomes the binary gradient.
    """
    alpha, trans, mask, ok = state.alpha, state.trans, state.mask, state.ok
    B, T, Z = alpha.shape
    u = unary.detach()
    tiny = torch.finfo(alpha.dtype).tiny
    grad = grad.to(alpha.dtype)
    zero = alpha.new_zeros(())
    one = alpha.new_ones(())
    d = state.norm
    w_u = torch.where(ok[:, None] & mask, grad[:, None] / torch.where(d > 0, d, one), zero)
    sd = state.scale[:, 1:] * d[:, 1:]
    w_b = torch.where(ok[:, None] & mask[:, 1:], grad[:, None] / torch.where(sd > 0, sd, one), zero)

    G: Tensor | None = None
    shape4: tuple[int, ...] = ()
    in_place = False
    if binary_shape is not None:
        shape4 = (1,) * (4 - len(binary_shape)) + tuple(binary_shape)
        in_place = trans.full and shape4 == tuple(trans.E.shape)
        G = trans.E if in_place else alpha.new_zeros(shape4)

    b = torch.ones_like(alpha[:, 0])
    ones = b
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            r = _unary_factor(u, state.u_shift, t + 1) * b  # b is beta_{t+1}
            left = alpha[:, t] * w_b[:, t, None]
            if in_place:
                Et = trans.E[:, t]
                raw = Et.mul_(r[:, None, :]).sum(-1)  # E_t r, and half of the marginal
                Et.mul_(left[:, :, None])
                if t + 1 >= state.min_len:  # padding may hold inf/NaN: zero it explicitly
                    Et.masked_fill_(~mask[:, t + 1, None, None], 0.0)
            else:
                raw = trans.matvec(r, t)
                if G is not None:
                    _accumulate(G, left, r, t)
            new = raw / raw.amax(-1, keepdim=True).clamp_min(tiny)
            b = new if t + 1 < state.min_len else torch.where(mask[:, t + 1, None], new, ones)
        alpha[:, t].mul_(b * w_u[:, t, None])  # alpha_t beta_t grad / D_t
    if G is not None and not in_place:
        G.mul_(trans.E)

    bad = (~ok).nonzero().squeeze(-1)  # one host sync
    if bad.numel():
        rows = as_4d(binary).detach().expand(B, T - 1, Z, Z)[bad]
        _, mu_u, mu_b = _log.forward_backward(u[bad], rows, lengths.to(u.device)[bad])
        g = grad[bad]
        alpha[bad] = mu_u * g[:, None, None]
        if G is not None:
            mb = mu_b * g[:, None, None, None]
            if shape4[1] == 1:
                mb = mb.sum(1, keepdim=True)
            if shape4[0] == 1:
                G += mb.sum(0, keepdim=True)
            else:
                G[bad] = mb
    gb = None if G is None or binary_shape is None else G.reshape(binary_shape)
    return alpha, gb


def _accumulate(G: Tensor, left: Tensor, r: Tensor, t: int) -> None:
    """Add ``sum over broadcast dims of left[b, i] r[b, j]`` into ``G[:, t]`` (before ``* E``)."""
    Gt = G[:, t if G.shape[1] > 1 else 0]
    if G.shape[0] == 1:
        Gt[0].addmm_(left.T, r)
    else:
        Gt.baddbmm_(left.unsqueeze(-1), r.unsqueeze(1))
