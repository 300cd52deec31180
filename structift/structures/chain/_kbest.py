"""k-best Viterbi: the ``k`` highest-scoring tag sequences of a chain, exactly.

The max-plus recursion of Viterbi with a sorted list of ``k`` entries per state instead of one
(the "k-best" generalisation of the Viterbi algorithm; Seshadri & Sundberg 1994, "List Viterbi
decoding algorithms"). With ``alpha_t[j, r]`` the score of the ``r``-th best prefix ending in
state ``j`` at position ``t``::

    alpha_0[j, 0] = unary_0[j],   alpha_0[j, r > 0] = -inf
    alpha_t[j, :] = the k largest of { alpha_{t-1}[i, r] + binary_{t-1}[i, j] : i, r } + unary_t[j]

and the answer is the ``k`` largest of ``alpha_{L-1}`` over ``(j, r)``, traced back through the
pointers ``(i, r)`` kept with every entry. Every finite entry is a distinct path (its pointer
chain names its prefix), so the result is exact: the ``k`` best paths, best first, in
``O(T Z^2 k log(Z k))``.

Tie rule. Candidates are sorted by a stable descending sort of the flat index ``i * k + r``
(state major), and the final list likewise over ``j * k + r``. Two prefixes through the same
``(i, j)`` differ in score by their own prefix scores, so by induction paths of equal score
come out in ascending lexicographic order of the *reversed* sequence ``(z_{L-1}, ..., z_0)``:
the lower last state first, then the lower second-to-last, and so on. For ``k = 1`` this is
Viterbi's rule (ties to the lowest state at every backtracking step).

Missing paths. Ranks beyond the number of finite-score paths (``k > Z^L``, or ``-inf``
potentials forbidding paths) are not paths: their score is ``-inf`` and their tags are 0.

Numerics: the lists are centred at every step (their finite maximum over ``(j, r)`` is
subtracted; the ranking is shift-invariant), as in ``_decode.viterbi``. The scores returned by
the callers are recomputed from the tags (``_decode.score``), so they are differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.structures.chain import _decode, _log

__all__ = ["topk", "topk_tags"]


def _centre(alpha: Tensor) -> Tensor:
    """Subtract the finite maximum over ``(j, r)`` per row; rows of all ``-inf`` stay."""
    m = alpha.flatten(1).amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return alpha - m[:, None, None]


def _best(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of the last dimension, ties to the lowest index (stable)."""
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


def topk_tags(unary: Tensor, binary: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best tag sequences ``[k, B, T]`` and which of them exist ``[k, B]`` (bool).

    No graph. ``exists[r, b]`` is False where sequence ``b`` has at most ``r`` finite-score
    paths; the tags there are 0. Tags beyond each length are 0.
    """
    with torch.no_grad():
        B, T, Z = unary.shape
        device = unary.device
        if unary.dtype in (torch.float16, torch.bfloat16):  # the working dtype, as elsewhere
            unary, binary = unary.float(), binary.float()
        b = _log.expand_binary(binary, B, T, Z)
        mask = lengths_to_mask(lengths.to(device), T)
        alpha = unary.new_full((B, Z, k), float("-inf"))
        alpha[:, :, 0] = unary[:, 0]
        alpha = _centre(alpha)
        # Padding points every entry to itself, so backtracking carries the last tags through.
        ident = torch.arange(Z * k, device=device).reshape(1, Z, k).expand(B, Z, k)
        pointers = []
        for t in range(1, T):
            # cand[b, j, i * k + r] = alpha[b, i, r] + binary[b, t-1, i, j]
            cand = alpha[:, None, :, :] + b[:, t - 1].transpose(1, 2)[..., None]  # (B, Z, Z, k)
            values, arg = _best(cand.reshape(B, Z, Z * k), k)  # shape: (B, Z, k)
            new = _centre(values + unary[:, t, :, None])
            valid = mask[:, t, None, None]
            alpha = torch.where(valid, new, alpha)
            pointers.append(torch.where(valid, arg, ident))
        final, flat = _best(alpha.reshape(B, Z * k), k)  # shape: (B, k), entries j * k + r
        exists = torch.isfinite(final)
        state, rank = flat // k, flat % k
        tags = [state]
        for ptr in reversed(pointers):
            prev = ptr.reshape(B, Z * k).gather(1, state * k + rank)  # i * k + r
            state, rank = prev // k, prev % k
            tags.append(state)
        path = torch.stack(tags[::-1], dim=-1).permute(1, 0, 2)  # shape: (k, B, T)
        keep = exists.T[:, :, None] & mask[None]
        return torch.where(keep, path, torch.zeros_like(path)), exists.T.contiguous()


def topk(unary: Tensor, binary: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(tags [k, B, T], scores [k, B])``: the k best paths, best first (module docstring).

    ``scores[r] = score(unary, binary, lengths, tags[r])``, differentiable, and ``-inf`` where
    the path does not exist (no gradient there).
    """
    tags, exists = topk_tags(unary, binary, lengths, k)
    B, T, _ = unary.shape
    # One score per rank (k is small): no k-fold copy of per-position potentials.
    scores = torch.stack([_decode.score(unary, binary, lengths, tags[r]) for r in range(k)])
    scores = torch.where(exists, scores, torch.full_like(scores, float("-inf")))
    # Scores recomputed from the tags may differ from the recursion's by rounding: a stable
    # sort keeps the order descending in the returned numbers (exact ties keep the rule).
    order = torch.sort(scores.detach(), dim=0, descending=True, stable=True).indices
    return tags.gather(0, order[:, :, None].expand(k, B, T)), scores.gather(0, order)
