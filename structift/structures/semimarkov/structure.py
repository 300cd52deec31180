r"""``SemiMarkov``: labelled segmentations of ``L = lengths[b]`` positions into segments.

θ = (scores ``[B, N-1, K, C, C]``,): ``scores[b, s, k, a, c]`` scores a segment of k steps from
boundary s to s + k (``1 <= k <= K-1``) labelled c, following a segment (or the initial label)
a — torch-struct's layout with the label pair laid out ``[from, to]``. Entries with k = 0 or
``s + k > L - 1`` are ignored: ``masked`` replaces them by a true ``-inf`` in a new tensor (the
caller's is never touched), so their marginals and gradients are exactly 0.

A structure (a *value*) is a LongTensor ``[*S, B, N]`` in torch-struct's encoding:
``value[..., 0]`` is the initial label, each segment's label sits at its end position, and
positions inside a segment hold -1; positions ``t >= L`` are padding (-1 on output, ignored on
input). With L = 1 there is no segment: the C structures ``[c, -1, ...]`` have score 0.
φ(value) is the one-hot indicator of its segments ``(s, k, a, c)`` in θ's layout.

Algorithms (``_dp``, ``_decode``): A(θ) and the marginals by an O(N·K·C²) forward-backward in
float64; ``_log_partition_graph`` is the same forward recursion as one twice-differentiable
torch program (the Hessian-vector products and the differentiable marginals come from it);
exact k-best Viterbi (argmax is its k = 1); FFBS sampling; entropy and KL as sums of
non-negative local terms of the Markov chain over ``(boundary, label)`` states.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, logsumexp
from structift.structures.autograd import AbstractAutogradStructure
from structift.structures.base import AbstractStructure, Params
from structift.structures.semimarkov import _decode, _dp
from structift.structures.semimarkov.check import check_segmentations

__all__ = ["SemiMarkov"]

_NEG_INF = float("-inf")


class _LogPartition(torch.autograd.Function):
    """A(θ) by the float64 forward pass; backward = the marginals of one forward-backward.

    A double backward (``create_graph=True``) differentiates ``_log_partition_graph`` instead,
    the reference program, so A stays differentiable to any order.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, structure: SemiMarkov) -> Tensor:
        ctx.structure = structure
        ctx.save_for_backward(scores)
        with torch.no_grad():
            ms = structure.masked((scores,))
            ends = _dp.by_end(ms, structure.num_positions)
            alpha = _dp.forward(ends, graph=False)
            rows = torch.arange(alpha.shape[0], device=alpha.device)
            log_z = torch.logsumexp(alpha[rows, structure.lengths - 1], -1)
        return log_z.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (scores,) = ctx.saved_tensors
        structure: SemiMarkov = ctx.structure
        if torch.is_grad_enabled():
            with torch.enable_grad():
                log_z = structure._log_partition_graph((scores,))
                (mu,) = torch.autograd.grad(log_z, scores, grad, create_graph=True)
            return mu, None
        _, (mu,) = structure.posterior((scores,))
        return grad.reshape(-1, 1, 1, 1, 1) * mu, None


class SemiMarkov(AbstractAutogradStructure):
    """Labelled segmentations ``[B, N]`` within ``lengths`` (module docstring).

    Complexity per batch element: A, marginals, entropy, KL O(N K C²) time, O(N K C²) memory
    (the marginals themselves); ``topk`` O(N K C² k log(K C k)); ``sample`` O(N K C²) plus
    O(N K C) per sample.

    Args:
        lengths: LongTensor ``[B]``, the number of positions L per element (``1 <= L <= N``).
        num_positions: N.
        max_segment: K (segments have 1..K-1 steps; the size of θ's segment dimension).
        num_labels: C.
    """

    padding_value = -1

    def __init__(self, lengths: Tensor, num_positions: int, max_segment: int, num_labels: int):
        self.lengths = lengths
        self.num_positions, self.max_segment, self.num_labels = (
            num_positions,
            max_segment,
            num_labels,
        )

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size(self.lengths.shape)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size((self.num_positions,))

    def same_space(self, other: AbstractStructure) -> bool:
        if type(other) is not type(self):
            return False
        assert isinstance(other, SemiMarkov)
        dims = (other.num_positions, other.max_segment, other.num_labels)
        if dims != (self.num_positions, self.max_segment, self.num_labels):
            return False
        return other.lengths.shape == self.lengths.shape and bool(
            (other.lengths == self.lengths).all()
        )

    def describe(self) -> str:
        return (
            f"semi-Markov segmentations(N={self.num_positions}, K={self.max_segment}, "
            f"C={self.num_labels}, lengths={tuple(self.lengths.tolist())})"
        )

    # ---- the sample space ------------------------------------------------------------------

    def segment_mask(self) -> Tensor:
        """BoolTensor ``[B, N-1, K]``: True where segment ``(s, k)`` exists (k >= 1, s+k <= L-1)."""
        device = self.lengths.device
        s = torch.arange(self.num_positions - 1, device=device)[:, None]
        k = torch.arange(self.max_segment, device=device)
        end = s + k  # shape: (N-1, K)
        return (k >= 1) & (end[None] <= (self.lengths - 1)[:, None, None])

    def masked(self, theta: Params, dtype: torch.dtype = _dp.WORK) -> Tensor:
        """The scores in ``dtype`` with every ignored entry ``-inf`` (a new tensor)."""
        keep = self.segment_mask()[..., None, None]
        return torch.where(keep, theta[0].to(dtype), _NEG_INF)

    # ---- A(θ) and its derivatives ----------------------------------------------------------

    def _log_partition_graph(self, theta: Params) -> Tensor:
        """A(θ): the forward recursion (``_dp``) as plain autograd ops, O(N K C²)."""
        ms = self.masked(theta)
        alpha = _dp.forward(_dp.by_end(ms, self.num_positions), graph=True)  # shape: (B, N, C)
        rows = torch.arange(alpha.shape[0], device=alpha.device)
        log_z = logsumexp(alpha[rows, self.lengths - 1], -1)
        if self.num_positions == 1:  # no segments: keep the (empty) autograd edge to θ
            log_z = log_z + ms.sum()
        return log_z.to(theta[0].dtype)

    def log_partition(self, theta: Params) -> Tensor:
        return _LogPartition.apply(theta[0], self)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        """``(A, μ)``; without ``create_graph`` one float64 forward-backward (no graph)."""
        if create_graph:
            return super().posterior(theta, create_graph=True)
        with torch.no_grad():
            log_z, mu, _, _ = _dp.posterior(self.masked(theta), self.lengths)
        dtype = theta[0].dtype
        return log_z.to(dtype), (mu.to(dtype),)

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        """H(p) as a sum of non-negative local terms (``_dp.entropy``)."""
        return _dp.entropy(self.masked(theta), self.lengths).to(theta[0].dtype)

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        """KL(p ‖ q) as a sum of non-negative local terms; ``+inf`` if q forbids p."""
        ms_p, ms_q = self.masked(theta_p), self.masked(theta_q)
        return _dp.kl(ms_p, ms_q, self.lengths).to(theta_p[0].dtype)

    # ---- structures --------------------------------------------------------------------------

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """The k best segmentations, best first (tie rule and missing ranks: ``_decode``)."""
        values, exists = _decode.topk_values(self.masked(theta), self.lengths, k)
        scores = torch.stack([self.score(theta, values[r]) for r in range(k)])
        scores = torch.where(exists, scores, _NEG_INF)
        # Recomputed scores may differ from the recursion's by rounding: re-sort stably.
        order = torch.sort(scores.detach(), dim=0, descending=True, stable=True).indices
        return values.gather(0, order[:, :, None].expand_as(values)), scores.gather(0, order)

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        """The Viterbi segmentation ``[B, N]`` and its score: ``topk`` with k = 1."""
        values, scores = self.topk(theta, 1)
        return values[0], scores[0]

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        return _decode.sample(self.masked(theta), self.lengths, sample_shape, generator)

    def _segments(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """``(flat index into θ's event [*S, B, N], is-a-segment-end [*S, B, N])``.

        Position t >= 1 inside the length with a label ends the segment from the previous
        labelled position s (``k = t - s``, labels ``value[s] -> value[t]``).
        """
        N, K, C = self.num_positions, self.max_segment, self.num_labels
        pos = torch.arange(N, device=value.device)
        inside = lengths_to_mask(self.lengths, N)  # shape: (B, N)
        labelled = inside & (value >= 0)
        end = labelled & (pos >= 1)
        marks = torch.where(labelled, pos, -1)
        last = torch.cummax(marks, -1).values  # latest labelled position <= t
        start = torch.cat([torch.zeros_like(last[..., :1]), last[..., :-1]], -1).clamp_min(0)
        k = (pos - start).clamp(0, K - 1)
        a = torch.gather(value, -1, start).clamp(0, C - 1)
        c = value.clamp(0, C - 1)
        s = start.clamp(0, max(N - 2, 0))
        return ((s * K + k) * C + a) * C + c, end

    def score(self, theta: Params, value: Tensor) -> Tensor:
        B = self.lengths.shape[0]
        flat = theta[0].flatten(1)
        if flat.shape[-1] == 0:  # N = 1: no segments, every structure scores 0
            return theta[0].new_zeros(value.shape[:-1])
        index, end = self._segments(value)
        rows = torch.arange(B, device=value.device)[:, None]
        picked = flat[rows, index]  # shape: (*S, B, N)
        return torch.where(end, picked, 0.0).sum(-1)

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        N, K, C = self.num_positions, self.max_segment, self.num_labels
        index, end = self._segments(value)
        out = torch.zeros(*value.shape[:-1], (N - 1) * K * C * C, dtype=dtype, device=value.device)
        if out.shape[-1]:
            out.scatter_add_(-1, index, end.to(dtype))
        return (out.reshape(*value.shape[:-1], N - 1, K, C, C),)

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        check_segmentations(
            name, value, self.lengths, self.num_positions, self.max_segment, self.num_labels, device
        )
