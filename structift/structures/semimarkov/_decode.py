r"""Exact k-best Viterbi and forward-filtering backward-sampling for segmentations.

k-best: the max-plus forward recursion over the states ``(t, c)`` with a sorted list of the
``k`` best partial scores per state (the list Viterbi algorithm, Seshadri & Sundberg 1994)::

    V[0, c, 0] = 0,  V[0, c, r > 0] = -inf
    V[t, c, :] = the k largest of { V[t-k', a, r] + ms[t-k', k', a, c] : k', a, r }

and the answer is the k largest of ``V[L-1]`` over ``(c, r)``, traced back through the pointer
``(k', a, r)`` kept with every entry. Every finite entry is a distinct prefix (its pointer chain
names it), so the result is exact, in O(N K C^2 k log(K C k)) time and O(N C k) memory.

Tie rule: candidates are ranked by a stable descending sort of the flat index
``(k' - 1, a, r)`` (segment length major), the final list by ``(c, r)``. So among equal scores
the lower last label comes first, and backtracking prefers the shortest last segment, then the
lowest previous label. For k = 1 this is ``argmax``'s rule.

Ranks beyond the number of finite-score segmentations are not structures: their value is -1 at
every position (no segmentation is encoded so) and their score ``-inf``.

Sampling is exact forward filtering, backward sampling: the last label is drawn with
probability ∝ exp(alpha[L-1, c]), then, given a segment ending at t with label c, its length and
the previous label ``(k', a)`` with probability ∝ exp(alpha[t-k', a] + ms[t-k', k', a, c]),
until t = 0; O(N K C) per sample after the O(N K C^2) forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.structures.semimarkov._dp import by_end, forward

__all__ = ["sample", "topk_values"]

_NEG_INF = float("-inf")


def _best(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of the last dimension, ties to the lowest index (stable sort)."""
    values, index = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def topk_values(ms: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(values [k, B, N], exists [k, B])`` of the k best segmentations (module docstring).

    Args:
        ms: masked scores ``[B, N-1, K, C, C]`` (working dtype).
        lengths: LongTensor ``[B]``.
        k: how many.
    """
    with torch.no_grad():
        B, N1, K, C, _ = ms.shape
        N, K1, device = N1 + 1, K - 1, ms.device
        ends = by_end(ms, N)  # shape: (B, N, K-1, C_a, C_c)
        first = ms.new_full((B, C, k), _NEG_INF)
        first[:, :, 0] = 0.0
        chart, pointers = [first], [torch.zeros(B, C, k, dtype=torch.long, device=device)]
        empty = ms.new_full((B, C, k), _NEG_INF)
        for t in range(1, N):
            prev = torch.stack(
                [chart[t - j - 1] if t - j - 1 >= 0 else empty for j in range(K1)], 1
            )
            # cand[b, c, j, a, r] = V[t-1-j, a, r] + ends[b, t, j, a, c]
            cand = prev[:, None] + ends[:, t].permute(0, 3, 1, 2)[..., None]
            values, arg = _best(cand.reshape(B, C, K1 * C * k), k)
            chart.append(values)
            pointers.append(arg)
        V, ptr = torch.stack(chart, 1), torch.stack(pointers, 1)  # shape: (B, N, C, k)
        rows = torch.arange(B, device=device)
        last = lengths - 1
        final, flat = _best(V[rows, last].reshape(B, C * k), k)  # shape: (B, k)
        exists = torch.isfinite(final)
        label, rank = flat // k, flat % k
        at = last[:, None].expand(B, k).clone()
        out = torch.full((B, k, N), -1, dtype=torch.long, device=device)
        bi = rows[:, None].expand(B, k)
        out[bi, torch.arange(k, device=device)[None], at] = label
        ri = torch.arange(k, device=device)[None].expand(B, k)
        for _ in range(N - 1):
            active = at > 0
            if not bool(active.any()):
                break
            p = ptr[bi, at, label, rank]  # flat (j, a, r)
            j, a, r = p // (C * k), (p // k) % C, p % k
            t_new = torch.where(active, at - j - 1, at)
            label, rank = torch.where(active, a, label), torch.where(active, r, rank)
            out[bi[active], ri[active], t_new[active]] = label[active]
            at = t_new
        out = torch.where(exists[:, :, None], out, -1)
        return out.permute(1, 0, 2).contiguous(), exists.T.contiguous()


def sample(
    ms: Tensor, lengths: Tensor, sample_shape: torch.Size, generator: torch.Generator | None
) -> Tensor:
    """Exact samples ``[*sample_shape, B, N]`` by FFBS (module docstring), no graph."""
    with torch.no_grad():
        B, N1, K, C, _ = ms.shape
        N, K1, device = N1 + 1, K - 1, ms.device
        S = 1
        for n in sample_shape:
            S *= n
        ends = by_end(ms, N)  # shape: (B, N, K-1, C_a, C_c)
        alpha = forward(ends, graph=False)  # shape: (B, N, C)
        # back[b, t, j, a] = alpha[b, t - 1 - j, a] (-inf before the start)
        back = torch.stack(
            [
                torch.nn.functional.pad(
                    alpha[:, : max(N - j - 1, 0)], (0, 0, min(j + 1, N), 0), value=_NEG_INF
                )
                for j in range(K1)
            ],
            2,
        )
        b = torch.arange(B, device=device).repeat(S)  # item i -> batch element i % B
        t = (lengths - 1).repeat(S)
        out = torch.full((S * B, N), -1, dtype=torch.long, device=device)
        items = torch.arange(S * B, device=device)
        if S * B == 0:
            return out.reshape(*sample_shape, B, N)

        def draw(logits: Tensor) -> Tensor:
            probs = torch.softmax(logits, -1)
            probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0)
            return torch.multinomial(probs, 1, generator=generator)[:, 0]

        label = draw(alpha[b, t])
        out[items, t] = label
        for _ in range(N - 1):
            active = t > 0
            if not bool(active.any()):
                break
            logits = back[b, t] + ends[b, t, :, :, label]  # shape: (S*B, K-1, C_a)
            logits = torch.where(active[:, None, None], logits, 0.0)
            pick = draw(logits.reshape(S * B, K1 * C))
            t = torch.where(active, t - pick // C - 1, t)
            label = torch.where(active, pick % C, label)
            out[items[active], t[active]] = label[active]
        return out.reshape(*sample_shape, B, N)
