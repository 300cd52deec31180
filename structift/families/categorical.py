"""The categorical distribution as an exponential family (softmax)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import constraints

from structift._checks import (
    LOG_POTENTIAL,
    check_float_tensor,
    check_log_potential,
)
from structift.families.base import ExpFamily, _resolve_validate
from structift.structures.simplex import Simplex

__all__ = ["Categorical"]


class Categorical(ExpFamily):
    """Categorical distribution over ``{0, …, n−1}`` with natural parameters ``logits``.

    p(x) = exp(θ_x − A(θ)) with A(θ) = log Σ_i exp θ_i; the sufficient statistic is the one-hot
    vector e_x, so the marginals are μ = ∇A = softmax(θ) and the argmax is the MAP outcome.
    ``-inf`` logits forbid an outcome; at least one logit per row must be finite.

    Args:
        logits: Natural parameters θ, shape ``[*batch, n]``, real or ``-inf``.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).

    Example:
        >>> cat = Categorical(torch.tensor([0.0, 1.0, float("-inf")]))
        >>> cat.marginals  # softmax; the forbidden outcome has probability 0
        tensor([0.2689, 0.7311, 0.0000])
    """

    arg_constraints: ClassVar[dict[str, Any]] = {
        "logits": constraints.independent(LOG_POTENTIAL, 1)
    }

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        validate = _resolve_validate(validate_args, logits)
        if validate:
            check_float_tensor("logits", logits)
            if logits.dim() < 1 or logits.shape[-1] < 1:
                raise ValueError(
                    f"logits must have shape [*batch, n] with n >= 1; got {tuple(logits.shape)}."
                )
            check_log_potential("logits", logits)
            empty = (logits == float("-inf")).all(-1)
            if bool(empty.any()):
                index = tuple(int(i) for i in empty.nonzero()[0])
                raise ValueError(
                    f"logits must have at least one finite entry per distribution; "
                    f"logits[{index}] is all -inf."
                )
        self.logits = logits
        self._structure = Simplex(logits.shape[:-1], logits.shape[-1])
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=False)
        self._validate_args = validate

    @property
    def num_events(self) -> int:
        """The number n of outcomes."""
        return self.logits.shape[-1]

    @property
    def structure(self) -> Simplex:
        return self._structure

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> Any:
        return constraints.integer_interval(0, self.num_events - 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> Categorical:
        """Return the distribution with logits expanded (no copy) to ``batch_shape``."""
        shape = (*torch.Size(batch_shape), self.num_events)
        return Categorical(self.logits.expand(shape), validate_args=self._validate_args)

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return (self.logits,)

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.logits,)

    def _replace(self, *parameters: Tensor) -> Categorical:
        return Categorical(parameters[0], validate_args=False)

    @property
    def probs(self) -> Tensor:
        """Alias of ``marginals`` (torch's name)."""
        return self.marginals
