r"""``NonProjectiveTrees``: non-projective dependency trees by the matrix-tree theorem.

The distribution p(y) ∝ exp Σ_{(h, m) ∈ y} arc_scores[h, m] over every spanning arborescence y
of n words rooted at ROOT = 0, single-root (exactly one word on ROOT; Koo et al. 2007,
Zmigrod, Vieira & Cotterell 2020, arXiv:2010.02550) or multi-root.

* A(θ) = log det L̂ (Koo et al. 2007; Smith & Smith 2007; McDonald & Satta 2007): O(B n³),
  batched over B through ``torch.linalg`` (``_matrix_tree``); differentiable to any order.
* μ: in closed form from L̂⁻¹ (Koo et al. 2007, §3.2), O(B n³), no autograd graph;
  ``log_partition``'s first derivative is the same closed form.
* ``argmax``: Chu–Liu–Edmonds with the single-root procedure of Zmigrod et al. (2020)
  (``_mst``; numpy, a Python loop over the batch on the CPU), O(n³) per tree typically.
* ``sample``: exact, by sequential conditioning: draw word m's head from its marginal under the
  distribution conditioned on the heads drawn so far (their columns forced to one head), for
  m = 1..n: n posteriors, O(S B n⁴).
* ``topk``: k = 1 only (the k-best arborescence algorithms of Camerini et al. 1980 and
  Zmigrod et al. 2021 are not implemented): a ``ValueError`` for k > 1.

Float32 strategy. Each modifier column is centred by its best head score (every tree shifts by
the same Σ_m c_m, added back), so the weights lie in [0, 1] with a 1 in every column; the
Laplacian is built, factorized (pivoted LU) and inverted in float64 whatever the input dtype.
That is accurate while the Laplacian is well conditioned, which an upper bound on its 1-norm
condition number κ₁ (from the inverse, computed anyway, and a bound on ‖L̂‖₁ from the arc
in-weights) certifies: the fast path is kept where κ₁ ≤ 1e8 (inputs
below float64) or κ₁ ≤ 1e5 (float64 inputs), bounding the relative error of Z near
n κ₁ ε₆₄ ≤ 1e-6 resp. 1e-9. Elsewhere (peaked scores whose best heads form a cycle: the
determinant is a cancellation of O(1) terms, or underflows to an exactly singular matrix for
score gaps above ~745) those elements go to the subtraction-free log-domain elimination
(``_matrix_tree.log_arborescences``: full relative accuracy and unlimited range, O(n³) steps,
O(n⁴) for a single root), and their marginals are its autograd gradient. Marginals are
clamped to [0, 1] (the clamp only removes rounding). So marginals stay in [0, 1] with every
word's column summing to 1 to rounding, in float32, for arc scores up to 1e4 and beyond
(torch-struct's ``NonProjectiveDependencyCRF`` exponentiates raw scores in the input dtype
and breaks for scores above ~1 there, its issue #61).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from structift.structures.base import Params
from structift.structures.tree import _matrix_tree
from structift.structures.tree._mst import mst
from structift.structures.tree.space import TreeSpace

__all__ = ["NonProjectiveTrees"]

_NEG_INF = float("-inf")

# The largest κ₁(L̂) for which the fast LU path is trusted, by input dtype (module docstring).
_MAX_CONDITION = {torch.float64: 1e5}
_DEFAULT_MAX_CONDITION = 1e8


def _limit(dtype: torch.dtype) -> float:
    return _MAX_CONDITION.get(dtype, _DEFAULT_MAX_CONDITION)


class _LogPartition(torch.autograd.Function):
    """A(arcs) with the closed-form gradient μ; higher orders through the graph program."""

    @staticmethod
    def forward(ctx, arcs: Tensor, structure: NonProjectiveTrees) -> Tensor:
        log_z, mu = structure._fast_posterior(arcs)
        ctx.structure = structure
        ctx.save_for_backward(arcs, mu)
        return log_z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        arcs, mu = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the twice-differentiable A
            with torch.enable_grad():
                log_z = ctx.structure._log_partition_graph((arcs,))
                (g,) = torch.autograd.grad(log_z, arcs, grad, create_graph=True)
            return g, None
        return grad[:, None, None] * mu, None


class NonProjectiveTrees(TreeSpace):
    """Non-projective dependency trees ``[B, N+1]`` within ``lengths`` (module docstring).

    θ = (arc_scores ``[B, N+1, N+1]``,) laid out ``[h, m]`` (``TreeSpace``).

    Ties. ``argmax`` returns one best tree: each word first takes its lowest-index best head,
    and among equal root-arc losses the lowest word gives up ROOT (``_mst``).

    Args:
        lengths: LongTensor ``[B]``, the number of words n per element (``1 <= n <= N``).
        num_words: N.
        multi_root: allow several words on ROOT.
    """

    projective = False

    # ---- the matrix-tree theorem -----------------------------------------------------------

    def _centred64(self, theta: Params) -> tuple[Tensor, Tensor]:
        """``(log w [B, N+1, N+1] float64, shift [B])``: columns centred by their best head."""
        arcs = self.arcs(theta).double()
        best = arcs.detach().amax(-2, keepdim=True)
        best = torch.where(torch.isfinite(best), best, 0.0)
        return arcs - best, best.sum((-1, -2))

    def _robust_log_z(self, log_w: Tensor, word: Tensor) -> Tensor:
        """Log-domain elimination of the centred log-weights (no shift), ``[B']``."""
        if not self.multi_root:
            return _matrix_tree.log_single_root(log_w, word)
        pad = torch.zeros_like(word)
        pad[:, 1:] = ~word[:, 1:]
        root = torch.zeros_like(log_w, dtype=torch.bool)
        root[:, 0, :] = pad  # padded words hang from ROOT with weight 1
        return _matrix_tree.log_arborescences(torch.where(root, 0.0, log_w))

    def _log_partition_graph(self, theta: Params) -> Tensor:
        """log det L̂ (fast, LU) or the log-domain elimination (robust), per element."""
        log_w, shift = self._centred64(theta)
        word = self.word_mask()
        w = log_w.exp()
        lap, norm = _matrix_tree.laplacian(w, word, self.multi_root)
        with torch.no_grad():
            inverse, info = torch.linalg.inv_ex(lap.detach())
            ok = _matrix_tree.certified(info, norm, inverse, _limit(theta[0].dtype))
        eye = torch.eye(lap.shape[-1], dtype=lap.dtype, device=lap.device)
        sign, fast = torch.linalg.slogdet(torch.where(ok[:, None, None], lap, eye))
        ok = ok & (sign > 0)
        out = torch.where(ok, fast, 0.0)
        if not bool(ok.all()):
            bad = (~ok).nonzero()[:, 0]
            robust = self._robust_log_z(log_w[bad], word[bad])
            out = out.index_put((bad,), robust)
        return (out + shift).to(theta[0].dtype)

    def _fast_posterior(self, arcs: Tensor) -> tuple[Tensor, Tensor]:
        """``(A [B], μ [B, N+1, N+1])`` without a graph, in the dtype of ``arcs``.

        ``arcs`` must already be masked (``self.arcs``: ``-inf`` at every ignored arc). One
        pivoted LU and the inverse from it in float64; the O(B n²) work around them reuses
        its buffers in place (``benchmarks/structures.py`` times the LAPACK floor beside it).
        """
        with torch.no_grad():
            a = arcs.detach().to(torch.float64, copy=True)  # overwritten below
            best = a.amax(-2, keepdim=True)
            best.masked_fill_(best == _NEG_INF, 0.0)  # columns without heads (padding)
            shift = best.sum((-1, -2))
            w = a.sub_(best).exp_()
            word = self.word_mask()
            lap, norm = _matrix_tree.laplacian(w, word, self.multi_root)
            LU, pivots, info = torch.linalg.lu_factor_ex(lap)
            diag = torch.diagonal(LU, dim1=-2, dim2=-1)
            steps = torch.arange(1, pivots.shape[-1] + 1, device=pivots.device)
            odd = (pivots != steps).sum(-1) % 2 == 1
            positive = (diag < 0).sum(-1) % 2 == odd.long()  # sign of det L̂ is +1
            log_z = diag.abs().log().sum(-1)
            eye = torch.eye(lap.shape[-1], dtype=lap.dtype, device=lap.device)
            inverse = torch.linalg.lu_solve(LU, pivots, eye.expand_as(lap))
            ok = positive & _matrix_tree.certified(info, norm, inverse, _limit(arcs.dtype))
            mu = _matrix_tree.arc_marginals_(w, inverse, self.multi_root)  # overwrites w
            if not bool(ok.all()):
                bad = (~ok).nonzero()[:, 0]
                log_w = arcs[bad].detach().double() - best[bad]
                with torch.enable_grad():
                    leaf = log_w.requires_grad_()
                    robust = self._robust_log_z(leaf, word[bad])
                    (grad,) = torch.autograd.grad(robust.sum(), leaf)
                log_z = log_z.index_put((bad,), robust.detach())
                grad = torch.where(torch.isfinite(robust)[:, None, None], grad, 0.0)
                mu = mu.index_put((bad,), grad.nan_to_num(0.0))
            mu = mu.clamp_(0.0, 1.0)  # the clamp: rounding only
        return (log_z + shift).to(arcs.dtype), mu.to(arcs.dtype)

    def log_partition(self, theta: Params) -> Tensor:
        """A(θ) ``[B]``; its gradient is the closed-form μ, higher orders through the graph."""
        return _LogPartition.apply(self.arcs(theta), self)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        """``(A, μ)`` from L̂⁻¹ in O(B n³) (autograd through A when ``create_graph``)."""
        if create_graph:
            return super().posterior(theta, create_graph=True)
        log_z, mu = self._fast_posterior(self.arcs(theta))
        return log_z, (mu,)

    # ---- structures ------------------------------------------------------------------------

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        """Chu–Liu–Edmonds with one root (Zmigrod et al. 2020) per element, CPU (``_mst``)."""
        arcs = self.arcs(theta).detach().double().cpu().numpy()
        lengths = self.lengths.tolist()
        out = np.full((len(lengths), self.num_words + 1), -1, dtype=np.int64)
        for b, n in enumerate(lengths):
            out[b, : n + 1] = mst(arcs[b], n, not self.multi_root)
            out[b, 0] = -1
        heads = torch.from_numpy(out).to(theta[0].device)
        return heads, self.score(theta, heads)

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """k = 1: ``argmax``; k > 1 raises ``ValueError`` (module docstring)."""
        if k != 1:
            raise ValueError(
                f"topk: k = {k} is not supported for non-projective trees: only k = 1 (the "
                "MAP tree) is (the k-best spanning-arborescence algorithms of Camerini et al. "
                "1980 / Zmigrod et al. 2021 are not implemented). Use argmax, or "
                "projective=True for exact k-best trees."
            )
        heads, score = self.argmax(theta)
        return heads[None], score[None]

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        """Exact samples by sequential conditioning on the marginals: O(S B n⁴) (module doc)."""
        S = 1
        for s in sample_shape:
            S *= int(s)
        B, N1 = self.lengths.shape[0], self.num_words + 1
        arcs = self.arcs(theta).detach()
        device = arcs.device
        cur = arcs.double()[None].expand(S, B, N1, N1).reshape(S * B, N1, N1)
        lengths = self.lengths.repeat(S)
        space = NonProjectiveTrees(lengths, self.num_words, self.multi_root)
        heads = torch.full((S * B, N1), -1, dtype=torch.long, device=device)
        pos = torch.arange(N1, device=device)
        for m in range(1, N1):
            active = lengths >= m
            if S * B == 0 or not bool(active.any()):
                break
            _, mu = space._fast_posterior(cur)
            probs = mu[:, :, m]  # shape: (S B, N+1) p(head of m = h | heads so far)
            cdf = probs.cumsum(-1)
            u = torch.rand(S * B, 1, generator=generator, dtype=cdf.dtype, device=device)
            h = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_max(N1 - 1)
            h = torch.where(active, h, -1)
            heads[:, m] = h
            force = active[:, None] & (pos != h[:, None])  # shape: (S B, N+1) heads ruled out
            cur = cur.clone()
            cur[:, :, m] = torch.where(force, _NEG_INF, cur[:, :, m])
        return heads.reshape(*sample_shape, B, N1)
