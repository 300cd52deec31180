"""The categorical distribution as an exponential family (softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import constraints

from structift._ops import logsumexp, softmax_entropy, softmax_kl
from structift.families._validation import (
    LOG_POTENTIAL,
    check_float_tensor,
    check_index_tensor,
    check_log_potential,
    check_sample_shape,
)
from structift.families.base import ExpFamily, _resolve_validate

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
        validate = _resolve_validate(validate_args)
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
        super().__init__(logits.shape[:-1], torch.Size(), validate_args=False)
        self._validate_args = validate

    @property
    def num_events(self) -> int:
        """The number n of outcomes."""
        return self.logits.shape[-1]

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

    def _log_normalizer(self, *natural_params: Tensor) -> Tensor:
        (logits,) = natural_params
        return logsumexp(logits, -1)

    @property
    def _mean_params(self) -> tuple[Tensor, ...]:
        return (self.marginals,)

    @property
    def marginals(self) -> Tensor:
        """The probabilities μ = softmax(θ), shape ``[*batch, n]``."""
        return torch.softmax(self.logits, -1)

    @property
    def probs(self) -> Tensor:
        """Alias of ``marginals`` (torch's name)."""
        return self.marginals

    @property
    def argmax(self) -> Tensor:
        """The most probable outcome, LongTensor ``[*batch]`` (the first one on ties)."""
        return self.logits.argmax(-1)

    def _check_value(self, value: Tensor) -> None:
        check_index_tensor(
            "value", value, tuple(self.batch_shape), self.num_events, self.logits.device
        )

    def score(self, value: Tensor) -> Tensor:
        """Compute ⟨θ, φ(x)⟩ = θ_x.

        Args:
            value: LongTensor ``[*S, *batch]`` of outcomes in ``[0, n)``.

        Returns:
            Tensor ``[*S, *batch]``.
        """
        if self._validate_args:
            self._check_value(value)
        logits = self.logits.expand((*value.shape, self.num_events))
        return logits.gather(-1, value.unsqueeze(-1)).squeeze(-1)

    def sufficient_statistics(self, value: Tensor) -> Tensor:
        """Compute the one-hot vector φ(x) = e_x, shape ``[*S, *batch, n]`` (logits' dtype)."""
        if self._validate_args:
            self._check_value(value)
        one_hot = torch.nn.functional.one_hot(value, self.num_events)
        return one_hot.to(self.logits.dtype)

    def sample(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw outcomes, LongTensor ``[*sample_shape, *batch]`` (no gradient).

        Args:
            sample_shape: Leading shape S of the draw.
            generator: Optional ``torch.Generator`` for reproducible draws.
        """
        shape = check_sample_shape(sample_shape)
        if shape.numel() == 0:
            return torch.zeros(
                shape + self.batch_shape, dtype=torch.long, device=self.logits.device
            )
        with torch.no_grad():
            probs = self.marginals.reshape(-1, self.num_events)
            count = max(shape.numel(), 1)
            draws = torch.multinomial(probs, count, replacement=True, generator=generator)
        # draws: [prod(batch), prod(S)] -> [*S, *batch]
        return draws.t().reshape(shape + self.batch_shape)

    def _support_key(self) -> tuple[Any, ...]:
        return ("categorical", self.num_events)

    def _local_entropy(self, mu: tuple[Tensor, ...]) -> Tensor:
        return softmax_entropy(self.logits)

    def _local_kl(self, other: ExpFamily, mu: tuple[Tensor, ...]) -> Tensor:
        return softmax_kl(self.logits, other.logits)  # type: ignore[attr-defined]
