"""The exponential-family contract shared by every structift distribution.

A family has natural parameters θ (a tuple of tensors), sufficient statistics φ(x) with the same
structure, and a log-partition function

    A(θ) = log Σ_x exp⟨θ, φ(x)⟩,

so that p(x) = exp(⟨θ, φ(x)⟩ − A(θ)) (the carrier measure is zero). Everything else follows
from A: the marginals μ = ∇A(θ) = E_p[φ(x)], the entropy H = A − ⟨θ, μ⟩, the cross-entropy
H(p, q) = A(θ_q) − ⟨θ_q, μ_p⟩ and the KL divergence in Bregman form
KL(p ‖ q) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩ (Nielsen & Nock, arXiv:1009.4004).

Values and gradients come from two forms of the same function. The Bregman forms above
subtract numbers of the size of |A(θ)|, which in float32 loses everything for long or peaked
structures (an entropy of 33.8 came out as 205, or negative). So each family computes the
*value* as a sum of non-negative local terms (``_local_entropy`` / ``_local_kl``: conditional
entropies and KLs of softmax rows), which is accurate and ``>= 0`` by construction, and the
*gradient* is that of the Bregman form, attached by ``_value_with_gradient``: the returned tensor
equals the local value and differentiates (to any order) as the Bregman form, which is the same
function of θ. Its gradient, ``−∇²A(θ) θ`` for the entropy, is a centred Hessian-vector product
and does not cancel.

Unlike ``torch.distributions.ExponentialFamily.entropy`` (which detaches the parameters), every
quantity here is differentiable in all natural parameters: μ is computed with a graph when one
is needed, so gradients of entropy, cross-entropy and KL reach both distributions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, ExponentialFamily

__all__ = ["ExpFamily"]

_NEG_INF = float("-inf")


def _resolve_validate(validate_args: bool | None) -> bool:
    """Return the effective validation flag (torch's global default when ``None``)."""
    return bool(Distribution._validate_args if validate_args is None else validate_args)


def _inner(theta: tuple[Tensor, ...], mu: tuple[Tensor, ...], batch_dims: int) -> Tensor:
    """Compute ⟨θ, μ⟩ summed over the event dimensions, with ``-inf · 0 = 0``.

    A ``-inf`` natural parameter is a hard constraint: its statistic has zero probability under
    a distribution that respects it, and the product must read 0 rather than NaN. Where μ > 0
    meets θ = −inf (a cross-entropy against a distribution that forbids what p allows) the
    inner product is −inf, so cross-entropy and KL are +inf, as they should be.

    Args:
        theta: Natural parameters, each ``[*batch, *event_i]``.
        mu: Mean parameters of the same shapes.
        batch_dims: Number of leading batch dimensions.

    Returns:
        Tensor of the batch shape.
    """
    total: Tensor | None = None
    forbidden: Tensor | None = None
    for th, m in zip(theta, mu):
        hard = th == _NEG_INF
        # Replacing -inf before the product keeps NaN out of the backward pass too.
        safe = torch.where(hard, torch.zeros_like(th), th)
        term = (safe * m).flatten(batch_dims).sum(-1)
        violated = (hard & (m > 0)).flatten(batch_dims).any(-1)
        total = term if total is None else total + term
        forbidden = violated if forbidden is None else forbidden | violated
    assert total is not None and forbidden is not None
    return torch.where(forbidden, torch.full_like(total, _NEG_INF), total)


def _value_with_gradient(value: Tensor, form: Tensor | None) -> Tensor:
    """Return ``value`` (detached, accurate) carrying the autograd graph of ``form``.

    ``form`` is the same function of the parameters computed another way (the Bregman form):
    ``value + (form - form.detach())`` equals ``value`` exactly and has ``form``'s derivatives
    of every order. Where ``value`` is infinite (q forbids what p allows) it is returned as is.
    """
    if form is None or not form.requires_grad:
        return value
    value = value.to(form.dtype)
    return torch.where(torch.isfinite(value), value + (form - form.detach()), value)


def _needs_graph(*thetas: tuple[Tensor, ...]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for th in thetas for t in th)


class ExpFamily(ExponentialFamily):
    """Abstract base of structift's exponential families.

    Subclasses provide the torch hooks ``_natural_params`` and ``_log_normalizer``, the
    properties ``marginals`` and ``argmax``, and the methods ``score``,
    ``sufficient_statistics``, ``sample`` and ``_support_key``. This class derives the
    rest: ``log_partition``, ``entropy``, ``log_prob``, ``cross_entropy``, ``mode`` and the KL
    divergence registered with ``torch.distributions.kl_divergence``.

    Validation (``validate_args``, on by default as in torch) happens in the constructor and in
    the methods that take user input; with ``validate_args=False`` no check runs.
    """

    has_rsample = False

    @property
    def _mean_carrier_measure(self) -> float:
        return 0.0

    # ---- hooks for subclasses -------------------------------------------------------------

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        """The natural parameters θ as a tuple of tensors, each ``[*batch, *event_i]``."""
        raise NotImplementedError

    def _log_normalizer(self, *natural_params: Tensor) -> Tensor:
        """Compute A(θ) for the given natural parameters (batch shape)."""
        raise NotImplementedError

    @property
    def _mean_params(self) -> tuple[Tensor, ...]:
        """The marginals μ as a tuple aligned with ``_natural_params``."""
        raise NotImplementedError

    @property
    def marginals(self) -> Any:
        """The marginals μ = ∇A(θ) = E_p[φ(x)], with the structure of the natural parameters."""
        raise NotImplementedError

    @property
    def argmax(self) -> Tensor:
        """The most probable structure (MAP), shape ``[*batch, *event]``."""
        raise NotImplementedError

    def score(self, value: Tensor) -> Tensor:
        """Compute the unnormalized log-probability ⟨θ, φ(x)⟩ of ``value``."""
        raise NotImplementedError

    def sufficient_statistics(self, value: Tensor) -> Any:
        """Compute φ(x), with the structure of the natural parameters."""
        raise NotImplementedError

    def _support_key(self) -> tuple[Any, ...]:
        """A hashable description of the sample space (two families can be compared iff equal)."""
        raise NotImplementedError

    def _local_entropy(self, mu: tuple[Tensor, ...]) -> Tensor:
        """Compute H(p) without a graph as a sum of non-negative local terms (batch shape).

        ``mu`` are this distribution's marginals (detached), the weights of the terms.
        """
        raise NotImplementedError

    def _local_kl(self, other: ExpFamily, mu: tuple[Tensor, ...]) -> Tensor:
        """Compute KL(p ‖ q) without a graph as a sum of non-negative local terms."""
        raise NotImplementedError

    def _same_support(self, other: ExpFamily) -> bool:
        """Whether ``other`` lives on the same sample space (subclasses refine, e.g. lengths)."""
        return self._support_key() == other._support_key()

    def _check_feasible(self, log_partition: Tensor) -> None:
        """Raise if some batch element has no structure of finite score (A = −inf)."""
        if self._validate_args:
            empty = log_partition == _NEG_INF
            if bool(empty.any()):
                index = tuple(int(i) for i in empty.nonzero()[0])
                raise ValueError(
                    f"{type(self).__name__}: no structure has finite score at batch index "
                    f"{index} (its potentials forbid every outcome, so A(θ) = -inf); "
                    "relax the -inf constraints for that element."
                )

    # ---- derived quantities ----------------------------------------------------------------

    @property
    def log_partition(self) -> Tensor:
        """The log-partition function A(θ) = log Σ_x exp⟨θ, φ(x)⟩, shape ``batch_shape``."""
        value = self._log_normalizer(*self._natural_params)
        self._check_feasible(value)
        return value

    @property
    def mode(self) -> Tensor:
        """Alias of ``argmax`` (torch's name for the most probable value)."""
        return self.argmax

    def _entropy_form(self, mu: tuple[Tensor, ...]) -> Tensor:
        return self.log_partition - _inner(self._natural_params, mu, len(self.batch_shape))

    def _kl_form(self, other: ExpFamily, mu: tuple[Tensor, ...]) -> Tensor:
        nb = len(self.batch_shape)
        difference = _inner(other._natural_params, mu, nb) - _inner(self._natural_params, mu, nb)
        # Where q forbids what p allows, _inner gives -inf and KL is +inf.
        return other.log_partition - self.log_partition - difference

    def entropy(self) -> Tensor:
        """Compute the entropy H(p) = A(θ) − ⟨θ, μ⟩, differentiable in θ.

        The value is a sum of non-negative local terms (accurate in float32 at any size, never
        negative); the gradient, ``−∇²A(θ) θ``, that of the Bregman form (module docstring).

        Returns:
            Tensor of shape ``batch_shape``.
        """
        graph = _needs_graph(self._natural_params)
        mu = self._mean_params  # validates feasibility; differentiable iff graph
        value = self._local_entropy(tuple(m.detach() for m in mu))
        return _value_with_gradient(value, self._entropy_form(mu) if graph else None)

    def cross_entropy(self, other: ExpFamily) -> Tensor:
        """Compute H(p, q) = −E_p[log q(x)] = A(θ_q) − ⟨θ_q, μ_p⟩, with p = ``self``.

        The value is H(p) + KL(p ‖ q), each a sum of non-negative local terms.

        Args:
            other: A distribution q of the same kind on the same sample space.

        Returns:
            Tensor of the broadcast batch shape; ``+inf`` where q forbids what p allows.
        """
        self._check_comparable(other, "cross_entropy")
        graph = _needs_graph(self._natural_params, other._natural_params)
        mu = self._mean_params
        _ = other.log_partition  # validates q's feasibility
        plain = tuple(m.detach() for m in mu)
        value = self._local_entropy(plain) + self._local_kl(other, plain)
        nb = len(self.batch_shape)
        form = other.log_partition - _inner(other._natural_params, mu, nb) if graph else None
        return _value_with_gradient(value, form)

    def kl(self, other: ExpFamily) -> Tensor:
        """Compute KL(p ‖ q) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩ with p = ``self``.

        The value is a sum of non-negative local terms (never negative, 0 exactly when the
        distributions agree); gradients (those of the Bregman form) flow to both p and q.
        ``torch.distributions.kl_divergence(p, q)`` calls this.
        """
        self._check_comparable(other, "kl_divergence")
        graph = _needs_graph(self._natural_params, other._natural_params)
        mu = self._mean_params
        _ = other.log_partition  # validates q's feasibility
        value = self._local_kl(other, tuple(m.detach() for m in mu))
        return _value_with_gradient(value, self._kl_form(other, mu) if graph else None)

    def log_prob(self, value: Tensor) -> Tensor:
        """Compute log p(x) = ⟨θ, φ(x)⟩ − A(θ).

        Args:
            value: Structures shaped ``[*S, *batch, *event]``.

        Returns:
            Tensor ``[*S, *batch]``; ``-inf`` for structures the potentials forbid.
        """
        return self.score(value) - self.log_partition

    def _check_comparable(self, other: object, what: str) -> None:
        if not isinstance(other, ExpFamily):
            raise TypeError(
                f"{what} needs another structift ExpFamily; got {type(other).__name__}."
            )
        if not self._same_support(other):
            raise ValueError(
                f"{what}: {type(self).__name__} with sample space {self._support_key()} and "
                f"{type(other).__name__} with sample space {other._support_key()} are not "
                "defined on the same structures (shapes and lengths must agree)."
            )
        if self.batch_shape != other.batch_shape:
            raise ValueError(
                f"{what}: batch shapes must match; got {tuple(self.batch_shape)} and "
                f"{tuple(other.batch_shape)}."
            )
        p = self._natural_params[0]
        q = other._natural_params[0]
        if p.dtype != q.dtype or p.device != q.device:
            raise TypeError(
                f"{what}: both distributions must share dtype and device; got "
                f"{p.dtype} on {p.device} and {q.dtype} on {q.device}."
            )
