"""Semi-Markov (segmental) conditional random fields as an exponential family."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import constraints

from structift._checks import (
    LOG_POTENTIAL,
    check_expand_shape,
    check_float_tensor,
    check_lengths,
    check_log_potential,
)
from structift.families.base import ExpFamily, _resolve_validate
from structift.structures.semimarkov import SemiMarkov

__all__ = ["SemiMarkovCRF"]


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 5 or scores.shape[3] != scores.shape[4]:
        raise ValueError(
            "scores must have shape [B, N-1, K, C, C] (batch, segment start, segment length, "
            f"label from, label to); got shape {tuple(scores.shape)}."
        )
    if scores.shape[2] < 2 or scores.shape[3] < 1:
        raise ValueError(
            "scores must have shape [B, N-1, K, C, C] with K >= 2 (segments of 1..K-1 steps) "
            f"and C >= 1 labels; got shape {tuple(scores.shape)}."
        )


class SemiMarkovCRF(ExpFamily):
    """A semi-Markov CRF: a distribution over labelled segmentations of a sequence.

    For batch element b with L = ``lengths[b]`` positions, a segmentation splits the boundaries
    ``0 = s_0 < s_1 < ... < s_m = L - 1`` into segments of ``k_i = s_i - s_{i-1}`` steps
    (``1 <= k_i <= K - 1``) with labels ``c_1..c_m`` after an initial label ``c_0``, and

        p(y) ∝ exp( Σ_i scores[b, s_{i-1}, k_i, c_{i-1}, c_i] ).

    The layout is torch-struct's ``SemiMarkovCRF`` with the label pair laid out
    ``[from, to]``: ``SemiMarkovCRF(phi.transpose(-1, -2))`` is ``torch_struct``'s
    ``SemiMarkovCRF(phi)``. Its structure is a `structift.structures.semimarkov.SemiMarkov`
    (O(N K C²) forward-backward, k-best Viterbi, FFBS sampling, local entropy and KL).

    Structures (``argmax``, ``sample``, ``log_prob``'s argument) are LongTensors ``[B, N]`` in
    torch-struct's encoding: position 0 holds the initial label, each segment's label sits at
    its last position, -1 inside segments and on padding ``t >= lengths[b]`` (ignored on
    input). ``lengths[b] = 1`` leaves no segment (the C structures ``[c, -1, ...]``).
    ``argmax`` breaks ties towards the lowest last label, then (backtracking) the shortest
    segment and the lowest previous label; ``topk`` ranks beyond the number of finite-score
    segmentations hold -1 at every position (not a structure) and score ``-inf``.

    Args:
        scores: Tensor ``[B, N-1, K, C, C]`` of log-potentials (real or ``-inf``);
            ``scores[b, s, k, a, c]`` scores a segment of k steps from s to s + k labelled c
            after label a. Entries with ``k = 0`` or ``s + k > lengths[b] - 1`` are ignored.
        lengths: LongTensor ``[B]`` with ``1 <= lengths[b] <= N``; ``None`` means all N.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).

    Attributes:
        scores: the caller's tensor (never modified).
        lengths: LongTensor ``[B]``.
    """

    _value_name = "value"

    def __init__(
        self, scores: Tensor, lengths: Tensor | None = None, validate_args: bool | None = None
    ) -> None:
        validate = _resolve_validate(validate_args, scores)
        if validate:
            check_float_tensor("scores", scores)
            _check_scores(scores)
            check_log_potential("scores", scores)
        B, N1, K, C, _ = scores.shape
        if lengths is None:
            lengths = torch.full((B,), N1 + 1, dtype=torch.long, device=scores.device)
        elif validate:
            check_lengths(lengths, B, N1 + 1, scores.device)
        self.scores = scores
        self.lengths = lengths.long()
        self._structure = SemiMarkov(self.lengths, N1 + 1, K, C)
        super().__init__(torch.Size((B,)), torch.Size((N1 + 1,)), validate_args=False)
        self._validate_args = validate

    @property
    def structure(self) -> SemiMarkov:
        return self._structure

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "scores": constraints.independent(LOG_POTENTIAL, 4),
            "lengths": constraints.integer_interval(1, self.scores.shape[1] + 1),
        }

    @property
    def num_labels(self) -> int:
        """The number C of labels."""
        return self.scores.shape[-1]

    @property
    def support(self) -> Any:
        return constraints.independent(constraints.integer_interval(-1, self.num_labels - 1), 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> SemiMarkovCRF:
        """Return the CRF with batch shape ``batch_shape`` (one dimension, broadcast views)."""
        B = check_expand_shape("SemiMarkovCRF", batch_shape, self.scores.shape[0])
        return SemiMarkovCRF(
            self.scores.expand(B, *self.scores.shape[1:]),
            self.lengths.expand(B),
            validate_args=self._validate_args,
        )

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return (self.scores,)

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.scores,)

    def _replace(self, *parameters: Tensor) -> SemiMarkovCRF:
        (scores,) = parameters
        return SemiMarkovCRF(scores, self.lengths, validate_args=False)

    @property
    def marginals(self) -> Tensor:
        """The segment marginals ``[B, N-1, K, C, C]`` in the layout of ``scores``.

        ``marginals[b, s, k, a, c]`` = p(a segment of k steps from s labelled c follows label
        a); zero where ignored (k = 0, past the length). Differentiable in ``scores`` whenever
        gradients are enabled and ``scores`` requires grad.
        """
        return self._present(self._mean_params)

    @property
    def argmax(self) -> Tensor:
        """The Viterbi segmentation, LongTensor ``[B, N]`` (encoding and ties: the class doc)."""
        return super().argmax
