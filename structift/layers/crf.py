"""``CRF``: a linear-chain CRF output layer, a drop-in for pytorch-crf's ``CRF`` module.

The model over tags ``y`` of a sequence of length ``L`` with emission scores ``x [T, Z]``:

    score(y) = start[y_0] + Σ_{t<L} x[t, y_t] + Σ_{t<L-1} transitions[y_t, y_{t+1}] + end[y_{L-1}]

and ``log p(y | x) = score(y) − log Σ_y' exp score(y')``. It is a
`structift.LinearChainCRF` whose unary potentials are the emissions with the start
scores added at position 0 and the end scores at position ``L − 1`` of each sequence, and whose
binary potential is the one shared transition matrix (``distribution`` builds it), so the
likelihood, Viterbi, k-best decoding, marginals, sampling and entropy all come from the family.

Constraints (``allowed_transitions``) set the forbidden start, end and transition scores to
``-inf`` in every computation (likelihood, marginals, decoding), never to a finite stand-in;
their parameters get zero gradient, and no NaN is formed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from structift._checks import check_lengths, lengths_from
from structift.families import LinearChainCRF
from structift.layers.tagging import transition_masks
from structift.structures import chain

__all__ = ["CRF"]

_REDUCTIONS = ("none", "sum", "mean", "token_mean")


def _check_feasible(log_z: Tensor) -> None:
    empty = log_z == float("-inf")
    if bool(empty.any()):
        b = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"CRF: sequence {b} has no allowed tag sequence (every path has a -inf score: "
            "check the constraints against its length and the -inf emissions)."
        )


class CRF(nn.Module):
    """A linear-chain CRF layer with start, end and transition scores (pytorch-crf's API).

    ``forward`` returns the log-likelihood of gold tags (negate it for a loss), ``decode`` the
    Viterbi (or k best) tag lists, ``marginals`` the per-position tag probabilities, and
    ``distribution`` the `structift.LinearChainCRF` itself for everything else
    (``entropy()``, ``sample``, ``topk``, ``structift.variational.regularized_argmax``).

    A pytorch-crf ``state_dict`` loads unchanged: the parameters have its names, shapes and
    layout, and constraints are not part of the state.

    Args:
        num_tags: Z, the number of tags.
        batch_first: inputs are ``[B, T, ...]`` (default) rather than ``[T, B, ...]``.
        constraints: allowed ``(from, to)`` pairs with START = Z and END = Z + 1, as returned
            by `structift.layers.allowed_transitions`; everything else is forbidden.
            ``None``: no constraint.

    Attributes:
        start_transitions: ``[Z]`` score of the first tag.
        end_transitions: ``[Z]`` score of the last tag.
        transitions: ``[Z, Z]`` laid out ``[from, to]``.
    """

    def __init__(
        self,
        num_tags: int,
        batch_first: bool = True,
        constraints: Iterable[tuple[int, int]] | None = None,
    ) -> None:
        if isinstance(num_tags, bool) or not isinstance(num_tags, int) or num_tags < 1:
            raise ValueError(f"CRF: num_tags must be an int >= 1; got {num_tags!r}.")
        super().__init__()
        self.num_tags = num_tags
        self.batch_first = batch_first
        self.start_transitions = nn.Parameter(torch.empty(num_tags))
        self.end_transitions = nn.Parameter(torch.empty(num_tags))
        self.transitions = nn.Parameter(torch.empty(num_tags, num_tags))
        self.constrained = constraints is not None
        if constraints is not None:
            start, end, trans = transition_masks(constraints, num_tags)
            # Not persistent: a pytorch-crf state_dict must load with strict=True.
            self.register_buffer("start_mask", start, persistent=False)
            self.register_buffer("end_mask", end, persistent=False)
            self.register_buffer("transition_mask", trans, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every score from U(-0.1, 0.1), as pytorch-crf does."""
        for p in (self.start_transitions, self.end_transitions, self.transitions):
            nn.init.uniform_(p, -0.1, 0.1)

    def extra_repr(self) -> str:
        return f"num_tags={self.num_tags}, batch_first={self.batch_first}, " + (
            f"constrained={self.constrained}"
        )

    # ---- the distribution ----------------------------------------------------------------

    def _masks(self) -> tuple[Tensor, Tensor, Tensor]:
        """The allowed ``(start [Z], end [Z], transitions [Z, Z])`` (constrained layers only)."""
        start, end, trans = self.start_mask, self.end_mask, self.transition_mask
        assert isinstance(start, Tensor) and isinstance(end, Tensor) and isinstance(trans, Tensor)
        return start, end, trans

    def _scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(start, end, transitions)`` with forbidden entries at ``-inf`` (where: no NaN)."""
        start: Tensor = self.start_transitions
        end: Tensor = self.end_transitions
        trans: Tensor = self.transitions
        if self.constrained:
            ok_start, ok_end, ok_trans = self._masks()
            neg_inf = start.new_full((), float("-inf"))
            start = torch.where(ok_start, start, neg_inf)
            end = torch.where(ok_end, end, neg_inf)
            trans = torch.where(ok_trans, trans, neg_inf)
        return start, end, trans

    def _lengths(self, emissions: Tensor, mask: Tensor | None, lengths: Tensor | None) -> Tensor:
        B, T, _ = emissions.shape
        if mask is not None:
            if isinstance(mask, Tensor) and mask.dtype == torch.uint8:
                mask = mask.bool()  # pytorch-crf accepts ByteTensor masks
            if isinstance(mask, Tensor) and not self.batch_first and mask.dim() == 2:
                mask = mask.transpose(0, 1)
        out = lengths_from(lengths, mask, B, T, emissions.device)
        if out is None:
            return torch.full((B,), T, dtype=torch.long, device=emissions.device)
        if mask is not None and B and bool((out == 0).any()):
            b = int((out == 0).nonzero()[0, 0])
            raise ValueError(
                f"mask row {b} is all False: every sequence needs at least one position (the "
                "first timestep must be on, as in pytorch-crf); drop empty sequences."
            )
        return check_lengths(out, B, T, emissions.device).long()

    def _potentials(
        self, emissions: Tensor, mask: Tensor | None, lengths: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(unary [B, T, Z], transitions [Z, Z], lengths [B])``, batch first (checked)."""
        if not isinstance(emissions, Tensor) or emissions.dim() != 3:
            shape = tuple(emissions.shape) if isinstance(emissions, Tensor) else None
            layout = "[B, T, Z]" if self.batch_first else "[T, B, Z]"
            raise ValueError(f"emissions must be a 3-D tensor {layout}; got shape {shape}.")
        if not self.batch_first:
            emissions = emissions.transpose(0, 1)
        if emissions.shape[-1] != self.num_tags:
            raise ValueError(
                f"emissions must have num_tags = {self.num_tags} scores in the last dimension; "
                f"got shape {tuple(emissions.shape)}."
            )
        B, T, Z = emissions.shape
        if T < 1:
            raise ValueError(f"emissions must have at least one timestep; got shape {(B, T, Z)}.")
        lens = self._lengths(emissions, mask, lengths)
        start, end, trans = (x.to(emissions.dtype) for x in self._scores())
        unary = emissions.clone()  # shape: (B, T, Z)
        unary[:, 0] += start
        unary[torch.arange(B, device=unary.device), lens - 1] += end
        return unary, trans, lens

    def distribution(
        self, emissions: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> LinearChainCRF:
        """Build the `structift.LinearChainCRF` of these emissions (batch first).

        ``unary[b, t] = emissions[b, t] + [t = 0] start + [t = L_b − 1] end`` (the end scores
        at each sequence's own last position) and ``binary = transitions`` shared over time.

        Args:
            emissions: ``[B, T, Z]`` (``[T, B, Z]`` unless ``batch_first``) emission scores.
            mask: bool (or uint8) ``[B, T]`` (``[T, B]``) prefix mask; holes raise.
            lengths: LongTensor ``[B]`` instead of ``mask`` (``None`` for both: all ``T``).

        Returns:
            The distribution over tags ``[B, T]``, always batch first.
        """
        unary, trans, lens = self._potentials(emissions, mask, lengths)
        return LinearChainCRF(unary, trans, lens)

    # ---- pytorch-crf's API ----------------------------------------------------------------

    def forward(
        self,
        emissions: Tensor,
        tags: Tensor,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        reduction: str = "sum",
    ) -> Tensor:
        """Compute the log-likelihood ``log p(tags | emissions)`` (a loss is its negative).

        Args:
            emissions: ``[B, T, Z]`` (``[T, B, Z]`` unless ``batch_first``).
            tags: LongTensor ``[B, T]`` (``[T, B]``); entries beyond each length are ignored
                (any value, e.g. -100).
            mask: as in ``distribution``.
            lengths: as in ``distribution``.
            reduction: ``"none"`` (``[B]``), ``"sum"``, ``"mean"`` (over sequences) or
                ``"token_mean"`` (divided by the number of tokens), as in pytorch-crf.

        Raises:
            ValueError: an unknown reduction, tags out of range within the lengths, or gold
                tags that the constraints (or ``-inf`` emissions) forbid.
        """
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
        unary, trans, lens = self._potentials(emissions, mask, lengths)
        dist = LinearChainCRF(unary, trans, lens)  # validates the potentials
        if isinstance(tags, Tensor) and not self.batch_first and tags.dim() == 2:
            tags = tags.transpose(0, 1)
        dist.structure.check_value("tags", tags, unary.device)
        # The chain functions on the [Z, Z] matrix itself: its gradient is formed as [Z, Z]
        # (the family's expanded view would form per-position pair marginals first).
        gold = chain.score(unary, trans, lens, tags)
        if not bool(torch.isfinite(gold).all()):
            raise ValueError(self._forbidden_message(lens, tags, gold))
        log_z = chain.log_partition(unary, trans, lens, backend=dist.structure.backend)
        llh = gold - log_z  # shape: (B,)
        if reduction == "none":
            return llh
        if reduction == "sum":
            return llh.sum()
        if reduction == "mean":
            return llh.mean()
        return llh.sum() / lens.sum()

    def _forbidden_message(self, lens: Tensor, tags: Tensor, gold: Tensor) -> str:
        b = int((~torch.isfinite(gold)).nonzero()[0, 0])
        L = int(lens[b])
        path = tags[b, :L].tolist()
        where = "-inf emission scores"
        if self.constrained:
            ok_start, ok_end, ok_trans = self._masks()
            if not bool(ok_start[path[0]]):
                where = f"the constraints (tag {path[0]} may not start a sequence)"
            elif not bool(ok_end[path[-1]]):
                where = f"the constraints (tag {path[-1]} may not end a sequence)"
            else:
                for t in range(L - 1):
                    i, j = path[t], path[t + 1]
                    if not bool(ok_trans[i, j]):
                        where = f"the constraints (tag {i} -> {j} at positions {t}, {t + 1})"
                        break
        return (
            f"CRF: the gold tags of sequence {b} have probability 0: they are forbidden by "
            f"{where}; tags[{b}, :{L}] = {path[:20]}{' ...' if L > 20 else ''}. Fix the "
            "labels or the constraints."
        )

    def decode(
        self,
        emissions: Tensor,
        mask: Tensor | None = None,
        lengths: Tensor | None = None,
        k: int = 1,
    ) -> Any:
        """Find the most probable tags of each sequence (Viterbi), or the ``k`` best.

        Args:
            emissions: as in ``distribution``.
            mask: as in ``distribution``.
            lengths: as in ``distribution``.
            k: how many tag sequences per input (an int ``>= 1``).

        Returns:
            ``k = 1``: a list (one per sequence) of tag lists of each sequence's length, as
            pytorch-crf's ``decode``. ``k > 1``: for each sequence a list of up to ``k``
            ``(tags, score)`` pairs, best first (fewer when fewer tag sequences are allowed),
            as AllenNLP's ``viterbi_tags(top_k=k)``; ties as ``LinearChainCRF.topk``.
        """
        with torch.no_grad():
            dist = self.distribution(emissions, mask=mask, lengths=lengths)
            lens = dist.lengths.tolist()
            if isinstance(k, int) and not isinstance(k, bool) and k == 1:
                rows = dist.argmax.tolist()
                return [row[:n] for row, n in zip(rows, lens)]
            tags, scores = dist.topk(k)
            all_tags, all_scores = tags.tolist(), scores.tolist()
        out = []
        for b, n in enumerate(lens):
            best = [
                (all_tags[r][b][:n], all_scores[r][b])
                for r in range(len(all_tags))
                if all_scores[r][b] != float("-inf")
            ]
            out.append(best)
        return out

    def marginals(
        self, emissions: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> Tensor:
        """Return ``p(y_t = z | emissions)``: ``[B, T, Z]`` (``[T, B, Z]``), 0 beyond lengths.

        Differentiable when gradients are enabled (the Hessian-vector product of ``log Z``);
        the pairwise marginals are ``distribution(...).marginals.binary``.
        """
        unary, trans, lens = self._potentials(emissions, mask, lengths)
        dist = LinearChainCRF(unary, trans, lens)  # validates
        if torch.is_grad_enabled() and (unary.requires_grad or trans.requires_grad):
            mu = dist.marginals.unary
        else:
            # No graph wanted: the gradient of log Z in the unary alone, without the pair
            # marginals [B, T-1, Z, Z] that the full posterior forms.
            with torch.enable_grad():
                u = unary.detach().requires_grad_(True)
                log_z = chain.log_partition(u, trans.detach(), lens, dist.structure.backend)
                _check_feasible(log_z.detach())
                (mu,) = torch.autograd.grad(log_z.sum(), u)
        return mu if self.batch_first else mu.transpose(0, 1)
