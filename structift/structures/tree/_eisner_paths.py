"""Top-down traversals of an Eisner chart: k-best back-pointer decoding and exact sampling.

Both walk the derivations from the top item down, all trees at once: a *frontier* of items,
a LongTensor ``[6, n]`` with rows (output row, batch element, item type, i, j, rank), is
expanded one level at a time, each item choosing a split offset s (and the ranks of its two
children), until only complete spans of width 0 remain; every incomplete item met writes its
arc. A derivation has at most 2n - 1 levels, each one batched over every row (O(n) levels,
O(n) items per tree; sampling draws among O(n) splits per item, O(n²) per tree).

Item types here: 0 = C_R, 1 = C_L, 2 = I_R, 3 = I_L (the items of ``_eisner``'s module
docstring). An item ``(t, i, j)`` split at offset s has the children
``(lt, i, i + s + lo)`` and ``(rt, i + s + ro, j)`` with ``(lt, lo, rt, ro) = _CHILDREN[t]``,
and its split's weight is the product of their inside values. Decoding reads s and the ranks
from the back-pointers; sampling draws s with probability proportional to that weight
(Gumbel-max), which samples a tree exactly from p: the inside values are the sums over the
sub-derivations, so each choice is the conditional of the split given the item.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from structift.structures.tree import _eisner
from structift.structures.tree._eisner import Chart

__all__ = ["decode", "sample"]

# Per item type: the left child's type and offset, the right child's type and offset.
_CHILDREN = ((2, 1, 0, 1), (1, 0, 3, 0), (0, 0, 1, 1), (0, 0, 1, 1))
_POINTER = (1, 2, 0, 0)  # which back-pointer table serves each type: I, C_R, C_L

# choose(items [6, n]) -> (s, r_left, r_right); rows of items: row, b, typ, i, j, rank
Choose = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def _dense(chart: Chart) -> Tensor:
    """The inside values ``[4, B, M, M]`` of C_R, C_L, I_R, I_L at ``[t, b, i, j]`` (R = 1)."""
    spans = chart.spans()[..., 0].permute(2, 3, 0, 1)  # shape: (4, B, M i, M j)
    pad_col = torch.full_like(spans[_eisner.IR, :, :, :1], float("-inf"))
    pad_row = torch.full_like(spans[_eisner.IL, :, :1, :], float("-inf"))
    ir = torch.cat([pad_col, spans[_eisner.IR, :, :, :-1]], 2)  # I_R(i, j) = D[i, j-1]
    il = torch.cat([spans[_eisner.IL, :, 1:, :], pad_row], 1)  # I_L(i, j) = D[i+1, j]
    return torch.stack([spans[_eisner.CR], spans[_eisner.CL], ir, il])


def _walk(items: Tensor, choose: Choose, heads: Tensor, offset: int) -> None:
    """Expand ``items [6, n]`` level by level, writing every arc into ``heads [rows, N+2]``.

    Items that are not arcs write to the scratch column N+1 (no masked indexing).
    """
    children = torch.tensor(_CHILDREN, device=heads.device)
    scratch = heads.shape[1] - 1
    while items.shape[1] > 0:
        row, b, typ, i, j, _ = items
        s, r_left, r_right = choose(items)
        right = typ == 2
        mod = torch.where(right, j, i) + offset
        heads[row, torch.where(typ >= 2, mod, scratch)] = torch.where(right, i, j) + offset
        lt, lo, rt, ro = children[typ].T
        kids = torch.stack([row, b, lt, i, i + s + lo, r_left, row, b, rt, i + s + ro, j, r_right])
        kids = kids.view(2, 6, -1).transpose(0, 1).reshape(6, -1)
        items = kids[:, kids[3] < kids[4]]  # complete spans of width 0 end the derivation


def _root_children(
    rows: Tensor, b: Tensor, p: Tensor, lengths: Tensor, r_left: Tensor, r_right: Tensor
) -> Tensor:
    """``C_L(0, p)`` and ``C_R(p, n-1)`` under ROOT -> word p+1 (word positions): ``[6, n]``."""
    zero = torch.zeros_like(rows)
    left = torch.stack([rows, b, zero + 1, zero, p, r_left])
    right = torch.stack([rows, b, zero, p, lengths[b] - 1, r_right])
    items = torch.cat([left, right], 1)
    return items[:, items[3] < items[4]]


def decode(
    chart: Chart,
    top: tuple[Tensor, Tensor | None],
    lengths: Tensor,
    num_words: int,
    multi_root: bool,
) -> Tensor:
    """Heads ``[R, B, N+1]`` of the R best derivations (-1 at index 0, padding, missing ranks).

    ``top = (values [B, R], root pointers [B, R] or None)`` from ``_eisner.complete`` /
    ``_eisner.roots``.
    """
    _, M, _, B, R = chart.D.shape
    dev = lengths.device
    table = torch.full((2 * M, M, 3, B, R), -1, dtype=torch.long, device=dev)
    by_start = _eisner._Store(table, graph=False).S
    for w, (p_i, p_c) in enumerate(chart.pointers, start=1):
        assert p_i is not None and p_c is not None
        by_start[: M - w, w, 0] = p_i
        by_start[: M - w, w, 1:] = p_c
    flat_table = table[M - 1 : 2 * M - 1].reshape(-1)  # shape: (M i * M j * 3 * B * R,)
    values, root_ptr = top
    exists = torch.isfinite(values).T.reshape(-1)  # shape: (R * B,)
    heads = torch.full((R * B, num_words + 2), -1, dtype=torch.long, device=dev)
    rows = torch.arange(R * B, device=dev)[exists]
    rank, b = rows // B, rows % B
    pointer = torch.tensor(_POINTER, device=dev)

    def choose(items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, bb, typ, i, j, r = items
        flat = flat_table.take((((i * M + j) * 3 + pointer[typ]) * B + bb) * R + r)
        return flat // (R * R), (flat // R) % R, flat % R

    if multi_root:
        zero = torch.zeros_like(rows)
        _walk(torch.stack([rows, b, zero, zero, lengths[b], rank]), choose, heads, 0)
    else:
        assert root_ptr is not None
        flat = root_ptr[b, rank]
        p, r_left, r_right = flat // (R * R), (flat // R) % R, flat % R
        heads[rows, p + 1] = 0
        _walk(_root_children(rows, b, p, lengths, r_left, r_right), choose, heads, 1)
    return heads[:, :-1].reshape(R, B, num_words + 1)


def _gumbel(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Index of a draw from softmax(logits) along the last axis (Gumbel-max)."""
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype, device=logits.device)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def sample(
    chart: Chart,
    arcs_root: Tensor | None,
    lengths: Tensor,
    num_words: int,
    num_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """``num_samples`` exact samples ``[S, B, N+1]`` from the log-semiring ``chart`` (R = 1).

    ``arcs_root [B, M]`` (ROOT -> word p+1) for single-root trees, None for multi-root.
    """
    values = _dense(chart)
    _, B, M, _ = values.shape
    flat = values.reshape(-1)
    dev = lengths.device
    S = num_samples
    heads = torch.full((S * B, num_words + 2), -1, dtype=torch.long, device=dev)
    rows = torch.arange(S * B, device=dev)
    b = rows % B
    children = torch.tensor(_CHILDREN, device=dev)

    def choose(items: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _, bb, typ, i, j, _ = items
        width = j - i
        split = torch.arange(int(width.max()), device=dev)  # only the offsets that exist
        lt, lo, rt, ro = children[typ].T
        row_l = ((lt * B + bb) * M + i) * M  # flat offsets into values
        row_r = (rt * B + bb) * (M * M) + j
        col_l = (i + lo)[:, None] + split
        col_r = (i + ro)[:, None] + split
        valid = split < width[:, None]
        col_l, col_r = col_l.where(valid, 0), col_r.where(valid, 0)
        logits = flat.take(row_l[:, None] + col_l) + flat.take(row_r[:, None] + col_r * M)
        logits = torch.where(valid, logits, float("-inf"))
        s = _gumbel(logits, generator)
        return s, torch.zeros_like(s), torch.zeros_like(s)

    zero = torch.zeros_like(rows)
    if arcs_root is None:
        _walk(torch.stack([rows, b, zero, zero, lengths[b], zero]), choose, heads, 0)
    else:
        p = torch.arange(M, device=dev)
        right = values[0, b[:, None], p, (lengths[b] - 1)[:, None]]  # C_R(p, n-1)
        logits = arcs_root[b] + values[1, b[:, None], 0, p] + right
        logits = torch.where(p < lengths[b][:, None], logits, float("-inf"))
        root = _gumbel(logits, generator)
        heads[rows, root + 1] = 0
        _walk(_root_children(rows, b, root, lengths, zero, zero), choose, heads, 1)
    return heads[:, :-1].reshape(S, B, num_words + 1)
