r"""Eisner's O(n³) chart for projective dependency trees: inside (any "reduce") and outside.

Positions 0..M-1 (ROOT and the words for multi-root trees, the words alone for single-root
ones); ``arcs[b, h, m]`` scores head h -> modifier m. For a span i < j the four items are
(Eisner 1996; the notation of McDonald's thesis, 2006)::

    I_R(i, j) = arcs[i, j] + ⊕_{i <= r < j} C_R(i, r) ⊗ C_L(r+1, j)     (head i, modifier j)
    I_L(i, j) = arcs[j, i] + the same sum                                (head j, modifier i)
    C_R(i, j) = ⊕_{i < r <= j} I_R(i, r) ⊗ C_R(r, j)                     (head i, complete)
    C_L(i, j) = ⊕_{i <= r < j} C_L(i, r) ⊗ I_L(r, j)                     (head j, complete)

with C(i, i) = 1. Every projective tree has exactly one derivation (the grammar is unambiguous),
so the sum over derivations is the sum over trees: the multi-root log-partition is
C_R(0, n) over ROOT and the words; the single-root one is ⊕_m arcs[0, m] ⊗ C_L(1, m) ⊗ C_R(m, n)
over the words alone (ROOT's complete span takes exactly one child).

Storage. All items of a chart live in one tensor ``D [2M, M, 4, B, R]`` (batch last, so the
batch is the contiguous inner axis of every operation; R is the rank axis: one entry in the log
semiring, the R best in the k-best one, ``reduce`` decides). Rows ``M-1 .. 2M-2`` hold the
spans: ``D[M-1+i, j, t]`` is C_R(i, j) or C_L(i, j) (t = 2, 1), I_R(i, j+1) (t = 0) or
I_L(i-1, j) (t = 3); everything else
is ``-inf``. Two strided views of D (no copies) index it by *start* ``S[i, k] = D[i, i+k]`` and
by *end*, reversed, ``E[j, c] = D[j-(M-1-c), j]``; with the shifts of I_R and I_L, every
width-w update is one batched operation on slices: the C-step pairs ``S[:M-w, :w, 0:2]``
(I_R, C_L) with ``E[w:, M-w:, 2:4]`` (C_R, I_L) and the I-step ``S[:M-w, :w, 2]`` (C_R) with
``E[w:, M-w:, 1]`` (C_L). Without a graph the views are ``as_strided`` and written in place;
with one they are gathers and ``index_put`` (out of place), so the program is plain
autograd-traceable torch, twice differentiable. O(n³) time (O(R² log R · n³) for the k-best
reduce), O(n²) chart memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from structift._ops import logsumexp

__all__ = [
    "Chart",
    "complete",
    "inside",
    "kbest_reduce",
    "lse_reduce",
    "lse_shares_reduce",
    "outside",
    "roots",
]

_NEG_INF = float("-inf")
IR, CL, CR, IL = 0, 1, 2, 3

# reduce(left, right [m, w, *, B, R]) -> ⊕ over (split, r_left, r_right) of left ⊗ right:
# (values [m, *, B, R], aux: back-pointers [m, *, B, R], shares, or None)
Reduce = Callable[[Tensor, Tensor], tuple[Tensor, Any]]


def lse_reduce(left: Tensor, right: Tensor) -> tuple[Tensor, None]:
    """The log semiring (R = 1) with a true ``-inf`` zero (``_ops.logsumexp`` under a graph)."""
    terms = left + right
    if terms.requires_grad:
        return logsumexp(terms, 1), None
    return torch.logsumexp(terms, 1), None  # its forward is NaN-free; no backward here


def lse_shares_reduce(left: Tensor, right: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The log semiring without a graph, keeping each candidate's share for ``outside``.

    Returns ``(⊕ terms, (exp(terms - c), Σ exp(terms - c)))`` with c the finite maximum: the
    share of a candidate is ``exp(terms - c) / Σ``, O(B n³) memory over the chart.
    """
    terms = left + right
    top = terms.amax(1).nan_to_num_(neginf=0.0)  # all -inf: shift 0, total 0, value -inf
    weights = terms.sub_(top[:, None]).exp_()
    total = weights.sum(1)
    return total.log().add_(top), (weights, total)


def kbest_reduce(k: int) -> Reduce:
    """The k-best max-plus semiring: the k largest candidates, ties to the lowest flat index."""

    def reduce(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
        if k == 1:  # the first maximum (torch.max's documented rule), without a sort
            values, index = (left + right).max(1)
            return values, index
        x = left[..., :, None] + right[..., None, :]  # shape: (m, w, *, B, R, R)
        x = x.movedim(1, -3).flatten(-3)  # shape: (m, *, B, w * R * R)
        values, index = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], index[..., :k]

    return reduce


class _Store:
    """The views ``S`` and ``E`` of a storage ``D`` (module docstring), read and written."""

    def __init__(self, D: Tensor, graph: bool) -> None:
        self.D, self.graph = D, graph
        self.M = M = D.shape[1]
        e, inner, base = D.stride(1), D.shape[2:], D.storage_offset()
        assert D.stride(0) == M * e
        if graph:  # flat row indices of the views, for gathers and index_put
            i = torch.arange(M, device=D.device)
            self.s_index = (M - 1) * M + i[:, None] * (M + 1) + i[None, :]
            self.e_index = i[:, None] * (M + 1) + i[None, :] * M
        else:
            tail = tuple(D.stride()[2:])
            size = (M, M, *inner)
            self.S = D.as_strided(size, ((M + 1) * e, e, *tail), base + (M - 1) * M * e)
            self.E = D.as_strided(size, ((M + 1) * e, M * e, *tail), base)

    def s(self, rows: slice, cols: slice | int) -> Tensor:
        if not self.graph:
            return self.S[rows, cols]
        return self.D.flatten(0, 1)[self.s_index[rows, cols]]

    def e(self, rows: slice, cols: slice | int) -> Tensor:
        if not self.graph:
            return self.E[rows, cols]
        return self.D.flatten(0, 1)[self.e_index[rows, cols]]

    def put(self, by_start: bool, rows: slice, col: int, t: int, new: Tensor) -> None:
        """``view[rows, col, t] = new`` (in place without a graph, else a new ``D``)."""
        if not self.graph:
            (self.S if by_start else self.E)[rows, col, t] = new
            return
        flat = (self.s_index if by_start else self.e_index)[rows, col]
        D = self.D.flatten(0, 1)
        t_index = torch.full_like(flat, t)
        self.D = torch.index_put(D, (flat, t_index), new).view(self.D.shape)


class Chart(NamedTuple):
    """The inside chart: storage ``D [2M, M, 4, B, R]`` and back-pointers per width.

    ``pointers[w - 1] = (I, C)``: what ``reduce`` kept at width w for the I- and the C-step
    (C_R, C_L). The k-best reduce keeps back-pointers, ``[M-w, B, R]`` and ``[M-w, 2, B, R]``:
    the flat index ``s * R² + r_left * R + r_right`` of the chosen split offset s and ranks;
    ``lse_shares_reduce`` keeps the shares that ``outside`` propagates.
    """

    D: Tensor
    pointers: list[tuple[Any, Any]]

    def spans(self) -> Tensor:
        """The span rows of D, ``[M (i), M (j), 4, B, R]`` (differentiable)."""
        M = self.D.shape[1]
        return self.D[M - 1 : 2 * M - 1]


def inside(arcs: Tensor, reduce: Reduce, R: int) -> Chart:
    """The inside chart of ``arcs [B, M, M]`` under ``reduce`` (module docstring)."""
    B, M, _ = arcs.shape
    graph = torch.is_grad_enabled() and arcs.requires_grad
    arcs = arcs.permute(1, 2, 0)  # shape: (M h, M m, B)
    D = arcs.new_full((2 * M, M, 4, B, R), _NEG_INF)  # a constant: written in place
    i = torch.arange(M, device=arcs.device)
    D[M - 1 + i, i, CL, :, 0] = D[M - 1 + i, i, CR, :, 0] = 0.0  # C(i, i) = 1 (rank 0)
    store = _Store(D, graph)
    pointers: list[tuple[Any, Any]] = []
    for w in range(1, M):
        m = c = M - w  # c: the by-end column of width w - 1 (and of I_L of width w)
        rows_s, rows_e, cols_s, cols_e = slice(0, m), slice(w, M), slice(0, w), slice(c, M)
        x, p_i = reduce(store.s(rows_s, cols_s)[:, :, CR], store.e(rows_e, cols_e)[:, :, CL])
        store.put(True, rows_s, w - 1, IR, x + arcs.diagonal(w).T[..., None])  # arcs[i, i+w]
        store.put(False, rows_e, c, IL, x + arcs.diagonal(-w).T[..., None])  # arcs[i+w, i]
        left = store.s(rows_s, cols_s)[:, :, IR : CL + 1]
        right = store.e(rows_e, cols_e)[:, :, CR : IL + 1]
        v, p_c = reduce(left, right)  # shape: (m, 2, B, R): C_R, C_L
        store.put(True, rows_s, w, CR, v[:, 0])
        store.put(True, rows_s, w, CL, v[:, 1])
        pointers.append((p_i, p_c))
    return Chart(store.D, pointers)


def _root_spans(spans: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """``(C_L(0, p), C_R(p, n-1))`` per root word p, each ``[M, B, R]`` (``-inf`` for p >= n)."""
    M, B = spans.shape[0], spans.shape[3]
    p = torch.arange(M, device=lengths.device)
    b = torch.arange(B, device=lengths.device)
    right = spans[p[:, None], (lengths - 1)[None, :], CR, b[None, :]]  # lower triangle: -inf
    return spans[0, :, CL], right


def roots(chart: Chart, root_arcs: Tensor, lengths: Tensor, reduce: Reduce):
    """The single-root top item: ⊕_p root_arcs[p] ⊗ C_L(0, p) ⊗ C_R(p, n-1) (word positions).

    ``root_arcs [B, M]`` scores ROOT -> word p+1. Returns ``(values [B, R], pointers [B, R])``
    with the flat index ``p * R² + r_left * R + r_right``.
    """
    left, right = _root_spans(chart.spans(), lengths)
    left = left + root_arcs.T[..., None]
    values, pointer = reduce(left[None], right[None])
    return values[0], None if pointer is None else pointer[0]


def complete(chart: Chart, lengths: Tensor) -> Tensor:
    """The multi-root top item C_R(0, n) per element: ``[B, R]``."""
    b = torch.arange(lengths.shape[0], device=lengths.device)
    return chart.spans()[0, lengths, CR, b]


def _split(g: Tensor, shares: tuple[Tensor, Tensor]) -> Tensor:
    """``g`` ``[m, ...]`` divided among an item's derivations by their kept shares."""
    weights, total = (t[..., 0] for t in shares)
    return weights * torch.where(total > 0, g / total, 0.0)[:, None]


def outside(chart: Chart, seed: Tensor, lengths: Tensor, root_arcs: Tensor | None):
    """Arc marginals ``[B, M, M]`` (and ROOT's ``[B, M]`` if single-root) by reverse mode.

    The adjoint of every item (its marginal probability) is propagated from the top item down
    the widths: an item's adjoint is split among its derivations in proportion to their share
    of its inside sum, as backprop through the logsumexps would, but without a per-step graph:
    ``chart`` comes from ``inside`` with ``lse_shares_reduce``, which kept the shares.
    ``seed [B]`` scales each element (the incoming gradient, ``0 <= seed <= 1`` so that the
    results, clamped to [0, 1], are probabilities: callers with other seeds scale
    afterwards). No graph; O(n³) time. R must be 1.
    """
    D = chart.D.detach()[..., 0]
    M, B = D.shape[1], D.shape[3]
    G = torch.zeros_like(D)
    adj = _Store(G, graph=False)
    gS, gE = adj.S, adj.E
    g_spans = G[M - 1 : 2 * M - 1]
    b = torch.arange(B, device=seed.device)
    root_mu = None
    if root_arcs is None:
        g_spans[0, lengths, CR, b] = seed
    else:
        left, right = _root_spans(D[M - 1 : 2 * M - 1], lengths)
        cand = (root_arcs.T + left + right)[None, :, :, None]  # shape: (1, M, B, 1)
        _, shares = lse_shares_reduce(cand, torch.zeros_like(cand))
        root_mu = _split(seed[None], shares)[0]  # shape: (M, B)
        p = torch.arange(M, device=seed.device)
        g_spans[0, :, CL] += root_mu
        g_spans[p[:, None], (lengths - 1)[None, :], CR, b[None, :]] += root_mu
    mu = torch.zeros(M, M, B, dtype=D.dtype, device=D.device)  # shape: (M h, M m, B)
    for w in range(M - 1, 0, -1):
        m = c = M - w
        shares_i, shares_c = chart.pointers[w - 1]
        share = _split(gS[:m, w, CL : CR + 1].flip(1), shares_c)  # adjoints of C_R, C_L
        gS[:m, :w, IR : CL + 1] += share
        gE[w:, c:, CR : IL + 1] += share
        g_right, g_left = gS[:m, w - 1, IR], gE[w:, c, IL]
        mu.diagonal(w).copy_(g_right.T)
        mu.diagonal(-w).copy_(g_left.T)
        share = _split(g_right + g_left, shares_i)
        gS[:m, :w, CR] += share
        gE[w:, c:, CL] += share
    # Probabilities: sums of rounded shares can exceed 1 by an ulp; clamping only moves them
    # towards the exact value.
    mu = mu.permute(2, 0, 1).clamp_(0.0, 1.0)
    return mu, None if root_mu is None else root_mu.T.clamp(0.0, 1.0)


def backtrack(chart: Chart, lengths: Tensor, root: Tensor | None, exists: Tensor) -> Tensor:
    """The arcs ``[B, M, M]`` (0/1) of the best derivation of a 1-best (R = 1) chart.

    The outside pass of the max semiring: top-down over the widths, each item of the best
    derivation marks the two children its back-pointer names (a scatter per step), so the
    traversal is O(n) batched steps whatever the trees. ``root [B]`` is the root word
    (single-root) or None (multi-root); ``exists [B]``: elements with a finite best score.
    """
    M, B = chart.D.shape[1], chart.D.shape[3]
    used = torch.zeros(chart.D.shape[:-1], dtype=chart.D.dtype, device=chart.D.device)
    marks = _Store(used, graph=False)
    uS, uE = marks.S, marks.E
    spans = used[M - 1 : 2 * M - 1]
    b = torch.arange(B, device=lengths.device)
    on = exists.to(used.dtype)
    if root is None:
        spans[0, lengths, CR, b] = on
    else:
        spans[0, root, CL, b] = on
        spans[root, lengths - 1, CR, b] = on
    arcs = torch.zeros(M, M, B, dtype=used.dtype, device=used.device)  # shape: (M h, M m, B)
    for w in range(M - 1, 0, -1):
        m = c = M - w
        p_i, p_c = chart.pointers[w - 1]
        mark = uS[:m, w, CL : CR + 1].flip(1)[:, None]  # C_R, C_L: shape (m, 1, 2, B)
        index = p_c[..., 0][:, None]
        uS[:m, :w, IR : CL + 1].scatter_add_(1, index, mark)
        uE[w:, c:, CR : IL + 1].scatter_add_(1, index, mark)
        right, left = uS[:m, w - 1, IR], uE[w:, c, IL]
        arcs.diagonal(w).copy_(right.T)
        arcs.diagonal(-w).copy_(left.T)
        mark, index = (right + left)[:, None], p_i[..., 0][:, None]
        uS[:m, :w, CR].scatter_add_(1, index, mark)
        uE[w:, c:, CL].scatter_add_(1, index, mark)
    return arcs.permute(2, 0, 1)
