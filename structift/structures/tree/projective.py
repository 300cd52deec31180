r"""``ProjectiveTrees``: projective dependency trees by Eisner's algorithm.

The distribution p(y) ∝ exp Σ_{(h, m) ∈ y} arc_scores[h, m] over the projective trees y of n
words (no two arcs cross; ROOT = 0 at the left end), single-root (exactly one word on ROOT;
Koo et al. 2007, Zmigrod et al. 2020, arXiv:2010.02550) or multi-root. Everything is one
chart (``_eisner``), O(n³) time and O(n²) chart memory per tree:

* A(θ): Eisner's inside algorithm in the log semiring (``_log_partition_graph``, twice
  differentiable). ``log_partition``'s first derivative and ``posterior`` run the outside pass
  explicitly instead (inside-outside: the inside pass keeps each candidate's share, O(n³)
  floats, and the outside pass divides every item's marginal among its derivations; no
  per-step autograd graph); second derivatives go through the graph program.
* ``argmax``/``topk``: the same chart in the k-best max-plus semiring (Huang & Chiang 2005,
  "Better k-best parsing", algorithm 1: the k best items per cell with back-pointers,
  O(k² log k · n³)); ``sample``: top-down sampling of the splits from the inside chart,
  O(n³ + S n²).

Single-root trees run the chart over the words alone and add ROOT once at the top
(⊕_m arcs[0, m] ⊗ C_L(1, m) ⊗ C_R(m, n)), so ROOT takes exactly one child by construction.

Numerics: the chart runs on ``_centre``'s arcs (each word's best head score subtracted, which
shifts every tree by the same constant, added back to A), so chart entries are log-sums of
scores ≤ 0 whatever the size of the arc scores, with a true ``-inf`` zero. Marginals are
products of logsumexp shares, each in [0, 1]; each word's column is divided by its sum (every
word has exactly one head), so in float32 too the marginals lie in [0, 1] and sum to 1 per word
to rounding, for arc scores up to 1e4 and beyond (torch-struct's issue #61 reports marginals
above 1 for large scores).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.structures.base import Params
from structift.structures.tree import _eisner, _eisner_paths
from structift.structures.tree.space import TreeSpace

__all__ = ["ProjectiveTrees"]


class _LogPartition(torch.autograd.Function):
    """A(arcs) with the inside-outside gradient; higher orders through the graph program."""

    @staticmethod
    def forward(ctx, arcs: Tensor, structure: ProjectiveTrees) -> Tensor:
        log_z, chart, centred = structure._inside(arcs)
        ctx.structure, ctx.chart, ctx.centred = structure, chart, centred
        ctx.save_for_backward(arcs)
        return log_z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (arcs,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the twice-differentiable A
            with torch.enable_grad():
                log_z = ctx.structure._log_partition_graph((arcs,))
                (g,) = torch.autograd.grad(log_z, arcs, grad, create_graph=True)
            return g, None
        ones = torch.ones_like(grad)  # seeds of 1 (the marginals), scaled by grad after
        mu = ctx.structure._outside(ctx.centred, ctx.chart, ones)
        return mu * grad[:, None, None], None


class ProjectiveTrees(TreeSpace):
    """Projective dependency trees ``[B, N+1]`` within ``lengths`` (module docstring).

    θ = (arc_scores ``[B, N+1, N+1]``,) laid out ``[h, m]`` (``TreeSpace``).

    Ties. ``argmax`` and ``topk`` rank derivations; among trees of equal score the one whose
    derivation, read top-down, picks the smaller split point first comes first (at every
    chart item the split offset, then the left child's rank, then the right child's; for
    single-root trees the leftmost root word first). Ranks beyond the number of finite-score
    trees are not trees: score ``-inf`` and head -1 at every position.

    Args:
        lengths: LongTensor ``[B]``, the number of words n per element (``1 <= n <= N``).
        num_words: N.
        multi_root: allow several words on ROOT.
    """

    projective = True

    # ---- the chart -------------------------------------------------------------------------

    def _centred(self, theta: Params) -> tuple[Tensor, Tensor]:
        """``(centred arcs [B, N+1, N+1], the shift [B] added back to A)``."""
        (centred,) = self._centre(theta)
        best = self.arcs(theta).detach().amax(-2)
        shift = torch.where(torch.isfinite(best), best, 0.0).sum(-1)
        return centred, shift

    def _top(self, arcs: Tensor, reduce: _eisner.Reduce, R: int):
        """``(chart, (top values [B, R], root pointers or None))`` of the centred ``arcs``."""
        lengths = self.lengths.to(arcs.device)
        if self.multi_root:
            chart = _eisner.inside(arcs, reduce, R)
            return chart, (_eisner.complete(chart, lengths), None)
        chart = _eisner.inside(arcs[:, 1:, 1:], reduce, R)
        return chart, _eisner.roots(chart, arcs[:, 0, 1:], lengths, reduce)

    def _log_partition_graph(self, theta: Params) -> Tensor:
        """Eisner's inside algorithm in the log semiring: O(B n³) time, O(B n³) graph."""
        centred, shift = self._centred(theta)
        _, (top, _) = self._top(centred, _eisner.lse_reduce, 1)
        return top[:, 0] + shift

    def _inside(self, arcs: Tensor) -> tuple[Tensor, _eisner.Chart, Tensor]:
        """``(A, chart, centred arcs)`` without a graph."""
        with torch.no_grad():
            centred, shift = self._centred((arcs,))
            chart, (top, _) = self._top(centred, _eisner.lse_shares_reduce, 1)
        return top[:, 0] + shift, chart, centred

    def _outside(self, centred: Tensor, chart: _eisner.Chart, seed: Tensor) -> Tensor:
        """``seed[b] · μ[b]`` ``[B, N+1, N+1]`` by the outside pass (no graph), seeds 0 or 1.

        Every word has exactly one head, so each column of μ sums to 1; the outside pass meets
        that to ~ depth · eps · |chart| (the chart's log-values grow with n |θ|), and dividing
        each column by its sum restores it to rounding (normalised per position, as the
        chains' marginals are) without moving any entry by more than that error.
        """
        lengths = self.lengths.to(centred.device)
        with torch.no_grad():
            if self.multi_root:
                mu, _ = _eisner.outside(chart, seed, lengths, None)
            else:
                words, root = _eisner.outside(chart, seed, lengths, centred[:, 0, 1:])
                assert root is not None
                top = torch.cat([torch.zeros_like(root[:, :1]), root], 1)[:, None]
                left = torch.zeros_like(words[:, :, :1])
                mu = torch.cat([top, torch.cat([left, words], 2)], 1)
            total = mu.sum(-2, keepdim=True)  # shape: (B, 1, N+1)
            return torch.where(total > 0, mu / total.where(total > 0, 1.0), 0.0)

    # ---- A(θ) and μ ------------------------------------------------------------------------

    def log_partition(self, theta: Params) -> Tensor:
        """A(θ) ``[B]``: the inside pass; its gradient is the outside pass (any order)."""
        return _LogPartition.apply(self.arcs(theta), self)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        """``(A, μ)`` by inside-outside in O(B n³) (autograd through A when ``create_graph``)."""
        if create_graph:
            return super().posterior(theta, create_graph=True)
        log_z, chart, centred = self._inside(theta[0].detach())
        feasible = torch.isfinite(log_z)
        mu = self._outside(centred, chart, feasible.to(log_z.dtype))
        return log_z, (mu,)

    # ---- structures ------------------------------------------------------------------------

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """The k best trees by the k-best Eisner chart, O(k² log k · B n³) (class docstring).

        k = 1 backtracks by a top-down pass over the widths (``_eisner.backtrack``); k > 1
        walks the derivations level by level (``_eisner_paths.decode``).
        """
        with torch.no_grad():
            centred, _ = self._centred(theta)
            chart, top = self._top(centred, _eisner.kbest_reduce(k), k)
            lengths = self.lengths.to(centred.device)
            exists = torch.isfinite(top[0]).T  # shape: (k, B)
            if k == 1:
                heads = self._heads_of(chart, top, lengths, exists[0])[None]
            else:
                heads = _eisner_paths.decode(chart, top, lengths, self.num_words, self.multi_root)
        scores = self.score(theta, torch.where(exists[..., None], heads, 0))
        return heads, torch.where(exists, scores, float("-inf"))

    def _heads_of(self, chart, top, lengths: Tensor, exists: Tensor) -> Tensor:
        """The heads ``[B, N+1]`` of a 1-best chart (-1 at 0, padding, and missing trees)."""
        root = None if self.multi_root else top[1][:, 0]
        arcs = _eisner.backtrack(chart, lengths, root, exists)  # shape: (B, M, M)
        has = arcs.amax(1) > 0  # shape: (B, M)
        heads = torch.where(has, arcs.argmax(1), -1)
        if self.multi_root:
            return heads
        words = torch.where(has, heads + 1, -1)
        b = torch.arange(words.shape[0], device=words.device)
        words[b, root] = torch.where(exists, 0, -1)
        return torch.cat([torch.full_like(words[:, :1], -1), words], 1)

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        """Eisner-Viterbi (``topk`` with k = 1): O(B n³), ties as in the class docstring."""
        heads, scores = self.topk(theta, 1)
        return heads[0], scores[0]

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        """Exact samples by top-down sampling from the inside chart: O(B n³ + S B n²)."""
        S = 1
        for s in sample_shape:
            S *= int(s)
        with torch.no_grad():
            centred, _ = self._centred(theta)
            chart, _ = self._top(centred, _eisner.lse_reduce, 1)
            root = None if self.multi_root else centred[:, 0, 1:]
            lengths = self.lengths.to(centred.device)
            heads = _eisner_paths.sample(chart, root, lengths, self.num_words, S, generator)
        return heads.reshape(*sample_shape, *heads.shape[1:])
