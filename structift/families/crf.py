"""Linear-chain conditional random fields as an exponential family."""

from __future__ import annotations

from typing import Any, NamedTuple

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
    check_same_dtype_device,
    lengths_from,
    promote_under_autocast,
)
from structift.families.base import ExpFamily, _resolve_validate
from structift.structures.chain import BackendSpec, Chain

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
    one-hot indicators of the tags and of consecutive tag pairs. Its structure is a
    `structift.structures.chain.Chain`, which computes A(θ), the marginals, Viterbi,
    sampling and the local terms of entropy and KL with the chosen backend.

    Padding: positions ``t >= lengths[b]`` are ignored (any finite or ``-inf`` value there is
    fine; NaN is rejected everywhere). Marginals are zero there; ``argmax`` and ``sample`` put
    tag 0 there; ``log_prob`` ignores tags there.

    One batch dimension: for more, flatten them (``x.flatten(0, k)``, free) or map the
    distribution over them with ``torch.func.vmap`` (the kernels fold vmapped dimensions into
    their batch).

    Args:
        unary: Tensor ``[B, T, Z]`` of log-potentials (real or ``-inf``).
        binary: Tensor broadcastable to ``[B, T-1, Z, Z]``, laid out ``[from, to]``
            (e.g. one ``[Z, Z]`` transition matrix shared by every position).
        lengths: LongTensor ``[B]`` with ``1 <= lengths[b] <= T``; ``None`` means all ``T``.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).
        mask: BoolTensor ``[B, T]``, a prefix mask, instead of ``lengths``.
        backend: the chain backend (``structift.structures.chain.backends``), chosen once here;
            default: the choice in effect (``use_backend``, else ``auto``).

    Under ``torch.autocast``, potentials of mixed floating dtypes (bfloat16 emissions, float32
    transitions) are promoted to their common type; outside it a mismatch is an error.

    Attributes:
        unary: The unary potentials ``[B, T, Z]`` (the caller's tensor, never modified).
        binary: The binary potentials expanded (a view, no copy) to ``[B, T-1, Z, Z]``.
        lengths: LongTensor ``[B]`` (filled with ``T`` when ``None`` was given).
    """

    _value_name = "tags"

    def __init__(
        self,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        mask: Tensor | None = None,
        backend: BackendSpec = None,
    ) -> None:
        unary, binary = promote_under_autocast(unary, binary)
        validate = _resolve_validate(validate_args, unary, binary)
        if validate:
            check_float_tensor("unary", unary)
            check_float_tensor("binary", binary)
            if unary.dim() > 3:
                raise ValueError(
                    f"unary must have shape [B, T, Z] (one batch dimension); got shape "
                    f"{tuple(unary.shape)}. Flatten the leading dimensions (unary.flatten(0, "
                    f"{unary.dim() - 3})) or map over them with torch.func.vmap."
                )
            check_ndim("unary", unary, (3,), "[B, T, Z]")
            if unary.shape[1] < 1 or unary.shape[2] < 1:
                raise ValueError(
                    f"unary must have shape [B, T, Z] with T >= 1 and Z >= 1; "
                    f"got {tuple(unary.shape)}."
                )
            check_same_dtype_device("unary", unary, binary=binary)
        B, T, Z = unary.shape
        target = (B, T - 1, Z, Z)
        lengths = lengths_from(lengths, mask, B, T, unary.device)
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
        self._structure = Chain.build(unary, self.lengths, backend)
        super().__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    @property
    def structure(self) -> Chain:
        return self._structure

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
            backend=self.structure.backend,
        )

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return (self.unary, self.binary)

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.unary, self.binary)

    def _replace(self, *parameters: Tensor) -> LinearChainCRF:
        unary, binary = parameters
        return LinearChainCRF(
            unary, binary, self.lengths, validate_args=False, backend=self.structure.backend
        )

    def _present(self, mu: tuple[Tensor, ...]) -> ChainMarginals:
        return ChainMarginals(mu[0], mu[1])

    @property
    def marginals(self) -> ChainMarginals:
        """The marginals μ = ∇A(θ) as ``ChainMarginals(unary [B,T,Z], binary [B,T-1,Z,Z])``.

        Differentiable in the potentials (for Hessian-vector products) whenever gradients are
        enabled and a potential requires grad; read them under ``torch.no_grad()`` when you do
        not differentiate through them.
        """
        return self._present(self._mean_params)

    @property
    def argmax(self) -> Tensor:
        """The Viterbi tags, LongTensor ``[B, T]``; positions ``t >= lengths[b]`` hold 0."""
        return super().argmax
