"""The exponential-family contract shared by every structift distribution.

A family has natural parameters θ (a tuple of tensors), sufficient statistics φ(x) with the same
structure, and a log-partition function

    A(θ) = log Σ_x exp⟨θ, φ(x)⟩,

so that p(x) = exp(⟨θ, φ(x)⟩ − A(θ)) (the carrier measure is zero). Everything else follows
from A: the marginals μ = ∇A(θ) = E_p[φ(x)], the entropy H = A − ⟨θ, μ⟩, the cross-entropy
H(p, q) = A(θ_q) − ⟨θ_q, μ_p⟩ and the KL divergence in Bregman form
KL(p ‖ q) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩ (Nielsen & Nock, arXiv:1009.4004).

A family is its natural parameters plus a *structure* (``structift.structures``), which owns
the combinatorics; this base derives every method once from the structure and the two torch
hooks a subclass provides (``structure`` and ``_natural_params``; ``_mean_carrier_measure`` is
0). Subclasses add validation, their parameterization and how marginals are presented
(``_present``).

Values and gradients come from two forms of the same function. The Bregman forms above
subtract numbers of the size of |A(θ)|, which in float32 loses everything for long or peaked
structures (an entropy of 33.8 came out as 205, or negative). So the *value* is the
structure's sum of non-negative local terms (conditional entropies and KLs of softmax rows),
accurate and ``>= 0`` by construction, and the *gradient* is that of the Bregman form, attached
by ``_value_with_gradient``: the returned tensor equals the local value and differentiates (to
any order) as the Bregman form, which is the same function of θ. Its gradient, ``−∇²A(θ) θ``
for the entropy, is a centred Hessian-vector product and does not cancel.

Unlike ``torch.distributions.ExponentialFamily.entropy`` (which detaches the parameters), every
quantity here is differentiable in all natural parameters.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import Distribution, ExponentialFamily

from structift._checks import check_sample_shape
from structift.structures.base import AbstractStructure, Params

__all__ = ["ExpFamily"]

_NEG_INF = float("-inf")


def _is_transformed(tensors: Sequence[object]) -> bool:
    """Whether a tensor is wrapped by a ``torch.func`` transform (vmap, grad, jacrev)."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(isinstance(t, Tensor) and bool(wrapped(t)) for t in tensors)


def _resolve_validate(validate_args: bool | None, *tensors: object) -> bool:
    """Return the effective validation flag.

    ``None`` means torch's global default (``Distribution._validate_args``), except where
    checks that read values cannot run: under ``torch.func`` transforms (vmap has no
    data-dependent control flow) and while ``torch.compile`` traces (they would break the
    graph). Note that the first ``torch.compile`` of a process switches torch's default off for
    the whole process (dynamo's patch of ``torch.distributions``); structift follows torch's
    default, so pass ``validate_args=True`` or call
    ``torch.distributions.Distribution.set_default_validate_args(True)`` to keep checks on.
    """
    if validate_args is not None:
        return bool(validate_args)
    if torch.compiler.is_compiling():
        return False
    return bool(Distribution._validate_args) and not _is_transformed(tensors)


def _inner(theta: Params, mu: Params, batch_dims: int) -> Tensor:
    """Compute ⟨θ, μ⟩ summed over the event dimensions, with ``-inf · 0 = 0``.

    A ``-inf`` natural parameter is a hard constraint: its statistic has zero probability under
    a distribution that respects it, and the product must read 0 rather than NaN. Where μ > 0
    meets θ = −inf (a cross-entropy against a distribution that forbids what p allows) the
    inner product is −inf, so cross-entropy and KL are +inf, as they should be.
    """
    total: Tensor | None = None
    forbidden: Tensor | None = None
    for th, m in zip(theta, mu):
        th = th.expand(m.shape)
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
    if form is None:
        return value
    value = value.to(form.dtype)
    return torch.where(torch.isfinite(value), value + (form - form.detach()), value)


def _needs_graph(*thetas: Params) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for th in thetas for t in th)


class ExpFamily(ExponentialFamily):
    """Abstract base of structift's exponential families.

    Subclasses provide ``structure`` (an ``AbstractStructure``) and the torch hook
    ``_natural_params`` (θ in the structure's layout), validate their arguments, and may
    override ``_present`` (how marginals and statistics are returned). This class derives the
    rest: ``log_partition``, ``marginals``, ``argmax``, ``sample``, ``score``, ``log_prob``,
    ``sufficient_statistics``, ``entropy``, ``cross_entropy``, ``mode`` and the KL divergence
    registered with ``torch.distributions.kl_divergence``.

    Validation (``validate_args``, on by default as in torch) happens in the constructor and in
    the methods that take user input; with ``validate_args=False`` no check runs.
    """

    has_rsample = False
    _value_name = "value"  # what structures are called in error messages

    @property
    def structure(self) -> AbstractStructure:
        """The structure (sample space and its combinatorics) of this distribution."""
        raise NotImplementedError

    @property
    def _natural_params(self) -> Params:
        """The natural parameters θ as a tuple of tensors, in the structure's layout."""
        raise NotImplementedError

    @property
    def _mean_carrier_measure(self) -> float:
        return 0.0

    @property
    def _parameters(self) -> Params:
        """The floating-point tensors the distribution was built from (its learnable inputs)."""
        raise NotImplementedError

    def _replace(self, *parameters: Tensor) -> ExpFamily:
        """The same distribution built from other ``_parameters`` (same shapes), unvalidated."""
        raise NotImplementedError

    def _present(self, mu: Params) -> Any:
        """Marginals or statistics as returned to the user (a tensor, or a NamedTuple)."""
        return mu[0] if len(mu) == 1 else mu

    # ---- derived from the structure --------------------------------------------------------

    def _log_normalizer(self, *natural_params: Tensor) -> Tensor:
        return self.structure.log_partition(tuple(natural_params))

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

    @property
    def log_partition(self) -> Tensor:
        """The log-partition function A(θ) = log Σ_x exp⟨θ, φ(x)⟩, shape ``batch_shape``."""
        value = self._log_normalizer(*self._natural_params)
        self._check_feasible(value)
        return value

    def _posterior(self, theta: Params | None = None) -> tuple[Tensor, Params]:
        """``(A(θ), μ)``, μ differentiable where gradients are enabled; feasibility checked."""
        theta = self._natural_params if theta is None else theta
        log_z, mu = self.structure.posterior(theta, create_graph=_needs_graph(theta))
        self._check_feasible(log_z)  # infeasible exactly where A = -inf
        return log_z, mu

    @property
    def _mean_params(self) -> Params:
        return self._posterior()[1]

    @property
    def marginals(self) -> Any:
        """The marginals μ = ∇A(θ) = E_p[φ(x)], with the structure of the natural parameters.

        Differentiable in the parameters (for Hessian-vector products) whenever gradients are
        enabled and a parameter requires grad; read them under ``torch.no_grad()`` when you do
        not differentiate through them (the differentiable path keeps more memory).
        """
        return self._present(self._mean_params)

    @property
    def argmax(self) -> Tensor:
        """The most probable structure (MAP), shape ``[*batch, *event]``."""
        with torch.no_grad():
            value, best = self.structure.argmax(self._natural_params)
        self._check_feasible(best)
        return value

    def topk(self, k: int) -> tuple[Tensor, Tensor]:
        """Return the ``k`` most probable structures and their scores, best first.

        Exact (the structure's own k-best algorithm), ties broken as its docstring says (for
        ``k = 1`` as ``argmax``).

        Args:
            k: how many, an int ``>= 1``; ``k`` may exceed the number of structures.

        Returns:
            ``(values [k, *batch, *event], scores [k, *batch])``; ``scores`` are
            ``score(values)``, differentiable. Ranks beyond the number of structures of finite
            score hold score ``-inf`` and value ``structure.padding_value`` (0 for tag sequences,
            -1 for trees and segmentations).

        Raises:
            TypeError: ``k`` is not an int.
            ValueError: ``k < 1``; or (with validation) some element has no structure of finite
                score.
        """
        try:
            if isinstance(k, bool):
                raise TypeError
            k = operator.index(k)
        except TypeError:
            raise TypeError(
                f"topk: k must be an int >= 1 (how many structures); got {k!r} of type "
                f"{type(k).__name__}."
            ) from None
        if k < 1:
            raise ValueError(f"topk: k must be >= 1 (how many structures); got k = {k}.")
        values, scores = self.structure.topk(self._natural_params, k)
        self._check_feasible(scores[0].detach())
        return values, scores

    @property
    def mode(self) -> Tensor:
        """Alias of ``argmax`` (torch's name for the most probable value)."""
        return self.argmax

    @property
    def max_score(self) -> Tensor:
        """The score ⟨θ, φ(argmax)⟩ of the MAP structure, shape ``batch_shape`` (differentiable)."""
        return self.score(self.argmax)

    def _check_value(self, value: Tensor) -> None:
        if self._validate_args:
            self.structure.check_value(self._value_name, value, self._natural_params[0].device)

    def score(self, value: Tensor) -> Tensor:
        """Compute the unnormalized log-probability ⟨θ, φ(x)⟩ of ``[*S, *batch, *event]``.

        Returns:
            Tensor ``[*S, *batch]``; ``-inf`` for structures the potentials forbid.
        """
        self._check_value(value)
        return self.structure.score(self._natural_params, value)

    def sufficient_statistics(self, value: Tensor) -> Any:
        """Compute φ(x) for structures ``[*S, *batch, *event]``, laid out like the marginals."""
        self._check_value(value)
        dtype = self._natural_params[0].dtype
        return self._present(self.structure.statistics(value, dtype))

    def log_prob(self, value: Tensor) -> Tensor:
        """Compute log p(x) = ⟨θ, φ(x)⟩ − A(θ) for structures ``[*S, *batch, *event]``.

        Returns:
            Tensor ``[*S, *batch]``; ``-inf`` for structures the potentials forbid.
        """
        return self.score(value) - self.log_partition

    def sample(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw exact samples ``[*sample_shape, *batch, *event]`` (no gradient).

        Args:
            sample_shape: Leading shape S of the draw (non-negative ints).
            generator: Optional ``torch.Generator`` for reproducible draws.
        """
        shape = check_sample_shape(sample_shape)
        if self._validate_args:
            _ = self.log_partition  # raises if some element has no finite-score structure
        return self.structure.sample(self._natural_params, shape, generator)

    # ---- entropy, cross-entropy, KL --------------------------------------------------------

    def entropy(self) -> Tensor:
        """Compute the entropy H(p) = A(θ) − ⟨θ, μ⟩, differentiable in θ.

        The value is a sum of non-negative local terms (accurate in float32 at any size, never
        negative); the gradient, ``−∇²A(θ) θ``, that of the Bregman form (module docstring).

        Returns:
            Tensor of shape ``batch_shape``.
        """
        theta = self._natural_params
        log_z, mu = self._posterior(theta)
        value = self.structure.entropy(theta, tuple(m.detach() for m in mu))
        form = log_z - _inner(theta, mu, len(self.batch_shape)) if _needs_graph(theta) else None
        return _value_with_gradient(value, form)

    def cross_entropy(self, other: ExpFamily) -> Tensor:
        """Compute H(p, q) = −E_p[log q(x)] = A(θ_q) − ⟨θ_q, μ_p⟩, with p = ``self``.

        The value is H(p) + KL(p ‖ q), each a sum of non-negative local terms.

        Args:
            other: A distribution q of the same kind on the same sample space.

        Returns:
            Tensor of the batch shape; ``+inf`` where q forbids what p allows.
        """
        self._check_comparable(other, "cross_entropy")
        theta_p, theta_q = self._natural_params, other._natural_params
        _, mu = self._posterior(theta_p)
        log_zq = other.log_partition  # validates q's feasibility
        plain = tuple(m.detach() for m in mu)
        value = self.structure.entropy(theta_p, plain) + self.structure.kl(theta_p, theta_q, plain)
        nb = len(self.batch_shape)
        graph = _needs_graph(theta_p, theta_q)
        return _value_with_gradient(value, log_zq - _inner(theta_q, mu, nb) if graph else None)

    def kl(self, other: ExpFamily) -> Tensor:
        """Compute KL(p ‖ q) = A(θ_q) − A(θ_p) − ⟨θ_q − θ_p, μ_p⟩ with p = ``self``.

        The value is a sum of non-negative local terms (never negative, 0 exactly when the
        distributions agree); gradients (those of the Bregman form) flow to both p and q.
        ``torch.distributions.kl_divergence(p, q)`` calls this.
        """
        self._check_comparable(other, "kl_divergence")
        theta_p, theta_q = self._natural_params, other._natural_params
        log_zp, mu = self._posterior(theta_p)
        log_zq = other.log_partition  # validates q's feasibility
        value = self.structure.kl(theta_p, theta_q, tuple(m.detach() for m in mu))
        form = None
        if _needs_graph(theta_p, theta_q):
            nb = len(self.batch_shape)
            form = log_zq - log_zp - (_inner(theta_q, mu, nb) - _inner(theta_p, mu, nb))
        return _value_with_gradient(value, form)

    def _check_comparable(self, other: object, what: str) -> None:
        if not isinstance(other, ExpFamily):
            raise TypeError(
                f"{what} needs another structift ExpFamily; got {type(other).__name__}."
            )
        if not self.structure.same_space(other.structure):
            raise ValueError(
                f"{what}: {type(self).__name__} on {self.structure.describe()} and "
                f"{type(other).__name__} on {other.structure.describe()} are not defined on the "
                "same structures (shapes and lengths must agree)."
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
