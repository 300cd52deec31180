"""Probability-space forward-backward with per-step rescaling: the fast path.

The potentials are exponentiated once, each ``[Z, Z]`` block shifted by its own maximum:
``E_t = exp(binary_t - m_t)`` (stored at the smallest broadcast shape of ``binary``: a shared
transition matrix is exponentiated once) and ``e_t = exp(unary_t - n_t)`` (``O(B T Z)``). The
messages are kept max-normalised, with their scales on the side::

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
entries ``beta_t >= exp(-span(E_t))`` entrywise and ``max alpha_t = 1``, so
``D_t >= exp(-span(E_t))``, ``S_{t+1} >= exp(-span(E_t))`` and
``S_{t+1} D_{t+1} >= exp(-span(E_t) - span(E_{t+1}))``: a row is guaranteed certified when
every transition block spans at most 25 nats (float32; the unary spans do not enter). In
practice random potentials spanning 60 nats per block pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.structures.chain import _log

# E is exponentiated in chunks of time steps of about this many bytes, and each chunk is used
# by the forward recursion while it is still in cache: one pass over memory instead of four.
CHUNK_BYTES = 1 << 19


def certified_nats(dtype: torch.dtype) -> float:
    """Smallest certified normaliser, ``-log`` of it: ``-log(tiny) - 37`` nats."""
    return -math.log(torch.finfo(dtype).tiny) - 37.0


def eager_on(device: torch.device) -> bool:
    """Whether per-(b, t) binary marginals are formed inside the backward recursion.

    On CPU that keeps each block in cache (one memory pass instead of three). On an
    accelerator memory passes are cheap and kernel launches are not, so the marginals are two
    whole-tensor multiplies in ``backward`` instead (with the output weights folded in).
    """
    return device.type == "cpu"


def certified_threshold(dtype: torch.dtype) -> float:
    """Smallest certified normaliser ``exp(-certified_nats(dtype))``."""
    return math.exp(-certified_nats(dtype))


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
    with stride 0) are stored once. ``m`` ``[Bb, Tb]`` is each block's finite maximum (0 if
    none). With one block per (b, t) (``full``) ``E`` is filled chunk by chunk (``ensure``).
    """

    def __init__(self, binary: Tensor, B: int, T: int) -> None:
        base = as_4d(binary).detach()
        if base.shape[0] > 1 and base.stride(0) == 0:
            base = base[:1]
        if base.shape[1] > 1 and base.stride(1) == 0:
            base = base[:, :1]
        self.base = base
        self.Bb, self.Tb = int(base.shape[0]), int(base.shape[1])
        self.full = self.Bb == B and self.Tb == T - 1
        self.E = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        self.shift = base.new_empty(self.Bb, self.Tb)
        block_bytes = max(1, base[:, :1].numel() * base.element_size())
        # Chunking pays on CPU (cache reuse); on an accelerator one launch per op is better.
        on_cpu = base.device.type == "cpu"
        self.chunk = max(1, CHUNK_BYTES // block_bytes) if self.full and on_cpu else self.Tb
        self.ready = 0
        # A single shared block is read directly by the passes (no per-step ensure), so it must
        # be exponentiated now even when it is also "full" (B == 1 and T == 2).
        if not self.full or (self.Bb == 1 and self.Tb == 1):
            self.ensure(0)

    def ensure(self, t: int) -> None:
        """Exponentiate the chunk of blocks holding step ``t`` if not done yet."""
        if t < self.ready:
            return
        c0, c1 = self.ready, min(self.Tb, self.ready + self.chunk)
        blk = self.base[:, c0:c1]
        m = _finite_or_zero(blk.amax(dim=(-2, -1)))
        self.shift[:, c0:c1] = m
        Ec = self.E[:, c0:c1]
        torch.sub(blk, m[..., None, None], out=Ec)
        Ec.exp_()
        self.ready = c1

    def block(self, t: int) -> Tensor:
        """``E_t`` ``[Bb, Z, Z]``."""
        return self.E[:, t if self.Tb > 1 else 0]

    def vecmat(self, alpha: Tensor, t: int, out: Tensor) -> Tensor:
        """``out = alpha @ E_t``: ``[B, Z] -> [B, Z]`` (``out`` contiguous)."""
        Et = self.block(t)
        if self.Bb == 1:
            return torch.mm(alpha, Et[0], out=out)
        torch.bmm(alpha.unsqueeze(1), Et, out=out.unsqueeze(1))
        return out

    def matvec(self, r: Tensor, t: int, out: Tensor) -> Tensor:
        """``out = E_t @ r``: ``[B, Z] -> [B, Z]`` (``out`` contiguous)."""
        Et = self.block(t)
        if self.Bb == 1:
            return torch.mm(r, Et[0].T, out=out)
        # r^T E_t^T is several times faster than E_t r for batched small blocks on CPU.
        torch.bmm(r.unsqueeze(1), Et.transpose(1, 2), out=out.unsqueeze(1))
        return out


@dataclass
class State:
    """What the marginals need from the forward pass (time-major, messages max-normalised).

    Lazy state (``mu_u is None``): messages and scales, marginals formed in ``backward``.
    Eager state: ``mu_u`` ``[B, T, Z]`` and ``trans.E`` already hold the marginals.
    """

    alpha: Tensor  # shape: (T, B, Z)
    beta: Tensor  # shape: (T, B, Z)
    expu: Tensor  # e_t = exp(unary_t - n_t), shape: (T, B, Z)
    scale: Tensor  # S, shape: (T, B)
    norm: Tensor  # D = <alpha_t, beta_t>, shape: (T, B)
    ok: Tensor  # certified rows, shape: (B,)
    mask: Tensor  # shape: (T, B)
    min_len: int
    trans: Transitions
    mu_u: Tensor | None = None


def forward(
    unary: Tensor, binary: Tensor, lengths: Tensor, eager: bool = False
) -> tuple[Tensor, State]:
    """Compute ``log Z`` ``[B]`` (certified; other rows redone in log space) and the state.

    With ``eager`` and one transition block per (b, t), the backward messages turn ``E`` into
    the binary marginals in place while each block is in cache (the state is then eager).
    Runs without autograd; float32 or float64. A row whose messages vanish (no finite path)
    turns NaN here (0/0); that only fails its own certificate.
    """
    B, T, Z = unary.shape
    u = unary.detach()
    lengths = lengths.to(u.device)
    mask = lengths_to_mask(lengths, T).T  # shape: (T, B)
    min_len = int(lengths.min()) if B > 0 else T  # one host sync: steps below need no `where`
    trans = Transitions(binary, B, T)
    u_shift = _finite_or_zero(u.amax(-1))  # shape: (B, T)
    expu = torch.exp((u - u_shift[..., None]).transpose(0, 1))  # shape: (T, B, Z)
    if not expu.is_contiguous():
        expu = expu.contiguous()

    eager = eager and trans.full and eager_on(u.device)
    if trans.Bb == 1 and trans.Tb == 1 and T > 1 and not eager:
        # One shared block: both recursions in one loop of stacked ops (half the op count).
        alpha, scale, beta, log_z = _paired_passes(trans, expu, mask, lengths, min_len, u_shift)
        norm = torch.linalg.vecdot(alpha, beta)  # shape: (T, B)
    else:
        alpha, scale = _alpha_pass(trans, expu, mask, min_len)
        inc = torch.log(scale) + u_shift.T
        if T > 1:
            inc[1:] += trans.shift.expand(B, T - 1).T
        log_z = torch.where(mask, inc, torch.zeros_like(inc)).sum(0)
        log_z = log_z + torch.log(alpha[-1].sum(-1))
        if eager:
            beta, norm = _beta_pass_eager(trans, expu, alpha, scale, mask, min_len)
        else:
            beta = _beta_pass(trans, expu, mask, min_len)
            norm = torch.linalg.vecdot(alpha, beta)  # shape: (T, B)

    # Certificate (module docstring); NaN compares False, so NaN rows fail it too.
    thr = certified_threshold(u.dtype)
    good = ((norm >= thr) | ~mask).all(0)
    if T > 1:
        good &= ((scale[1:] * norm[1:] >= thr) | ~mask[1:]).all(0)
    ok = torch.isfinite(log_z) & good
    state = State(alpha, beta, expu, scale, norm, ok, mask, min_len, trans)
    bad = (~ok).nonzero().squeeze(-1)  # one host sync
    if eager:
        live = ok[None, :] & mask
        w_u = torch.where(live, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
        state.mu_u = beta.mul_(alpha).mul_(w_u[..., None]).transpose(0, 1).contiguous()
        state.alpha = state.beta = state.expu = state.mu_u[:0]  # free the messages
    if bad.numel():
        rows = as_4d(binary).detach().expand(B, T - 1, Z, Z)[bad]
        if eager:
            assert state.mu_u is not None
            lz, mu_u, mu_b = _log.forward_backward(u[bad], rows, lengths[bad])
            state.mu_u[bad] = mu_u.to(state.mu_u.dtype)
            trans.E[bad] = mu_b.to(trans.E.dtype)
        else:
            lz = _log.log_partition(u[bad], rows, lengths[bad])
        log_z[bad] = lz.to(log_z.dtype)
    return log_z, state


# The loops below run one small kernel per op and step, so they use pre-made views (`unbind`)
# and `out=` arguments: per-step Python and allocation overhead is most of their cost on CPU.


def _alpha_pass(
    trans: Transitions, expu: Tensor, mask: Tensor, min_len: int
) -> tuple[Tensor, Tensor]:
    """Max-normalised forward messages ``alpha`` ``[T, B, Z]`` and their scales ``S`` ``[T, B]``."""
    T, B, _ = expu.shape
    alpha = torch.empty_like(expu)
    scale = expu.new_empty(T, B, 1)
    A, X, S, M = alpha.unbind(0), expu.unbind(0), scale.unbind(0), mask.unbind(0)
    A[0].copy_(X[0])
    torch.amax(A[0], -1, keepdim=True, out=S[0])
    A[0].div_(S[0])
    E0 = trans.E[0, 0] if trans.Bb == 1 and trans.Tb == 1 else None
    for t in range(1, T):
        at = A[t]
        if E0 is not None:
            torch.mm(A[t - 1], E0, out=at)
        else:
            trans.ensure(t - 1)
            trans.vecmat(A[t - 1], t - 1, out=at)
        at.mul_(X[t])
        torch.amax(at, -1, keepdim=True, out=S[t])
        at.div_(S[t])
        if t >= min_len:  # padding keeps the last valid message
            torch.where(M[t].unsqueeze(-1), at, A[t - 1], out=at)
    return alpha, scale.squeeze(-1)


def _paired_passes(
    trans: Transitions,
    expu: Tensor,
    mask: Tensor,
    lengths: Tensor,
    min_len: int,
    u_shift: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``alpha``, ``S`` and ``beta`` as ``_alpha_pass``/``_beta_pass``, and ``log Z``, in one loop.

    For one shared block ``E`` both recursions take the form ``v <- norm((e ⊙ v) E')`` if the
    forward one carries the pre-emission message ``a_t = norm(alpha_{t-1} E)`` (``a_0 = 1``)
    instead of ``alpha_t = norm(e_t ⊙ a_t)``, so step ``s`` computes ``a_s`` and a backward
    message as one ``[2, B, Z] @ [2, Z, Z]`` product, normalised together (every vector keeps
    maximum 1, as in the separate passes): four ops a step for both recursions.

    The backward half runs each row from its own end: step ``s`` of row ``b`` computes
    ``beta_{L_b - 1 - s}`` from the emissions reversed within the row, starting at
    ``beta_{L_b - 1} = 1``, so no step needs a padding ``where`` (steps past a row's end, in
    either half, compute values that are never read: rows do not mix). Afterwards, with
    ``s_t`` the maximum of ``a_t`` before normalisation and ``m_t = max(e_t ⊙ a_t)``:
    ``alpha_t = e_t ⊙ a_t / m_t``, ``S_0 = m_0``, ``S_t = s_t m_t / m_{t-1}`` and
    ``log Z = sum_{0<t<L} (log s_t + shift) + sum_{t<L} n_t + log sum(e_{L-1} ⊙ a_{L-1})``.
    Padding is then filled as the separate passes leave it: ``alpha`` copies the last valid
    message and ``beta`` is 1 from ``L - 1`` on.
    """
    T, B, Z = expu.shape
    E = trans.E[0, 0]
    mats = torch.stack([E, E.T]).contiguous()  # shape: (2, Z, Z)
    steps = torch.arange(T, device=expu.device)[:, None]  # shape: (T, 1)
    last = (lengths - 1).clamp_min(0)  # shape: (B,)
    # rev[s, b] = L_b - 1 - s: the position of row b that step s of the backward half is at.
    rev = (last[None, :] - steps).clamp_min(0)  # shape: (T, B)
    uniform = min_len == T  # every row has length T: reversing within rows is a flip
    # Reversal within rows: one index_select over the flattened [T * B, Z] rows (a gather
    # along dim 0 with an expanded index is about 5x slower on CPU).
    flat = (rev * B + torch.arange(B, device=expu.device)).reshape(-1)  # shape: (T * B,)
    back = expu.flip(0) if uniform else _select_rows(expu, flat)
    emit = torch.stack([expu, back], 1)  # step s multiplies its inputs by emit[s - 1]
    msg = expu.new_empty(T, 2, B, Z)  # msg[s] = (a_s, beta_{L-1-s})
    top = expu.new_empty(T, 2, B, 1)
    msg[0].fill_(1.0)
    top[0].fill_(1.0)
    V = expu.new_empty(2, B, Z)
    Ms, Xs, Ts = msg.unbind(0), emit.unbind(0), top.unbind(0)
    for s in range(1, T):
        cur = Ms[s]
        torch.mul(Ms[s - 1], Xs[s - 1], out=V)
        torch.bmm(V, mats, out=cur)
        torch.amax(cur, -1, keepdim=True, out=Ts[s])
        cur.div_(Ts[s])
    rows = torch.arange(B, device=expu.device)
    alpha_raw = expu * msg[:, 0]  # e_t ⊙ a_t, shape: (T, B, Z)
    log_z = torch.log(alpha_raw[last, rows].sum(-1))
    inc = u_shift.T.clone()  # shape: (T, B)
    inc[1:] += torch.log(top[1:, 0, :, 0]) + trans.shift.reshape(())
    log_z = log_z + torch.where(mask, inc, torch.zeros_like(inc)).sum(0)
    m = alpha_raw.amax(-1)  # shape: (T, B)
    alpha = alpha_raw.div_(m[..., None])
    if not uniform:  # positions past some row's end copy that row's last message
        tail = alpha[min_len:]
        torch.where(mask[min_len:, :, None], tail, alpha[last, rows][None], out=tail)
    scale = torch.empty_like(m)
    scale[0] = m[0]
    scale[1:] = top[1:, 0, :, 0] * m[1:] / m[:-1]
    # beta[t] = msg[L-1-t, 1]; from t = L-1 on, rev is 0 and msg[0] = 1, as wanted.
    if uniform:
        beta = msg[:, 1].flip(0)
    else:  # rows (s, 1, b) of msg viewed as [T * 2 * B, Z]: index s * 2B + B + b
        beta = _select_rows(msg, flat + (rev.reshape(-1) + 1) * B)
    return alpha, scale, beta, log_z


def _select_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of contiguous ``x`` viewed as ``[-1, Z]``, shaped ``[T, B, Z]``."""
    Z = x.shape[-1]
    return x.reshape(-1, Z).index_select(0, index).reshape(-1, x.shape[-2], Z)


def _beta_pass(trans: Transitions, expu: Tensor, mask: Tensor, min_len: int) -> Tensor:
    """Max-normalised backward messages ``beta`` ``[T, B, Z]`` (ones from ``L-1`` on)."""
    T, B, Z = expu.shape
    beta = torch.empty_like(expu)
    R, X, pad = beta.unbind(0), expu.unbind(0), (~mask).unsqueeze(-1).unbind(0)
    R[-1].fill_(1.0)
    tmp = expu.new_empty(B, Z)
    E0T = trans.E[0, 0].T if trans.Bb == 1 and trans.Tb == 1 else None
    for t in range(T - 2, -1, -1):
        bt = R[t]
        torch.mul(X[t + 1], R[t + 1], out=tmp)
        if E0T is not None:
            torch.mm(tmp, E0T, out=bt)
        else:
            trans.matvec(tmp, t, out=bt)
        bt.div_(bt.amax(-1, keepdim=True))
        if t + 1 >= min_len:
            bt.masked_fill_(pad[t + 1], 1.0)
    return beta


def _beta_pass_eager(
    trans: Transitions, expu: Tensor, alpha: Tensor, scale: Tensor, mask: Tensor, min_len: int
) -> tuple[Tensor, Tensor]:
    """``beta`` and ``D`` as ``_beta_pass``, turning each block ``E_t`` into the marginals.

    ``E_t <- alpha_t[i] E_t[i, j] e_{t+1}[j] beta_{t+1}[j] / (S_{t+1} D_{t+1})`` while the block
    is in cache; ``E_t @ (e_{t+1} beta_{t+1})`` is its row sum half-way. A row with no finite
    path gets inf/NaN: it is uncertified and overwritten afterwards.
    """
    T, B, Z = expu.shape
    beta = torch.empty_like(expu)
    norm = scale.new_empty(T, B)
    R, X, A, N, S = beta.unbind(0), expu.unbind(0), alpha.unbind(0), norm.unbind(0), scale.unbind(0)
    pad = (~mask).unbind(0)
    blocks = trans.E.unbind(1)
    R[-1].fill_(1.0)
    torch.sum(A[-1], -1, out=N[-1])
    r = expu.new_empty(B, Z)
    left = expu.new_empty(B, Z)
    sd = scale.new_empty(B)
    for t in range(T - 2, -1, -1):
        Et, bt = blocks[t], R[t]
        torch.mul(X[t + 1], R[t + 1], out=r)
        Et.mul_(r.unsqueeze(1))
        torch.sum(Et, -1, out=bt)
        torch.mul(S[t + 1], N[t + 1], out=sd)
        torch.div(A[t], sd.unsqueeze(-1), out=left)
        Et.mul_(left.unsqueeze(-1))
        bt.div_(bt.amax(-1, keepdim=True))
        if t + 1 >= min_len:  # padding may hold inf/NaN: zero it explicitly
            Et.masked_fill_(pad[t + 1][:, None, None], 0.0)
            bt.masked_fill_(pad[t + 1].unsqueeze(-1), 1.0)
        torch.linalg.vecdot(A[t], bt, out=N[t])
    return beta, norm


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
    broadcast to ``[B, T-1, Z, Z]``. Consumes the state (its buffers are reused in place; when
    ``binary`` has one block per (b, t), ``E`` becomes the binary gradient).
    """
    if state.mu_u is not None:
        return _backward_eager(state, grad, binary_shape)
    alpha, beta, expu, trans, mask, ok = (
        state.alpha,
        state.beta,
        state.expu,
        state.trans,
        state.mask,
        state.ok,
    )
    T, B, Z = alpha.shape
    grad = grad.to(alpha.dtype)
    zero = alpha.new_zeros(())
    one = alpha.new_ones(())
    d = state.norm
    live = ok[None, :] & mask  # shape: (T, B)
    w_u = torch.where(live, grad / torch.where(d > 0, d, one), zero)
    sd = state.scale[1:] * d[1:]
    w_b = torch.where(live[1:], grad / torch.where(sd > 0, sd, one), zero)  # shape: (T-1, B)

    G: Tensor | None = None
    shape4: tuple[int, ...] = ()
    if binary_shape is not None:
        shape4 = (1,) * (4 - len(binary_shape)) + tuple(binary_shape)
        # Rows that are padding or uncertified may hold NaN: select, never multiply by 0.
        keep = live[1:, :, None]
        left = torch.where(keep, alpha[:-1] * w_b[..., None], zero)  # shape: (T-1, B, Z)
        right = torch.where(keep, expu[1:] * beta[1:], zero)  # shape: (T-1, B, Z)
        G = _binary_marginals(trans, left, right, shape4, state.min_len, mask)
    mu_u = beta.mul_(alpha).mul_(w_u[..., None])  # alpha_t beta_t grad / D_t
    mu_u = mu_u.transpose(0, 1).contiguous()  # shape: (B, T, Z)

    bad = (~ok).nonzero().squeeze(-1)  # one host sync
    if bad.numel():
        u = unary.detach()
        rows = as_4d(binary).detach().expand(B, T - 1, Z, Z)[bad]
        _, mu_u_bad, mu_b = _log.forward_backward(u[bad], rows, lengths.to(u.device)[bad])
        g = grad[bad]
        mu_u[bad] = mu_u_bad.to(mu_u.dtype) * g[:, None, None]
        if G is not None:
            mb = mu_b.to(G.dtype) * g[:, None, None, None]
            if shape4[1] == 1:
                mb = mb.sum(1, keepdim=True)
            if shape4[0] == 1:
                G += mb.sum(0, keepdim=True)
            else:
                G[bad] = mb
    gb = None if G is None or binary_shape is None else G.reshape(binary_shape)
    return mu_u, gb


def _backward_eager(
    state: State, grad: Tensor, binary_shape: tuple[int, ...] | None
) -> tuple[Tensor, Tensor | None]:
    """Scale the eagerly computed marginals by ``grad`` (in place; skipped when all ones)."""
    assert state.mu_u is not None
    mu_u, E = state.mu_u, state.trans.E
    grad = grad.to(mu_u.dtype)
    # A host check is free on CPU; on an accelerator one fused multiply costs less than a sync.
    if grad.device.type != "cpu" or not bool((grad == 1).all()):
        mu_u.mul_(grad[:, None, None])
        if binary_shape is not None:
            E.mul_(grad[:, None, None, None])
    gb = None if binary_shape is None else E.reshape(binary_shape)
    return mu_u, gb


def _binary_marginals(
    trans: Transitions, left: Tensor, right: Tensor, shape4: tuple, min_len: int, mask: Tensor
) -> Tensor:
    """``sum over broadcast dims of left[t, b, i] E_t[i, j] right[t, b, j]``, shape ``shape4``.

    ``left``/``right`` ``[T-1, B, Z]`` are zero on padding and uncertified rows.
    """
    Bg, Tg, Z = shape4[0], shape4[1], shape4[-1]
    if left.shape[0] == 0:  # T == 1: no transitions, an all-zero gradient of the requested shape
        return left.new_zeros(shape4)
    E = trans.E
    if trans.full and tuple(E.shape) == shape4:
        # One block per (b, t): the exp buffer becomes the marginals, no other big allocation.
        E.mul_(left.permute(1, 0, 2).unsqueeze(-1)).mul_(right.permute(1, 0, 2).unsqueeze(-2))
        if min_len < left.shape[0] + 1:  # padding may hold inf/NaN: zero it explicitly
            pad = ~mask[min_len:].T  # shape: (B, T-min_len)
            E[:, min_len - 1 :].masked_fill_(pad[..., None, None], 0.0)
        return E
    if Bg == 1 and Tg == 1:
        out = (left.reshape(-1, Z).T @ right.reshape(-1, Z)).reshape(1, 1, Z, Z)
    elif Bg == 1:
        out = torch.bmm(left.transpose(1, 2), right).unsqueeze(0)  # shape: (1, T-1, Z, Z)
    elif Tg == 1:
        out = torch.bmm(left.permute(1, 2, 0), right.transpose(0, 1)).unsqueeze(1)
    else:
        out = left.permute(1, 0, 2)[..., :, None] * right.permute(1, 0, 2)[..., None, :]
    return out.mul_(E)
