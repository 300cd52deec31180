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
underflows; states with zero (or subnormal) probability get zero weight (never ``0 / 0``).

Cost: two linear recursions of batched vector-matrix products plus a few elementwise passes
over ``[B, T-1, Z, Z]``, on top of the (first-order) marginals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _inverse(x: Tensor) -> Tensor:
    """``1 / x`` where ``x`` is a normal number (``> tiny``), else 0.

    States of (numerically) zero probability get zero weight. The threshold is ``tiny``, not 0:
    the reciprocal of a subnormal probability overflows to ``inf`` (``1 / 1e-318`` in float64,
    ``1 / 1e-39`` in float32) and ``0 * inf`` would turn the whole product NaN. This is the
    support the variational KKT system is restricted to as well (``chain_support``).
    """
    positive = x > torch.finfo(x.dtype).tiny
    return torch.where(positive, x, torch.ones_like(x)).reciprocal() * positive


def hvp(
    mu_u: Tensor,
    mu_b: Tensor,
    mask: Tensor,
    v_u: Tensor | None,
    v_b: Tensor | None,
    sweeps: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Compute the Hessian-vector product ``H v`` of ``A`` from the marginals.

    Only four passes touch ``[B, T-1, Z, Z]`` tensors (``mu_b * v_b``, its two sums and the
    result); the conditionals are applied as ``mu_b`` products rescaled by ``[B, T-1, Z]``
    row/column sums, never materialised.

    Args:
        mu_u: ``[B, T, Z]`` unary marginals (0 on padding and for sequences without a path).
        mu_b: ``[B, T-1, Z, Z]`` binary marginals, laid out ``[from, to]``.
        mask: BoolTensor ``[B, T]``, True at valid positions.
        v_u: ``[B, T, Z]`` (or broadcastable) direction on the unary statistics, or ``None``.
        v_b: ``[B, T-1, Z, Z]`` (or broadcastable) direction on the binary statistics, or
            ``None``.
        sweeps: the engine that runs the two recursions, a chain backend's ``sweeps``
            (``Fused``: one Triton launch); default ``loop_sweeps`` (small kernels per step).

    Returns:
        ``(h_u [B, T, Z], h_b [B, T-1, Z, Z])``; zero where the marginals are zero (padding,
        impossible states, sequences without a finite-score path).
    """
    B, T, Z = mu_u.shape
    zero = mu_u.new_zeros(())
    vu = torch.zeros_like(mu_u) if v_u is None else v_u.to(mu_u.dtype).expand(B, T, Z)
    vu = torch.where(mask.unsqueeze(-1), vu, zero)  # padding directions may hold anything
    if T == 1:
        return _centre(mu_u, vu), mu_b.new_zeros(B, 0, Z, Z)
    if v_b is None:
        mv = None  # mu_b * v_b
        mv_from = mv_to = mu_u.new_zeros(B, T - 1, Z)
    else:
        mv = mu_b * v_b.to(mu_b.dtype)
        mv = torch.where(mask[:, 1:, None, None], mv, 0.0)  # padding directions: anything
        mv_from, mv_to = mv.sum(-1), mv.sum(-2)  # shape: (B, T-1, Z)
    p_from, p_to = mu_b.sum(-1), mu_b.sum(-2)  # p(z_t = i), p(z_{t+1} = j): (B, T-1, Z)
    inv_from, inv_to = _inverse(p_from), _inverse(p_to)
    # Step terms: v_u[t+1] + E[v_b[t] | z_{t+1}] and E[v_b[t] + v_u[t+1] | z_t].
    g_f = vu[:, 1:] + mv_to * inv_to
    vu_next = vu[:, 1:].unsqueeze(-1)  # shape: (B, T-1, Z, 1)
    g_b = (mv_from + torch.matmul(mu_b, vu_next).squeeze(-1)) * inv_from
    run = loop_sweeps if sweeps is None else sweeps
    ra_all, rb_all = run(mu_u, mu_b, vu[:, 0], g_f, inv_to, g_b, inv_from)

    h_u = _centre(mu_u, ra_all + rb_all)
    # x_b[t, i, j] = ra[t, i] + v_b[t, i, j] + (v_u + rb)[t+1, j]; its mean under mu_b[t]:
    left, right = ra_all[:, :-1], vu[:, 1:] + rb_all[:, 1:]
    mean = (p_from * left).sum(-1) + (p_to * right).sum(-1) + mv_from.sum(-1)
    h_b = mu_b * (left - mean[..., None]).unsqueeze(-1)
    h_b = torch.addcmul(h_b, mu_b, right.unsqueeze(-2))  # out of place: vmap has a rule
    if mv is not None:
        h_b += mv
    return h_u, h_b


def loop_sweeps(
    mu_u: Tensor,
    mu_b: Tensor,
    vu0: Tensor,
    g_f: Tensor,
    inv_to: Tensor,
    g_b: Tensor,
    inv_from: Tensor,
) -> tuple[Tensor, Tensor]:
    """The centred tangent messages ``(ra, rb)`` ``[B, T, Z]`` by two loops of batched products.

    Args:
        mu_u: ``[B, T, Z]`` unary marginals (the centring weights); mu_b: ``[B, T-1, Z, Z]``.
        vu0: ``[B, Z]`` the unary direction at ``t = 0``.
        g_f, inv_to, g_b, inv_from: ``[B, T-1, Z]`` step terms and inverse column / row sums of
            ``mu_b`` (see ``hvp``).
    """
    T = mu_u.shape[1]
    w = mu_u.unsqueeze(-1)  # centring weights, shape: (B, T, Z, 1)
    v0 = vu0.unsqueeze(1)  # shape: (B, 1, Z)
    ra = v0 - torch.bmm(v0, w[:, 0])  # shape: (B, 1, Z)
    ras = [ra]
    for t in range(1, T):
        new = torch.addcmul(
            g_f[:, t - 1, None], torch.bmm(ra, mu_b[:, t - 1]), inv_to[:, t - 1, None]
        )
        ra = new - torch.bmm(new, w[:, t])
        ras.append(ra)
    rb = torch.zeros_like(w[:, 0])  # shape: (B, Z, 1)
    rbs = [rb]
    for t in range(T - 2, -1, -1):
        new = torch.addcmul(g_b[:, t, :, None], torch.bmm(mu_b[:, t], rb), inv_from[:, t, :, None])
        rb = new - torch.bmm(w[:, t].transpose(1, 2), new)
        rbs.append(rb)
    ra_all = torch.cat(ras, dim=1)  # shape: (B, T, Z)
    rb_all = torch.cat(rbs[::-1], dim=2).transpose(1, 2)
    return ra_all, rb_all


def _centre(mu: Tensor, x: Tensor) -> Tensor:
    """``mu * (x - <mu, x>)``: the covariance term, with the mean over the last dimension."""
    return mu * (x - (mu * x).sum(-1, keepdim=True))
