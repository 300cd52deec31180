"""Low-rank HMM transitions (Chiu, Deng & Rush, arXiv:2201.02715), as a value for ``st.HMM``.

``LowRankTransition(u, v)`` with ``u, v`` ``[Z, r]`` represents the row-normalised kernel

    P[i, j] = Σ_k φ(u)_{ik} φ(v)_{jk} / Σ_{j'} Σ_k φ(u)_{ik} φ(v)_{j'k},   φ(x) = exp(x),

non-negative features by construction. It factors as ``P = A B`` with both factors
row-stochastic: ``B[k, j] = softmax_j(v[:, k])`` and ``A[i, k] = softmax_k(u[i, :] + c)`` with
``c_k = logsumexp_j v[j, k]``, so ``st.HMM(init, LowRankTransition(u, v), emission, x)`` is an
HMM whose forward-backward costs ``O(T Z r)`` (``structift.structures.chain.lowrank``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributions import constraints

from structift._checks import (
    LOG_POTENTIAL,
    check_float_tensor,
    check_same_dtype_device,
    check_sample_shape,
    promote_under_autocast,
)
from structift._ops import lengths_to_mask
from structift.families.base import _needs_graph, _resolve_validate, _value_with_gradient
from structift.families.crf import LinearChainCRF
from structift.families.hmm import (
    HMM,
    _check_parameter,
    check_observations,
    emission_unary,
    observation_lengths,
)
from structift.structures.chain import BackendSpec
from structift.structures.chain.lowrank import LowRankChain, materialize

__all__ = ["LowRankHMM", "LowRankMarginals", "LowRankTransition"]


class LowRankTransition:
    """A rank-``r`` row-stochastic transition matrix ``P = A B`` from parameters ``u, v``.

    Args:
        u: ``[Z, r]`` logits of the "from" features (finite floats).
        v: ``[Z, r]`` logits of the "to" features (finite floats), same dtype and device.

    Raises:
        TypeError: ``u`` or ``v`` is not a floating-point tensor.
        ValueError: shapes differ or are not ``[Z, r]`` with ``1 <= r <= Z``, or an entry is
            NaN or infinite.
    """

    def __init__(self, u: Tensor, v: Tensor) -> None:
        check_float_tensor("u", u)
        check_float_tensor("v", v)
        check_same_dtype_device("u", u, v=v)
        for name, x in (("u", u), ("v", v)):
            if x.dim() != 2:
                raise ValueError(
                    f"LowRankTransition: {name} must have shape [Z, r] (states, rank); got "
                    f"{tuple(x.shape)}."
                )
        if u.shape != v.shape:
            raise ValueError(
                f"LowRankTransition: u and v must have the same shape [Z, r]; got u "
                f"{tuple(u.shape)} and v {tuple(v.shape)}."
            )
        Z, r = u.shape
        if not 1 <= r <= Z:
            raise ValueError(
                f"LowRankTransition: the rank r = {r} (u.shape[1]) must be in [1, Z] with "
                f"Z = {Z} states; a rank above Z gains nothing over dense transition_logits."
            )
        for name, x in (("u", u), ("v", v)):
            bad = ~torch.isfinite(x.detach())
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"LowRankTransition: {name} must be finite (features are exp({name})); "
                    f"{name}[{index}] = {float(x.detach()[index])}."
                )
        self.u, self.v = u, v

    @property
    def num_states(self) -> int:
        """Z."""
        return int(self.u.shape[0])

    @property
    def rank(self) -> int:
        """r."""
        return int(self.u.shape[1])

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(log A [Z, r], log B [r, Z])``, both row-normalised: ``P = A @ B``."""
        log_b = torch.log_softmax(self.v, 0).T  # B[k, j] = softmax_j(v[:, k])
        c = torch.logsumexp(self.v, 0)  # shape: (r,)
        log_a = torch.log_softmax(self.u + c, -1)
        return log_a, log_b

    def log_probs(self) -> Tensor:
        """The ``[Z, Z]`` row-normalised log-transition matrix ``log P`` (small Z only)."""
        return materialize(*self.factors())


class LowRankMarginals(NamedTuple):
    """Posterior marginals of a low-rank HMM, the transition statistics in factored form.

    Attributes:
        unary: ``[B, T, Z]``, ``p(z_t = i | x)``, zero beyond lengths.
        state_feature: ``[B, Z, r]``, ``E[#{t : z_t = i, k_t = k} | x]``.
        feature_state: ``[B, r, Z]``, ``E[#{t : k_t = k, z_{t+1} = j} | x]``.

    ``k_t`` is the rank index of the step ``t -> t+1`` in ``P = A B``. Summing
    ``state_feature`` over ``k`` gives the expected number of transitions out of ``i``.
    """

    unary: Tensor
    state_feature: Tensor
    feature_state: Tensor


class LowRankHMM(HMM):
    """An HMM whose transitions are a ``LowRankTransition``; build it as ``st.HMM(...)``.

    Same arguments and meaning as ``HMM`` with ``transition_logits`` a ``LowRankTransition``
    (shared by the batch). ``log_partition`` (log p(x)), ``marginals``, ``entropy``,
    ``sample``, ``score``/``log_prob``, ``argmax`` and ``sample_joint`` are exact; the costs
    are in ``structift.structures.chain.lowrank`` (Viterbi materializes ``[Z, Z]``).
    ``kl``, ``cross_entropy`` and ``sufficient_statistics`` are not available.
    """

    def __init__(
        self,
        init_logits: Tensor,
        transition_logits: LowRankTransition,
        emission_logits: Tensor,
        observations: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        mask: Tensor | None = None,
        backend: BackendSpec = None,
    ) -> None:
        transition = transition_logits
        u, v = transition.u, transition.v
        init_logits, emission_logits, u, v = promote_under_autocast(
            init_logits, emission_logits, u, v
        )
        validate = _resolve_validate(validate_args, init_logits, emission_logits, u, v)
        if validate:
            check_float_tensor("init_logits", init_logits)
            check_float_tensor("emission_logits", emission_logits)
            check_same_dtype_device(
                "init_logits", init_logits, emission_logits=emission_logits, u=u
            )
            check_observations(observations)
        B, T = observations.shape
        Z, V = emission_logits.shape[-2:]
        if validate:
            if T < 1 or V < 1:
                raise ValueError(f"need T, V >= 1; got T={T}, V={V}.")
            if transition.num_states != Z:
                raise ValueError(
                    f"transition_logits: the LowRankTransition has Z = {transition.num_states} "
                    f"states (u.shape[0]) but emission_logits has Z = {Z} (shape[-2]); they "
                    "must agree."
                )
            _check_parameter("init_logits", init_logits, (Z,), B)
            _check_parameter("emission_logits", emission_logits, (Z, V), B)
        lengths = observation_lengths(observations, lengths, mask, V, init_logits.device, validate)
        self.init_logits, self.emission_logits = init_logits, emission_logits
        self.transition = LowRankTransition(u, v) if u is not transition.u else transition
        self.transition_logits = self.transition  # type: ignore[assignment]  # its HMM name
        self.observations, self.lengths = observations, lengths
        self.num_observations = V
        self._structure = LowRankChain(self.lengths, T, Z, backend)  # type: ignore[assignment]
        super(HMM, self).__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    @property
    def posterior(self) -> LinearChainCRF:
        """p(z | x) as a dense ``LinearChainCRF`` on the materialized ``[Z, Z]`` matrix.

        ``O(Z^2)`` memory and ``O(T Z^2)`` per sequence: for small Z and checks only.
        """
        Z = self.num_states
        unary = emission_unary(
            self.init_logits, self.emission_logits, self.observations, self.lengths
        )
        binary = self.transition.log_probs().reshape(1, 1, Z, Z)
        return LinearChainCRF(unary, binary, self.lengths, validate_args=False)

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "init_logits": constraints.independent(LOG_POTENTIAL, 1),
            "emission_logits": constraints.independent(LOG_POTENTIAL, 2),
        }

    def _generative_parameters(self) -> tuple[Any, Any, Any]:
        return self.init_logits, self.transition, self.emission_logits

    def _backend_spec(self) -> BackendSpec:
        return self.structure._backend

    @property
    def structure(self) -> LowRankChain:  # type: ignore[override]
        return self._structure  # type: ignore[return-value]

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        unary = emission_unary(
            self.init_logits, self.emission_logits, self.observations, self.lengths
        )
        return (unary, *self.transition.factors())

    def _evidence_params(self) -> tuple[Tensor, ...]:
        return self._natural_params

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.init_logits, self.transition.u, self.transition.v, self.emission_logits)

    def _replace(self, *parameters: Tensor) -> LowRankHMM:
        init, u, v, emission = parameters
        return LowRankHMM(
            init, LowRankTransition(u, v), emission, self.observations, self.lengths,
            validate_args=False, backend=self.structure._backend,
        )  # fmt: skip

    def _present(self, mu: tuple[Tensor, ...]) -> LowRankMarginals:  # type: ignore[override]
        return LowRankMarginals(*mu)

    @property
    def marginals(self) -> LowRankMarginals:  # type: ignore[override]
        """State marginals and factored transition counts (``LowRankMarginals``)."""
        return self._present(self._mean_params)

    def entropy(self) -> Tensor:
        """Compute H(z | x) ``[B]``: non-negative local terms, gradient of the exact form.

        ``O(B T Z^2)`` time (``log P`` does not factor through the rank; see
        ``LowRankChain.entropy``); differentiable in every parameter.
        """
        theta = self._natural_params
        value = self.structure.entropy(theta, ())
        form = self.structure.differentiable_entropy_form(theta) if _needs_graph(theta) else None
        return _value_with_gradient(value, form)

    def cross_entropy(self, other: Any) -> Tensor:
        raise NotImplementedError(
            "cross_entropy is not implemented for low-rank HMMs; build a dense HMM from "
            "transition.log_probs() (small Z) to compare distributions."
        )

    def kl(self, other: Any) -> Tensor:
        raise NotImplementedError(
            "kl is not implemented for low-rank HMMs; build a dense HMM from "
            "transition.log_probs() (small Z) to compare distributions."
        )

    def sample_joint(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw (x, z) from the generative model: ``k ~ A[z_t]``, ``z_{t+1} ~ B[k]``, O(Z + r)."""
        shape = check_sample_shape(sample_shape)
        B, T = self.observations.shape
        Z, V = self.num_states, self.num_observations
        n = max(shape.numel(), 1)
        with torch.no_grad():
            log_a, log_b = self.transition.factors()
            a, b = log_a.exp(), log_b.exp()
            init = torch.softmax(self.init_logits, -1).reshape(-1, Z).expand(B, Z)
            emit = torch.softmax(self.emission_logits, -1).reshape(-1, Z, V).expand(B, Z, V)
            rows = torch.arange(B, device=init.device).repeat(n)  # shape: (n * B,)

            def draw(probs: Tensor) -> Tensor:
                return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

            states = [draw(init[rows])]
            for _ in range(1, T):
                states.append(draw(b[draw(a[states[-1]])]))
            z = torch.stack(states, -1)  # shape: (n * B, T)
            x = torch.stack([draw(emit[rows, z[:, t]]) for t in range(T)], -1)
            mask = lengths_to_mask(self.lengths, T).repeat(n, 1)
            z = torch.where(mask, z, torch.zeros_like(z))
            x = torch.where(mask, x, torch.zeros_like(x))
        return x.reshape((*shape, B, T)), z.reshape((*shape, B, T))
