"""Analytic Hessian-vector products of the chain log-partition, without a tape.

The Hessian of ``A(theta)`` is the covariance of the sufficient statistics, so for a direction
``v = (v_u, v_b)`` with path score ``s(z) = <v, phi(z)>``

``(H v)_k = E[phi_k(z) s(z)] - E[phi_k(z)] E[s(z)]``.

Given the marginals, both terms come from one forward and one backward sweep of "tangent"
messages. Instead of ``d alpha`` and ``d beta`` (which under/overflow like ``alpha`` and
``beta``) the sweeps carry *conditional* expectations, each up to a constant per ``(b, t)``:

* ``ra[t, j] = E[s_{<=t} | z_t = j]``: the score of ``v`` on the prefix up to and including
  the unary at ``t``, over prefixes ending in ``j``;
* ``rb[t, i] = E[s_{>t} | z_t = i]``: the score of ``v`` after ``t``, over suffixes from ``i``.

The chain posterior is Markov in both directions, with the conditionals
``p(z_t = i | z_{t+1} = j) = mu_b[t, i, j] / sum_i mu_b[t, i, j]`` and
``p(z_{t+1} = j | z_t = i) = mu_b[t, i, j] / sum_j mu_b[t, i, j]``, so

* ``ra[t+1, j] = v_u[t+1, j] + sum_i p(i | j) (ra[t, i] + v_b[t, i, j])``;
* ``rb[t, i] = sum_j p(j | i) (v_b[t, i, j] + v_u[t+1, j] + rb[t+1, j])``;
* ``(H v)_u[t] = mu_u[t] (x_u[t] - <mu_u[t], x_u[t]>)`` with ``x_u = ra + rb``;
* ``(H v)_b[t] = mu_b[t] (x_b[t] - <mu_b[t], x_b[t]>)`` with
  ``x_b[t, i, j] = ra[t, i] + v_b[t, i, j] + v_u[t+1, j] + rb[t+1, j]``.

``<mu[t], x[t]> = E[s]`` up to the same constant, so each message may be shifted by any
constant per ``(b, t)``: the sweeps centre them at every step (their mean under ``mu_u[t]``),
which keeps them at the size of one step's scores instead of the whole sequence's and makes
float32 rounding independent of ``T``. All weights are probabilities, so nothing over- or
underflows; states with zero probability get zero weight (never ``0 / 0``).

Cost: two linear recursions of batched vector-matrix products plus a few elementwise passes
over ``[B, T-1, Z, Z]``, on top of the (first-order) marginals.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _normalise(x: Tensor, dim: int) -> Tensor:
    """Divide by the sum along ``dim``; slices summing to 0 stay 0."""
    total = x.sum(dim, keepdim=True)
    return x / torch.where(total > 0, total, torch.ones_like(total))


def hvp(
    mu_u: Tensor, mu_b: Tensor, mask: Tensor, v_u: Tensor | None, v_b: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Compute the Hessian-vector product ``H v`` of ``A`` from the marginals.

    Args:
        mu_u: ``[B, T, Z]`` unary marginals (0 on padding and for sequences without a path).
        mu_b: ``[B, T-1, Z, Z]`` binary marginals, laid out ``[from, to]``.
        mask: BoolTensor ``[B, T]``, True at valid positions.
        v_u: ``[B, T, Z]`` (or broadcastable) direction on the unary statistics, or ``None``.
        v_b: ``[B, T-1, Z, Z]`` (or broadcastable) direction on the binary statistics, or
            ``None``.

    Returns:
        ``(h_u [B, T, Z], h_b [B, T-1, Z, Z])``; zero where the marginals are zero (padding,
        impossible states, sequences without a finite-score path).
    """
    B, T, Z = mu_u.shape
    zero = mu_u.new_zeros(())
    vu = torch.zeros_like(mu_u) if v_u is None else v_u.to(mu_u.dtype).expand(B, T, Z)
    vu = torch.where(mask.unsqueeze(-1), vu, zero)  # padding directions may hold anything
    if T == 1:
        return _centre(mu_u, vu, dims=(-1,)), mu_b.new_zeros(B, 0, Z, Z)
    vb = torch.zeros_like(mu_b) if v_b is None else v_b.to(mu_b.dtype).expand(B, T - 1, Z, Z)
    vb = torch.where(mask[:, 1:, None, None], vb, zero)

    fwd = _normalise(mu_b, -2)  # p(z_t = i | z_{t+1} = j)
    bwd = _normalise(mu_b, -1)  # p(z_{t+1} = j | z_t = i)
    g_f = vu[:, 1:] + (fwd * vb).sum(-2)  # shape: (B, T-1, Z)
    g_b = (bwd * (vb + vu[:, 1:, None, :])).sum(-1)  # shape: (B, T-1, Z)
    w = mu_u.unsqueeze(-1)  # centring weights, shape: (B, T, Z, 1)

    ra = vu[:, 0] - torch.bmm(vu[:, :1], w[:, 0]).squeeze(-1)
    ras = [ra]
    for t in range(1, T):
        new = torch.baddbmm(g_f[:, t - 1, None], ra.unsqueeze(1), fwd[:, t - 1])  # (B, 1, Z)
        ra = (new - torch.bmm(new, w[:, t])).squeeze(1)
        ras.append(ra)
    rb = torch.zeros_like(ra)
    rbs = [rb]
    for t in range(T - 2, -1, -1):
        new = torch.baddbmm(g_b[:, t, :, None], bwd[:, t], rb.unsqueeze(-1))  # (B, Z, 1)
        rb = (new - torch.bmm(w[:, t].transpose(1, 2), new)).squeeze(-1)
        rbs.append(rb)
    ra_all = torch.stack(ras, dim=1)
    rb_all = torch.stack(rbs[::-1], dim=1)

    h_u = _centre(mu_u, ra_all + rb_all, dims=(-1,))
    x_b = ra_all[:, :-1, :, None] + vb + (vu[:, 1:] + rb_all[:, 1:]).unsqueeze(-2)
    return h_u, _centre(mu_b, x_b, dims=(-2, -1))


def _centre(mu: Tensor, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``mu * (x - <mu, x>)``: the covariance term, with the mean over ``dims``."""
    return mu * (x - (mu * x).sum(dims, keepdim=True))
