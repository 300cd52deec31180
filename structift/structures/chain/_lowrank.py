"""Forward-backward for chains whose transition matrix has low non-negative rank.

The transition potentials are ``P = exp(log_a) @ exp(log_b)`` with ``log_a`` ``[Z, r]`` and
``log_b`` ``[r, Z]`` (Chiu, Deng & Rush, arXiv:2201.02715): the chain is the marginal of a
lifted chain ``z_0 -> k_0 -> z_1 -> k_1 -> ...`` whose transitions ``z -> k`` and ``k -> z'``
have potentials ``log_a`` and ``log_b``. Each step is two products through the rank-``r``
bottleneck, ``O(Z r)`` instead of ``O(Z^2)``, and ``Z x Z`` is never formed.

Scaled recursions (messages normalised to sum 1 at every step, so float32 accuracy does not
depend on ``T``; ``e_t = exp(unary_t - n_t)`` with ``n_t`` the step's maximum, and
``a = exp(log_a - m_a)``, ``b = exp(log_b - m_b)`` with global maxima ``m_a``, ``m_b``)::

    alpha_0 = e_0 / c_0,   alpha_t = ((alpha_{t-1} a) b) * e_t / c_t      (c_t: the sum)
    beta_{L-1} = 1,        beta_t ∝ a (b (e_{t+1} * beta_{t+1}))             (max 1)
    log Z = sum_{t<L} (log c_t + n_t) + (L - 1)(m_a + m_b)

``beta`` is normalised on its own (not by the forward ``c``, whose rounding errors would pile
up in its scale over ``T`` steps), and every marginal is normalised per position by
``N_t = <alpha_t, beta_t>``. With ``g_{t+1} = e_{t+1} * beta_{t+1} / (c_{t+1} N_{t+1})``,
``y_{t+1} = g_{t+1} b^T`` ``[r]`` and ``h_t = alpha_t a`` ``[r]``, the derivatives are the
posterior marginals of the lifted chain (``sum_{ij} alpha_t[i] P[i, j] g_{t+1}[j] = 1``)::

    d log Z / d unary[t, i] = alpha_t[i] beta_t[i] / N_t          p(z_t = i | x)
    d log Z / d log_a[i, k] = a[i, k] sum_t alpha_t[i] y_{t+1}[k]  E #(z_t = i, k_t = k)
    d log Z / d log_b[k, j] = b[k, j] sum_t h_t[k] g_{t+1}[j]      E #(k_t = k, z_{t+1} = j)

The two sums over ``t`` are single ``[Z, B T] @ [B T, r]`` products after the loop, so the
backward pass needs only the stored ``alpha`` (``O(B T Z)``), no per-step autograd graph.

Float32 limit: a step's normaliser ``c_t`` is the predicted probability of the observation
relative to its most likely state; it underflows (``log Z = -inf`` or NaN) only when that is
below ``~1e-38`` (87 nats) in one step, independent of ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from structift._ops import lengths_to_mask


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _normalized(x: Tensor, c: Tensor) -> Tensor:
    """``x / c``, and 0 where ``c == 0`` (no path: ``log Z = -inf``, not NaN).

    ``x >= 0`` sums to ``c``, so ``c == 0`` means ``x == 0``: dividing by 1 there gives 0.
    """
    return x / torch.where(c > 0, c, torch.ones_like(c))


def shifted_exp(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(exp(x - m), m)`` with ``m`` the finite global maximum of ``x`` (a 0-d tensor)."""
    m = _finite_or_zero(x.detach().amax())
    return torch.exp(x - m), m


@dataclass
class Messages:
    """Scaled forward messages, time-major (see the module docstring)."""

    alpha: Tensor  # shape: (T, B, Z), padding copies the last valid message
    log_c: Tensor  # shape: (T, B), 0 on padding
    expu: Tensor  # e_t, shape: (T, B, Z)
    mask: Tensor  # shape: (T, B)
    a: Tensor  # shape: (Z, r)
    b: Tensor  # shape: (r, Z)
    log_z: Tensor  # shape: (B,)


def forward(unary: Tensor, log_a: Tensor, log_b: Tensor, lengths: Tensor) -> Messages:
    """Run the scaled forward recursion; differentiable (plain ops) under grad mode.

    Args:
        unary: ``[B, T, Z]`` log-potentials (``-inf`` allowed).
        log_a: ``[Z, r]``; log_b: ``[r, Z]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths <= T``.
    """
    T = unary.shape[1]
    mask = lengths_to_mask(lengths.to(unary.device), T).T  # shape: (T, B)
    shift = _finite_or_zero(unary.detach().amax(-1)).T  # shape: (T, B)
    expu = torch.exp(unary.transpose(0, 1) - shift[..., None])  # shape: (T, B, Z)
    a, m_a = shifted_exp(log_a)
    b, m_b = shifted_exp(log_b)
    alphas, log_cs = [], []
    x = expu[0]
    c = x.sum(-1, keepdim=True)
    alphas.append(_normalized(x, c))
    log_cs.append(torch.log(c.squeeze(-1)))
    for t in range(1, T):
        x = (alphas[-1] @ a) @ b * expu[t]  # shape: (B, Z)
        c = x.sum(-1, keepdim=True)
        keep = mask[t]
        alphas.append(torch.where(keep[:, None], _normalized(x, c), alphas[-1]))
        log_cs.append(torch.where(keep, torch.log(c.squeeze(-1)), torch.zeros_like(c[:, 0])))
    alpha = torch.stack(alphas)
    log_c = torch.stack(log_cs)
    steps = (lengths.to(unary.device) - 1).to(unary.dtype)
    inc = torch.where(mask, shift, torch.zeros_like(shift))
    log_z = (log_c + inc).sum(0) + steps * (m_a + m_b)
    return Messages(alpha, log_c, expu, mask, a, b, log_z)


@dataclass
class Backward:
    """Backward messages, time-major (see the module docstring)."""

    beta: Tensor  # shape: (T, B, Z), max 1, 1 from L - 1 on
    y: Tensor  # y_{t+1} = g_{t+1} b^T, shape: (T-1, B, r), 0 where t + 1 is padding
    norm: Tensor  # N_t = <alpha_t, beta_t>, shape: (T, B)


def backward(msg: Messages) -> Backward:
    """Run the backward recursion; differentiable (plain ops) under grad mode."""
    T, B, _ = msg.alpha.shape
    r = msg.a.shape[1]
    beta = torch.ones_like(msg.alpha[0])
    betas, ys = [beta], []
    norms = [torch.linalg.vecdot(msg.alpha[T - 1], beta)]
    c = torch.exp(msg.log_c)  # shape: (T, B), 1 on padding
    for t in range(T - 2, -1, -1):
        keep = msg.mask[t + 1, :, None]
        weight = (c[t + 1] * norms[-1])[:, None]
        g = torch.where(keep, msg.expu[t + 1] * beta / weight, 0.0)
        y = g @ msg.b.T  # shape: (B, r)
        raw = y @ msg.a.T
        top = raw.amax(-1, keepdim=True)
        beta = torch.where(keep, raw / torch.where(top > 0, top, 1.0), torch.ones_like(beta))
        betas.append(beta)
        ys.append(y)
        norms.append(torch.linalg.vecdot(msg.alpha[t], beta))
    y_all = torch.stack(ys[::-1]) if ys else msg.alpha.new_zeros(0, B, r)
    return Backward(torch.stack(betas[::-1]), y_all, torch.stack(norms[::-1]))


def state_marginals(msg: Messages, back: Backward) -> Tensor:
    """``p(z_t = i | x)`` ``[B, T, Z]``, 0 on padding."""
    gamma = msg.alpha * back.beta / back.norm[..., None] * msg.mask[..., None]
    return gamma.transpose(0, 1)


def _next_weights(msg: Messages, back: Backward) -> Tensor:
    """``g_{t+1} = e_{t+1} beta_{t+1} / (c_{t+1} N_{t+1})`` ``[T-1, B, Z]``, 0 on padding."""
    weight = (torch.exp(msg.log_c[1:]) * back.norm[1:])[..., None]
    return msg.expu[1:] * back.beta[1:] / weight * msg.mask[1:, :, None]


def factored_counts(msg: Messages, back: Backward) -> tuple[Tensor, Tensor]:
    """Expected factored transition counts per sequence: ``[B, Z, r]`` and ``[B, r, Z]``.

    ``n[b, i, k] = E #(z_t = i, k_t = k)`` and ``m[b, k, j] = E #(k_t = k, z_{t+1} = j)``
    (the lifted chain's marginals summed over time).
    """
    if msg.alpha.shape[0] == 1:
        B, Z, r = msg.alpha.shape[1], msg.a.shape[0], msg.a.shape[1]
        zero = msg.alpha.new_zeros(B, Z, r)
        return zero, zero.transpose(1, 2)
    left = msg.alpha[:-1].permute(1, 2, 0)  # shape: (B, Z, T-1)
    n = torch.bmm(left, back.y.transpose(0, 1)) * msg.a
    h = (msg.alpha[:-1] @ msg.a).permute(1, 2, 0)  # shape: (B, r, T-1)
    m = torch.bmm(h, _next_weights(msg, back).transpose(0, 1)) * msg.b
    return n, m


def pair_counts(msg: Messages, back: Backward, rows: slice) -> Tensor:
    """Expected transition counts ``E #(z_t = i, z_{t+1} = j)`` for ``i`` in ``rows``.

    Shape ``[B, |rows|, Z]``: an ``O(B T Z |rows|)`` product (the entropy needs it, since
    ``log P`` does not factor through the rank).
    """
    g = _next_weights(msg, back).transpose(0, 1)  # shape: (B, T-1, Z)
    left = msg.alpha[:-1, :, rows].permute(1, 2, 0)  # shape: (B, |rows|, T-1)
    block = msg.a[rows] @ msg.b  # shape: (|rows|, Z)
    return torch.bmm(left, g) * block


class LogPartition(torch.autograd.Function):
    """``log Z`` ``[B]`` of the low-rank chain, with the hand-written backward above."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        unary: Tensor,
        log_a: Tensor,
        log_b: Tensor,
        lengths: Tensor,
    ) -> Tensor:
        with torch.no_grad():
            msg = forward(unary, log_a, log_b, lengths)
        ctx.msg = msg  # type: ignore[attr-defined]
        return msg.log_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None]:
        msg: Messages = ctx.msg  # type: ignore[attr-defined]
        back = backward(msg)
        w = grad.to(msg.alpha.dtype)
        gamma = state_marginals(msg, back) * w[:, None, None]
        if msg.alpha.shape[0] == 1:
            return gamma, torch.zeros_like(msg.a), torch.zeros_like(msg.b), None
        # The batch-summed counts as two [Z, B T] @ [B T, r] products (one GEMM each).
        Z, r = msg.a.shape
        left = msg.alpha[:-1].reshape(-1, Z)  # shape: (T-1 * B, Z)
        y = (back.y * w[:, None]).reshape(-1, r)
        grad_a = (left.T @ y) * msg.a
        h = (left @ msg.a) * w.repeat(msg.alpha.shape[0] - 1)[:, None]  # shape: (T-1 * B, r)
        grad_b = (h.T @ _next_weights(msg, back).reshape(-1, Z)) * msg.b
        return gamma, grad_a, grad_b, None


def log_partition(unary: Tensor, log_a: Tensor, log_b: Tensor, lengths: Tensor) -> Tensor:
    """``log Z`` ``[B]``: the custom autograd path when a gradient is needed."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (unary, log_a, log_b)):
        out = LogPartition.apply(unary, log_a, log_b, lengths)
        assert isinstance(out, Tensor)
        return out
    with torch.no_grad():
        return forward(unary, log_a, log_b, lengths).log_z
