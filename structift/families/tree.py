"""Dependency-tree CRFs (projective and non-projective) as an exponential family."""

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
    check_ndim,
)
from structift.families.base import ExpFamily, _resolve_validate
from structift.structures.tree.space import TreeSpace

__all__ = ["DependencyCRF"]


def _tree_structure(lengths: Tensor, N: int, projective: bool, multi_root: bool) -> TreeSpace:
    """The structure of the trees: ``ProjectiveTrees`` or ``NonProjectiveTrees``."""
    if projective:
        try:
            from structift.structures.tree.projective import ProjectiveTrees
        except ImportError as error:  # pragma: no cover - only before projective.py existed
            raise NotImplementedError(
                "DependencyCRF(projective=True) needs structift.structures.tree.projective, "
                "which is not available in this build; use projective=False."
            ) from error
        return ProjectiveTrees(lengths, N, multi_root)
    from structift.structures.tree.nonprojective import NonProjectiveTrees

    return NonProjectiveTrees(lengths, N, multi_root)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False); got {value!r}.")
    return value


class DependencyCRF(ExpFamily):
    """A dependency-tree CRF: a distribution over the trees of n words under a ROOT.

    For batch element b with n = ``lengths[b]`` words,

        p(y) ∝ exp Σ_{m=1..n} arc_scores[b, y_m, m],

    over head vectors y (``y_m ∈ {0..n}``, 0 = ROOT) that form a tree: every word reaches ROOT,
    with exactly one word on ROOT unless ``multi_root`` (Koo et al. 2007; Zmigrod, Vieira &
    Cotterell 2020, "Please Mind the Root", arXiv:2010.02550), and no crossing arcs if
    ``projective``. The natural parameters are the arc scores, the statistics the arc
    indicators. Non-projective trees use the matrix-tree theorem
    (`structift.structures.tree.nonprojective.NonProjectiveTrees`), projective ones Eisner's
    algorithm (`structift.structures.tree.projective.ProjectiveTrees`); their docstrings
    state the algorithms, complexities, tie rules and float32 strategies.

    Ignored entries: column 0 (nothing heads ROOT), the diagonal and every row or column
    beyond n may hold any real or ``-inf`` value (NaN and ``+inf`` are rejected everywhere);
    marginals and gradients are exactly 0 there. ``-inf`` inside is a forbidden arc.

    Values: head vectors LongTensor ``[*S, B, N+1]``; ``argmax``, ``sample`` and ``topk`` put
    -1 at index 0 and at padding, and inputs (``log_prob``) may hold anything there.

    Args:
        arc_scores: Tensor ``[B, N+1, N+1]``; ``arc_scores[b, h, m]`` scores head h ->
            modifier m; index 0 is ROOT.
        lengths: LongTensor ``[B]`` with ``1 <= lengths[b] <= N``; ``None`` means all N.
        projective: only projective trees (no crossing arcs).
        multi_root: allow several words on ROOT.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).

    Attributes:
        arc_scores: the caller's tensor (never modified).
        lengths: LongTensor ``[B]``.
        projective, multi_root: the flags.
    """

    _value_name = "heads"

    def __init__(
        self,
        arc_scores: Tensor,
        lengths: Tensor | None = None,
        projective: bool = False,
        multi_root: bool = False,
        validate_args: bool | None = None,
    ) -> None:
        validate = _resolve_validate(validate_args, arc_scores)
        projective = _check_flag("projective", projective)
        multi_root = _check_flag("multi_root", multi_root)
        if validate:
            check_float_tensor("arc_scores", arc_scores)
            check_ndim("arc_scores", arc_scores, (3,), "[B, N+1, N+1]")
            B, R, C = arc_scores.shape
            if R != C or R < 2:
                raise ValueError(
                    "arc_scores must have shape [B, N+1, N+1] (square, index 0 = ROOT, "
                    f"N >= 1 words); got {tuple(arc_scores.shape)}."
                )
            check_log_potential("arc_scores", arc_scores)
        B, N1 = arc_scores.shape[0], arc_scores.shape[-1]
        N = N1 - 1
        if lengths is None:
            lengths = torch.full((B,), N, dtype=torch.long, device=arc_scores.device)
        elif validate:
            check_lengths(lengths, B, N, arc_scores.device)
        self.arc_scores = arc_scores
        self.lengths = lengths.long()
        self.projective, self.multi_root = projective, multi_root
        self._structure = _tree_structure(self.lengths, N, projective, multi_root)
        super().__init__(torch.Size((B,)), torch.Size((N1,)), validate_args=False)
        self._validate_args = validate

    @property
    def structure(self) -> TreeSpace:
        return self._structure

    @property
    def num_words(self) -> int:
        """N, the padded number of words."""
        return self.arc_scores.shape[-1] - 1

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "arc_scores": constraints.independent(LOG_POTENTIAL, 2),
            "lengths": constraints.integer_interval(1, self.num_words),
        }

    @property
    def support(self) -> Any:
        """Head vectors: integers in [-1, N] (the tree constraints are checked by log_prob)."""
        return constraints.independent(constraints.integer_interval(-1, self.num_words), 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> DependencyCRF:
        """Return the CRF with batch shape ``batch_shape`` (one dimension, broadcast views)."""
        B = check_expand_shape("DependencyCRF", batch_shape, self.arc_scores.shape[0])
        N1 = self.num_words + 1
        return DependencyCRF(
            self.arc_scores.expand(B, N1, N1),
            self.lengths.expand(B),
            projective=self.projective,
            multi_root=self.multi_root,
            validate_args=self._validate_args,
        )

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return (self.arc_scores,)

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.arc_scores,)

    def _replace(self, *parameters: Tensor) -> DependencyCRF:
        (arc_scores,) = parameters
        return DependencyCRF(
            arc_scores,
            self.lengths,
            projective=self.projective,
            multi_root=self.multi_root,
            validate_args=False,
        )

    @property
    def marginals(self) -> Tensor:
        """Arc marginals ``[B, N+1, N+1]``: ``p(head of m = h)``, 0 where ignored or padded.

        Differentiable in ``arc_scores`` whenever gradients are enabled and it requires grad;
        read them under ``torch.no_grad()`` when you do not differentiate through them.
        """
        return self._present(self._mean_params)

    @property
    def argmax(self) -> Tensor:
        """The MAP tree's heads, LongTensor ``[B, N+1]``; -1 at index 0 and padding."""
        return super().argmax
