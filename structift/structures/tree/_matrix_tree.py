r"""Kernels of the matrix-tree theorem for non-projective dependency trees.

Notation: ``w[b, h, m] = exp(θ[b, h, m] − c[b, m])`` are the arc weights after centring each
modifier column by its best head score ``c[b, m]`` (a shift that leaves p unchanged and
multiplies every tree's weight by ``exp(−Σ_m c_m)``), so ``w ∈ [0, 1]`` with a 1 in every
column. Words are 1..N; padded words get an identity row and column (det unchanged).

Two ways to compute ``log Z = log det L̂(w) + Σ_m c_m``:

* ``laplacian`` + LU (the fast path): the Koo et al. (2007) Laplacian over the words,
  ``L̂[m, m] = Σ_h w[h, m]`` (in-weight; the root counted only with ``multi_root``),
  ``L̂[h, m] = −w[h, m]``, and for a single root the first row replaced by the root weights
  (Koo et al. 2007; Zmigrod, Vieira & Cotterell 2020, arXiv:2010.02550). LAPACK's pivoted LU
  in float64, whatever the input dtype. Its relative error is about ``n κ₁(L̂) ε₆₄``: accurate
  unless the best-head graph is nearly cyclic (then L̂ is nearly singular: a cycle's weight
  ``exp(−gap)`` with gap > 745 even underflows to an exactly singular matrix).
* ``log_arborescences`` (the robust path): Gaussian elimination of the words one by one in
  the log domain, subtraction-free as in the GTH algorithm (Grassmann, Taksar & Heyman 1985;
  O'Cinneide 1993): eliminating word k multiplies the count by its current in-weight
  ``D_k = Σ_h w[h, k]`` and updates ``w[h, m] += w[h, k] w[k, m] / D_k`` (the Schur
  complement of a Laplacian is a Laplacian). Only sums and products of positive numbers, in
  log space: full relative accuracy and unlimited range, O(N³) in N sequential steps.

The structure uses the fast path where ``κ₁`` certifies it and the robust one elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import logsumexp

__all__ = [
    "arc_marginals_",
    "certified",
    "laplacian",
    "log_arborescences",
    "log_single_root",
]

_NEG_INF = float("-inf")


def laplacian(w: Tensor, word: Tensor, multi_root: bool) -> tuple[Tensor, Tensor]:
    """The matrix-tree Laplacian ``L̂ [B, N, N]`` of the weights ``w [B, N+1, N+1]`` and an
    upper bound on its 1-norm ``[B]``.

    ``w`` is zero at every ignored arc; ``word`` is the BoolTensor ``[B, N+1]`` of the words.
    ``det L̂`` is the total weight of the (single- or multi-root) trees. Differentiable (the
    in-place writes go to a fresh tensor). Every entry of a column ``m`` of L̂ is bounded by
    the column's in-weight ``d_m = Σ_h w[h, m]`` (the root included), so
    ``‖L̂‖₁ ≤ max_m 2 d_m`` (+1 for padding), within a factor 2 of the exact norm: a
    condition number bounded with it is conservative.
    """
    words, root = w[:, 1:, 1:], w[:, 0, 1:]  # shape: (B, N, N), (B, N)
    inweight = words.sum(-2)
    pad = (~word[:, 1:]).to(w.dtype)  # padding: identity rows and columns
    diag = inweight + pad + root if multi_root else inweight + pad
    lap = words.neg()  # the diagonal of ``words`` is 0 (no self-arcs)
    lap.diagonal(dim1=-2, dim2=-1).copy_(diag)
    if not multi_root:
        lap[:, 0, :] = root
    norm = (2 * inweight + root + pad).detach().amax(-1)
    return lap, norm


def certified(info: Tensor, norm: Tensor, inverse: Tensor, limit: float) -> Tensor:
    """BoolTensor ``[B]``: the factorization succeeded and ``κ₁ ≤ norm ‖L̂⁻¹‖₁ ≤ limit``.

    ``norm`` bounds ``‖L̂‖₁`` (`laplacian`); a NaN or infinite bound fails the test.
    """
    kappa = norm * inverse.abs().sum(-2).amax(-1)
    return (info == 0) & (kappa <= limit)


def arc_marginals_(w: Tensor, inverse: Tensor, multi_root: bool) -> Tensor:
    """The arc marginals ``[B, N+1, N+1]`` from ``X = L̂⁻¹`` (Koo et al. 2007, §3.2), in place.

    ``μ[h, m] = ∂ log det L̂ / ∂θ[h, m] = w[h, m] Σ_ij X[j, i] ∂L̂[i, j]/∂w[h, m]``:
    multi-root ``μ[h, m] = w[h, m] (X[m, m] − X[m, h])``, ``μ[0, m] = w[0, m] X[m, m]``;
    single-root the same except that row 1 of L̂ holds the root weights, so the terms of
    L̂[1, ·] drop out and ``μ[0, m] = w[0, m] X[m, 1]`` (indices of words, 1-based). O(N²)
    given X. The result is written into ``w`` (overwritten and returned, one buffer fewer);
    ``w`` must be zero in column 0 and on the diagonal (ignored arcs), which stay zero.
    """
    diag = torch.diagonal(inverse, dim1=-2, dim2=-1)  # shape: (B, N) X[m, m]
    factor = diag[:, None, :] - inverse.transpose(-1, -2)  # shape: (B, N h, N m)
    if multi_root:
        w[:, 0, 1:] *= diag
    else:
        # Row 1 of L̂ holds the root weights: for m = word 1 the X[m, m] term drops out, for
        # h = word 1 the X[m, h] term does.
        factor[:, :, 0] -= diag[:, :1]
        factor[:, 0, :] = diag
        factor[:, 0, 0] = 0.0
        w[:, 0, 1:] *= inverse[:, :, 0]
    w[:, 1:, 1:] *= factor
    return w


def log_arborescences(log_w: Tensor) -> Tensor:
    """Log total weight of the arborescences rooted at node 0, ``[B]`` (multi-root trees).

    Args:
        log_w: ``[B, N+1, N+1]`` log arc weights ``log w[h, m]`` (node 0 the root, ``-inf``
            for absent arcs, on the diagonal and in column 0). A padded word should carry
            only the arc from the root, of log-weight 0.

    Subtraction-free log-domain elimination (module docstring), twice differentiable, with a
    true ``-inf`` (zero gradients) when some word has no path from the root. O(N³) work in
    N steps.
    """
    g = log_w
    total = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    while g.shape[-1] > 1:
        r = g.shape[-1]
        col, row = g[:, :, 1], g[:, 1, :]  # in- and out-weights of the word eliminated
        log_d = logsumexp(col, -1)  # shape: (B,) its in-weight D_k
        total = total + log_d
        safe = torch.where(torch.isfinite(log_d), log_d, 0.0)
        keep = [0, *range(2, r)]
        rest = g[:, keep][:, :, keep]
        through = col[:, keep, None] + row[:, None, keep] - safe[:, None, None]
        g = logsumexp(torch.stack([rest, through]), 0)
        eye = torch.eye(r - 1, dtype=torch.bool, device=g.device)
        g = torch.where(eye, _NEG_INF, g)  # no self-loops (the diagonal is in D)
    return total


def log_single_root(log_w: Tensor, word: Tensor) -> Tensor:
    """Log total weight of the trees with exactly one word on the root, ``[B]``.

    ``Z = Σ_m w[0, m] A_m`` with ``A_m`` the weight of the arborescences over the words rooted
    at m, each computed by ``log_arborescences`` with the root's arcs replaced by one arc of
    weight 1 to m (and to the padded words): N eliminations batched, O(N⁴) work.
    """
    B, N1, _ = log_w.shape
    N = N1 - 1
    pad = ~word[:, 1:]  # shape: (B, N)
    only = torch.eye(N, dtype=torch.bool, device=log_w.device)[None] | pad[:, None, :]
    root_rows = torch.where(only, 0.0, _NEG_INF).to(log_w.dtype)  # shape: (B, N m, N)
    root_rows = torch.cat([torch.full_like(root_rows[..., :1], _NEG_INF), root_rows], -1)
    variants = log_w[:, None].expand(B, N, N1, N1)
    variants = torch.cat([root_rows[:, :, None, :], variants[:, :, 1:, :]], dim=2)
    log_a = log_arborescences(variants.reshape(B * N, N1, N1)).reshape(B, N)
    return logsumexp(log_w[:, 0, 1:] + log_a, -1)
