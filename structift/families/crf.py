"""Linear-chain conditional random fields as an exponential family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import constraints

from structift import chain
from structift._ops import lengths_to_mask
from structift.families._validation import (
    LOG_POTENTIAL,
    check_expand_shape,
    check_float_tensor,
    check_index_tensor,
    check_lengths,
    check_log_potential,
    check_ndim,
    check_same_dtype_device,
    check_sample_shape,
)
from structift.families.base import ExpFamily, _resolve_validate

__all__ = ["ChainMarginals", "LinearChainCRF"]


class ChainMarginals(NamedTuple):
    """Marginals (or any statistic) of a linear chain, laid out like its potentials.

    Attributes:
        unary: ``[B, T, Z]``; ``unary[b, t, z] = p(y_t = z)``, zero for ``t >= lengths[b]``.
        binary: ``[B, T-1, Z, Z]``; ``binary[b, t, i, j] = p(y_t = i, y_{t+1} = j)``, zero for
            ``t >= lengths[b] - 1``.
    """

    unary: Tensor
    binary: Tensor


def _check_binary_shape(binary: Tensor, target: tuple[int, int, int, int]) -> None:
    try:
        ok = binary.dim() <= 4 and torch.broadcast_shapes(binary.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"binary must be broadcastable to [B, T-1, Z, Z] = {list(target)} (laid out "
            f"[from, to]); got shape {tuple(binary.shape)}."
        )


class LinearChainCRF(ExpFamily):
    """A linear-chain CRF: a distribution over tag sequences y ∈ {0, …, Z−1}^L.

    For each batch element b with length L = ``lengths[b]``,

        p(y) ∝ exp( Σ_{t<L} unary[b, t, y_t] + Σ_{t<L−1} binary[b, t, y_t, y_{t+1}] ),

    so the natural parameters are θ = (unary, binary) and the sufficient statistics are the
    one-hot indicators of the tags and of consecutive tag pairs. The log-partition A(θ) and the
    marginals μ = ∇A(θ) come from the forward-backward kernels in :mod:`structift.chain`.

    Padding: positions ``t >= lengths[b]`` are ignored (any finite or ``-inf`` value there is
    fine; NaN is rejected everywhere). Marginals are zero there; ``argmax`` and ``sample`` put
    tag 0 there; ``log_prob`` ignores tags there.

    Args:
        unary: Tensor ``[B, T, Z]`` of log-potentials (real or ``-inf``).
        binary: Tensor broadcastable to ``[B, T-1, Z, Z]``, laid out ``[from, to]``
            (e.g. one ``[Z, Z]`` transition matrix shared by every position).
        lengths: LongTensor ``[B]`` with ``1 <= lengths[b] <= T``; ``None`` means all ``T``.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).

    Attributes:
        unary: The unary potentials ``[B, T, Z]`` (the caller's tensor, never modified).
        binary: The binary potentials expanded (a view, no copy) to ``[B, T-1, Z, Z]``.
        lengths: LongTensor ``[B]`` (filled with ``T`` when ``None`` was given).
    """

    def __init__(
        self,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        validate = _resolve_validate(validate_args)
        if validate:
            check_float_tensor("unary", unary)
            check_float_tensor("binary", binary)
            check_ndim("unary", unary, (3,), "[B, T, Z]")
            if unary.shape[1] < 1 or unary.shape[2] < 1:
                raise ValueError(
                    f"unary must have shape [B, T, Z] with T >= 1 and Z >= 1; "
                    f"got {tuple(unary.shape)}."
                )
            check_same_dtype_device("unary", unary, binary=binary)
        B, T, Z = unary.shape
        target = (B, T - 1, Z, Z)
        if validate:
            _check_binary_shape(binary, target)
            check_log_potential("unary", unary)
            check_log_potential("binary", binary)
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=unary.device)
        elif validate:
            check_lengths(lengths, B, T, unary.device)
        self.unary = unary
        self.binary = binary.expand(target)
        self.lengths = lengths.long()
        super().__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "unary": constraints.independent(LOG_POTENTIAL, 2),
            "binary": constraints.independent(LOG_POTENTIAL, 3),
            "lengths": constraints.integer_interval(1, self.unary.shape[1]),
        }

    @property
    def num_states(self) -> int:
        """The number Z of tags."""
        return self.unary.shape[-1]

    @property
    def support(self) -> Any:
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> LinearChainCRF:
        """Return the CRF with batch shape ``batch_shape`` (one dimension, broadcast views)."""
        B = check_expand_shape("LinearChainCRF", batch_shape, self.unary.shape[0])
        T, Z = self.unary.shape[1], self.num_states
        return LinearChainCRF(
            self.unary.expand(B, T, Z),
            self.binary.expand(B, T - 1, Z, Z),
            self.lengths.expand(B),
            validate_args=self._validate_args,
        )

    # ---- exponential-family hooks ----------------------------------------------------------

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return (self.unary, self.binary)

    def _log_normalizer(self, *natural_params: Tensor) -> Tensor:
        unary, binary = natural_params
        return chain.log_partition(unary, binary, self.lengths)

    @property
    def _mean_params(self) -> tuple[Tensor, ...]:
        return tuple(self.marginals)

    @property
    def marginals(self) -> ChainMarginals:
        """The marginals μ = ∇A(θ) as ``ChainMarginals(unary [B,T,Z], binary [B,T-1,Z,Z])``.

        Computed by forward-backward; differentiable in the potentials (for Hessian-vector
        products) whenever gradients are enabled and a potential requires grad. That
        differentiable path is much slower than the detached one: read the marginals under
        ``torch.no_grad()`` when you do not differentiate through them.
        """
        log_z, mu = self._forward_backward()
        self._check_feasible(log_z)  # infeasible exactly where log Z = -inf
        return mu

    def _forward_backward(self) -> tuple[Tensor, ChainMarginals]:
        """``(log Z, marginals)``: the marginals differentiable where gradients are enabled."""
        create_graph = torch.is_grad_enabled() and (
            self.unary.requires_grad or self.binary.requires_grad
        )
        log_z, mu_unary, mu_binary = chain.forward_backward(
            self.unary, self.binary, self.lengths, create_graph=create_graph
        )
        return log_z, ChainMarginals(mu_unary, mu_binary)

    @property
    def argmax(self) -> Tensor:
        """The Viterbi tags, LongTensor ``[B, T]``; positions ``t >= lengths[b]`` hold 0."""
        with torch.no_grad():
            tags, best = chain.viterbi(self.unary, self.binary, self.lengths)
        self._check_feasible(best)
        return tags

    @property
    def max_score(self) -> Tensor:
        """The score ⟨θ, φ(argmax)⟩ of the Viterbi path, shape ``[B]`` (differentiable)."""
        return self.score(self.argmax)

    # ---- structures ------------------------------------------------------------------------

    def _check_tags(self, tags: Tensor) -> None:
        T = self.unary.shape[1]
        mask = lengths_to_mask(self.lengths, T)
        check_index_tensor(
            "tags", tags, (self.unary.shape[0], T), self.num_states, self.unary.device, mask
        )

    def _clean_tags(self, tags: Tensor) -> Tensor:
        """Replace padding tags by 0 (a new tensor) so kernels can index with them."""
        mask = lengths_to_mask(self.lengths, self.unary.shape[1])
        return torch.where(mask, tags, torch.zeros_like(tags))

    def score(self, value: Tensor) -> Tensor:
        """Compute ⟨θ, φ(y)⟩ = Σ unary[y_t] + Σ binary[y_t, y_{t+1}] within each length.

        Args:
            value: Tags, LongTensor ``[*S, B, T]``; padding positions may hold anything.

        Returns:
            Tensor ``[*S, B]``.
        """
        if self._validate_args:
            self._check_tags(value)
        tags = self._clean_tags(value)
        B, T, Z = self.unary.shape
        sample_shape = tags.shape[:-2]
        n = sample_shape.numel()
        if n == 1:
            out = chain.score(self.unary, self.binary, self.lengths, tags.reshape(B, T))
            return out.reshape((*sample_shape, B))
        # Score every sample against the same potentials by folding S into the batch.
        unary = self.unary.unsqueeze(0).expand(n, B, T, Z).reshape(n * B, T, Z)
        binary = self.binary.unsqueeze(0).expand(n, B, T - 1, Z, Z).reshape(n * B, T - 1, Z, Z)
        lengths = self.lengths.repeat(n)
        out = chain.score(unary, binary, lengths, tags.reshape(n * B, T))
        return out.reshape((*sample_shape, B))

    def sufficient_statistics(self, value: Tensor) -> ChainMarginals:
        """Compute φ(y): one-hot tags ``[*S, B, T, Z]`` and tag pairs ``[*S, B, T-1, Z, Z]``.

        Entries at padding positions are zero.
        """
        if self._validate_args:
            self._check_tags(value)
        tags = self._clean_tags(value)
        _B, T, Z = self.unary.shape
        mask = lengths_to_mask(self.lengths, T).to(self.unary.dtype)  # shape: (B, T)
        unary = torch.nn.functional.one_hot(tags, Z).to(self.unary.dtype) * mask[..., None]
        pair_mask = mask[:, 1:]  # pair (t, t+1) exists iff t + 1 < length
        binary = unary[..., :-1, :, None] * unary[..., 1:, None, :] * pair_mask[..., None, None]
        return ChainMarginals(unary, binary)

    def sample(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw tag sequences by forward-filtering backward-sampling (no gradient).

        Args:
            sample_shape: Leading shape S.
            generator: Optional ``torch.Generator`` for reproducible draws.

        Returns:
            LongTensor ``[*S, B, T]``; positions ``t >= lengths[b]`` hold 0.
        """
        shape = check_sample_shape(sample_shape)
        if self._validate_args:
            _ = self.log_partition  # raises if some element has no finite-score sequence
        with torch.no_grad():
            return chain.sample(
                self.unary.detach(),
                self.binary.detach(),
                self.lengths,
                tuple(shape),
                generator=generator,
            )

    def _support_key(self) -> tuple[Any, ...]:
        return ("chain", self.unary.shape[1], self.num_states)

    def _local_entropy(self, mu: tuple[Tensor, ...]) -> Tensor:
        return chain.entropy(self.unary, self.binary, self.lengths, mu[0])

    def _local_kl(self, other: ExpFamily, mu: tuple[Tensor, ...]) -> Tensor:
        q = other._natural_params
        return chain.kl((self.unary, self.binary), (q[0], q[1]), self.lengths, mu[0])

    def _same_support(self, other: ExpFamily) -> bool:
        if self._support_key() != other._support_key():
            return False
        lengths = other.lengths  # type: ignore[attr-defined]
        return lengths.shape == self.lengths.shape and bool((lengths == self.lengths).all())
