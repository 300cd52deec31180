"""``TreeSpace``: dependency trees over ``n = lengths[b]`` words, shared by both tree structures.

θ = (arc_scores ``[B, N+1, N+1]``,): ``arc_scores[b, h, m]`` scores head h -> modifier m, with
index 0 the ROOT and the words 1..n (n = ``lengths[b]``). Column 0 (nothing heads ROOT), the
diagonal and every entry beyond n are ignored: ``arcs`` replaces them with a true ``-inf`` (never
mutating the caller's tensor), so marginals and gradients are exactly 0 there.

A structure (a *value*) is a head vector ``[*S, B, N+1]``: ``heads[..., b, m]`` is the head of
word m for ``1 <= m <= n``; index 0 and padding hold -1 (any value there is ignored on input).
The statistics φ(heads) are the one-hot arc indicators ``[*S, B, N+1, N+1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.structures.autograd import AbstractAutogradStructure
from structift.structures.base import AbstractStructure, Params

__all__ = ["TreeSpace", "check_trees", "is_projective"]

_NEG_INF = float("-inf")


def is_projective(heads: Tensor, lengths: Tensor) -> Tensor:
    """Whether no two arcs cross: BoolTensor ``[*S, B]`` for heads ``[*S, B, N+1]``.

    Arcs (h, m) and (h', m') cross iff exactly one endpoint of one lies strictly inside the
    other's span; O(n²) per tree.
    """
    N1 = heads.shape[-1]
    pos = torch.arange(N1, device=heads.device)
    valid = (pos >= 1) & lengths_to_mask(lengths + 1, N1)  # shape: (B, N+1)
    h = torch.where(valid, heads, pos)
    lo, hi = torch.minimum(h, pos), torch.maximum(h, pos)  # shape: (*S, B, N+1)
    a, b = lo[..., :, None], hi[..., :, None]
    c, d = lo[..., None, :], hi[..., None, :]
    cross = (a < c) & (c < b) & (b < d)
    both = valid[..., :, None] & valid[..., None, :]
    return ~(cross & both).flatten(-2).any(-1)


def check_trees(
    name: str, heads: Tensor, lengths: Tensor, projective: bool, multi_root: bool
) -> None:
    """Raise ``ValueError`` naming ``name`` unless every head vector is a tree of the space.

    Checks (at the valid positions 1..n): heads in ``[0, n]``, no self-loop, no cycle (every
    word reaches ROOT: n rounds of pointer jumping), exactly one word on ROOT unless
    ``multi_root``, no crossing arcs if ``projective``.
    """
    N1 = heads.shape[-1]
    pos = torch.arange(N1, device=heads.device)
    valid = (pos >= 1) & lengths_to_mask(lengths + 1, N1)
    bad = valid & ((heads < 0) | (heads > lengths[:, None]) | (heads == pos))
    if bool(bad.any()):
        i = tuple(int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{i}] = {int(heads[i])} is not a head of word {i[-1]}: heads must lie in "
            f"[0, n] (0 = ROOT, n = lengths[b] words) and differ from the word itself."
        )
    node = torch.where(valid, heads, 0)
    for _ in range(max(N1 - 1, 0).bit_length() + 1):  # pointer jumping: 2^r ancestors
        node = torch.gather(node, -1, node)
    cyclic = (valid & (node != 0)).any(-1)
    if bool(cyclic.any()):
        i = tuple(int(x) for x in cyclic.nonzero()[0])
        raise ValueError(f"{name}[{i}] is not a tree: its heads contain a cycle.")
    roots = (valid & (heads == 0)).sum(-1)
    if not multi_root and bool((roots != 1).any()):
        i = tuple(int(x) for x in (roots != 1).nonzero()[0])
        raise ValueError(
            f"{name}[{i}] has {int(roots[i])} words on ROOT; this distribution has exactly one "
            "(multi_root=False). Build it with multi_root=True to allow several."
        )
    if projective:
        crossing = ~is_projective(heads, lengths)
        if bool(crossing.any()):
            i = tuple(int(x) for x in crossing.nonzero()[0])
            raise ValueError(
                f"{name}[{i}] is not projective (two arcs cross) but the distribution is over "
                "projective trees (projective=True)."
            )


class TreeSpace(AbstractAutogradStructure):
    """Dependency trees ``[B, N+1]`` within ``lengths`` (module docstring).

    Subclasses implement the algorithms; this class owns the sample space: masking of the
    ignored scores, scores and statistics of head vectors, value checks, the centring used by
    entropy and KL, and ``same_space``.

    Args:
        lengths: LongTensor ``[B]``, the number of words n per element (``1 <= n <= N``).
        num_words: N.
        multi_root: allow several words on ROOT.
    """

    projective: bool = False
    padding_value = -1

    def __init__(self, lengths: Tensor, num_words: int, multi_root: bool) -> None:
        self.lengths, self.num_words, self.multi_root = lengths, num_words, multi_root

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size(self.lengths.shape)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size((self.num_words + 1,))

    def same_space(self, other: AbstractStructure) -> bool:
        if type(other) is not type(self):
            return False
        assert isinstance(other, TreeSpace)
        if (other.num_words, other.multi_root) != (self.num_words, self.multi_root):
            return False
        return other.lengths.shape == self.lengths.shape and bool(
            (other.lengths == self.lengths).all()
        )

    def describe(self) -> str:
        kind = "projective" if self.projective else "non-projective"
        root = "multi-root" if self.multi_root else "single-root"
        return f"{kind} {root} trees(N={self.num_words}, lengths={tuple(self.lengths.tolist())})"

    def word_mask(self) -> Tensor:
        """BoolTensor ``[B, N+1]``, True at the words 1..n."""
        pos = torch.arange(self.num_words + 1, device=self.lengths.device)
        return (pos >= 1) & lengths_to_mask(self.lengths + 1, self.num_words + 1)

    def arc_mask(self) -> Tensor:
        """BoolTensor ``[B, N+1, N+1]``, True at the arcs (h, m) that exist (h != m, m a word)."""
        word = self.word_mask()
        head = word.clone()
        head[:, 0] = True
        eye = torch.eye(self.num_words + 1, dtype=torch.bool, device=word.device)
        return head[:, :, None] & word[:, None, :] & ~eye

    def arcs(self, theta: Params) -> Tensor:
        """The arc scores with every ignored entry set to ``-inf`` (a new tensor)."""
        return torch.where(self.arc_mask(), theta[0], _NEG_INF)

    def _centre(self, theta: Params) -> Params:
        """Subtract each word's best head score (every word has exactly one head: p unchanged)."""
        arcs = self.arcs(theta)
        best = arcs.detach().amax(-2, keepdim=True)
        return (arcs - torch.where(torch.isfinite(best), best, 0.0),)

    def _heads(self, value: Tensor) -> Tensor:
        """Heads with padding replaced by 0 (safe to gather), same shape."""
        return torch.where(self.word_mask(), value, 0)

    def score(self, theta: Params, value: Tensor) -> Tensor:
        arcs = self.arcs(theta)  # shape: (B, N+1, N+1)
        heads = self._heads(value)  # shape: (*S, B, N+1)
        picked = torch.gather(arcs.expand(*heads.shape, -1), -2, heads[..., None, :])[..., 0, :]
        return torch.where(self.word_mask(), picked, 0.0).sum(-1)

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        heads = self._heads(value)
        onehot = torch.nn.functional.one_hot(heads, self.num_words + 1).to(dtype)
        onehot = onehot * self.word_mask()[..., None].to(dtype)  # shape: (*S, B, N+1 m, N+1 h)
        return (onehot.transpose(-1, -2),)

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        from structift._checks import check_index_tensor

        B, N1 = self.lengths.shape[0], self.num_words + 1
        check_index_tensor(name, value, (B, N1), N1, device, self.word_mask())
        check_trees(name, value, self.lengths, self.projective, self.multi_root)
