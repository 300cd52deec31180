"""Hidden Markov models: the posterior over hidden states as an exponential family."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.distributions import constraints

from structift._checks import (
    LOG_POTENTIAL,
    check_expand_shape,
    check_float_tensor,
    check_index_tensor,
    check_lengths,
    check_log_potential,
    check_same_dtype_device,
    check_sample_shape,
    lengths_from,
    promote_under_autocast,
)
from structift._ops import lengths_to_mask
from structift.families.base import ExpFamily, _resolve_validate
from structift.families.crf import ChainMarginals, LinearChainCRF
from structift.structures.chain import BackendSpec, Chain

__all__ = ["HMM", "emission_unary"]


def _check_parameter(name: str, x: Tensor, trailing: tuple[int, ...], batch: int) -> None:
    """Check an HMM parameter: shape ``[*trailing]`` or ``[B, *trailing]``, rows not all -inf."""
    shape = tuple(x.shape)
    layout = "[" + ", ".join(str(s) for s in trailing) + "]"
    if shape != trailing and shape != (batch, *trailing):
        raise ValueError(
            f"{name} must have shape {layout} or [B, *{layout}] with B = {batch}; got {shape}."
        )
    check_log_potential(name, x)
    empty = (x == float("-inf")).all(-1)
    if bool(empty.any()):
        index = tuple(int(i) for i in empty.nonzero()[0])
        raise ValueError(
            f"{name} must have at least one finite logit in every row (rows are normalised by "
            f"softmax); {name}[{index}] is all -inf."
        )


def emission_unary(
    init_logits: Tensor, emission_logits: Tensor, observations: Tensor, lengths: Tensor
) -> Tensor:
    """``unary[b, t, z] = log p(x_t | z)`` (+ ``log p(z_0 = z)`` at t = 0), ``[B, T, Z]``."""
    B, T = observations.shape
    Z = emission_logits.shape[-2]
    log_init = torch.log_softmax(init_logits, -1)  # shape: ([B,] Z)
    log_emission = torch.log_softmax(emission_logits, -1)  # shape: ([B,] Z, V)
    mask = lengths_to_mask(lengths, T)
    safe_obs = torch.where(mask, observations, torch.zeros_like(observations))
    if log_emission.dim() == 2:  # shared: index rows of [V, Z], never a [B, V, Z] expansion
        unary = log_emission.T[safe_obs]  # shape: (B, T, Z)
    else:  # gather along V from the [B, V, Z] transpose
        emission_t = log_emission.transpose(-1, -2)
        unary = emission_t.gather(1, safe_obs.unsqueeze(-1).expand(B, T, Z))  # (B, T, Z)
    first = unary[:, :1] + log_init.reshape(-1, 1, Z)
    return torch.cat([first, unary[:, 1:]], dim=1)


def check_observations(observations: object) -> None:
    """Raise unless ``observations`` is a 2-D tensor ``[B, T]`` (its values are checked later)."""
    if not isinstance(observations, Tensor) or observations.dim() != 2:
        shape = tuple(observations.shape) if isinstance(observations, Tensor) else None
        raise ValueError(
            f"observations must be a LongTensor of shape [B, T]; got "
            f"{type(observations).__name__} of shape {shape}."
        )


def observation_lengths(
    observations: Tensor,
    lengths: Tensor | None,
    mask: Tensor | None,
    num_observations: int,
    device: torch.device,
    validate: bool,
) -> Tensor:
    """The ``lengths [B]`` (LongTensor) of ``observations [B, T]`` from ``lengths`` or ``mask``
    (default: all T), with the lengths and the observed values in ``[0, V)`` validated."""
    B, T = observations.shape
    out = lengths_from(lengths, mask, B, T, device)
    if out is None:
        out = torch.full((B,), T, dtype=torch.long, device=device)
    elif validate:
        check_lengths(out, B, T, device)
    if validate:
        valid = lengths_to_mask(out, T)  # shape: (B, T)
        check_index_tensor("observations", observations, (B, T), num_observations, device, valid)
    return out.long()


class HMM(ExpFamily):
    """A hidden Markov model, seen as the posterior over hidden states z given observations x.

    The generative model (rows normalised by softmax):

        p(z_0) = softmax(init_logits)[z_0],
        p(z_{t+1} | z_t) = softmax(transition_logits[z_t])[z_{t+1}],
        p(x_t | z_t) = softmax(emission_logits[z_t])[x_t].

    The posterior p(z | x) is a linear-chain CRF with
    unary[b, t, z] = log p(x_t | z) (+ log p(z_0 = z) at t = 0) and binary = log p(z' | z), and
    its log-partition is the evidence: A(θ) = log Σ_z p(x, z) = log p(x). So ``log_partition``
    is log p(x) per sequence, and ``marginals``, ``argmax``, ``entropy``, ``log_prob`` and
    ``sample`` are those of the hidden states given x (`posterior`). ``sample_joint``
    draws (x, z) from the generative model.

    Args:
        init_logits: ``[Z]`` or ``[B, Z]``.
        transition_logits: ``[Z, Z]`` or ``[B, Z, Z]``, laid out ``[from, to]``; or a
            ``LowRankTransition`` (``structift.families.lowrank``: O(T Z r) inference).
        emission_logits: ``[Z, V]`` or ``[B, Z, V]``; or a ``BlockedEmission``
            (``structift.families.blocked``: each word emitted by its cluster's states only;
            combined with a ``LowRankTransition``, a step costs ``O(S^2 r)``, S states a
            cluster).
        observations: LongTensor ``[B, T]`` with values in ``[0, V)`` within each length
            (padding may hold anything, e.g. -100).
        lengths: LongTensor ``[B]`` with ``1 <= lengths[b] <= T``; ``None`` means all ``T``.
        validate_args: Check the arguments (torch's default when ``None``, i.e. on).
        mask: BoolTensor ``[B, T]``, a prefix mask, instead of ``lengths``.
        backend: the chain backend of the posterior (see ``LinearChainCRF``).
    """

    _value_name = "tags"

    def __new__(cls, *args: Any, **kwargs: Any) -> HMM:
        # A parameterization given as a value selects its family (same API).
        from structift.families.blocked import BlockedEmission, BlockedHMM
        from structift.families.lowrank import LowRankHMM, LowRankTransition

        transition = args[1] if len(args) > 1 else kwargs.get("transition_logits")
        emission = args[2] if len(args) > 2 else kwargs.get("emission_logits")
        low_rank, blocked = (
            isinstance(transition, LowRankTransition),
            isinstance(emission, BlockedEmission),
        )
        if cls is not HMM or not (low_rank or blocked):
            return super().__new__(cls)
        return super().__new__(BlockedHMM if blocked else LowRankHMM)

    def __init__(
        self,
        init_logits: Tensor,
        transition_logits: Tensor,
        emission_logits: Tensor,
        observations: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        mask: Tensor | None = None,
        backend: BackendSpec = None,
    ) -> None:
        init_logits, transition_logits, emission_logits = promote_under_autocast(
            init_logits, transition_logits, emission_logits
        )
        validate = _resolve_validate(validate_args, init_logits, transition_logits, emission_logits)
        if validate:
            check_float_tensor("init_logits", init_logits)
            check_float_tensor("transition_logits", transition_logits)
            check_float_tensor("emission_logits", emission_logits)
            check_same_dtype_device(
                "init_logits",
                init_logits,
                transition_logits=transition_logits,
                emission_logits=emission_logits,
            )
            check_observations(observations)
        B, T = observations.shape
        Z, V = emission_logits.shape[-2:]
        device = init_logits.device
        if validate:
            if T < 1 or Z < 1 or V < 1:
                raise ValueError(f"need T, Z, V >= 1; got T={T}, Z={Z}, V={V}.")
            _check_parameter("init_logits", init_logits, (Z,), B)
            _check_parameter("transition_logits", transition_logits, (Z, Z), B)
            _check_parameter("emission_logits", emission_logits, (Z, V), B)
        lengths = observation_lengths(observations, lengths, mask, V, device, validate)
        self.init_logits = init_logits
        self.transition_logits = transition_logits
        self.emission_logits = emission_logits
        self.observations = observations
        self.lengths = lengths
        self.num_observations = V
        like = emission_logits.new_empty(0, T, Z)  # the posterior's shape and device
        self._structure = Chain.build(like, self.lengths, backend)

        super().__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    @property
    def posterior(self) -> LinearChainCRF:
        """The posterior p(z | x) as a LinearChainCRF over the hidden states.

        Built afresh on each access (an O(B·T·Z) gather) so that every use has its own autograd
        graph back to the logits; reuse the returned object to avoid rebuilding.
        """
        unary, binary = self._evidence_params()  # binary broadcast over time and batch
        return LinearChainCRF(
            unary, binary, self.lengths, validate_args=False, backend=self._structure.backend
        )

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "init_logits": constraints.independent(LOG_POTENTIAL, 1),
            "transition_logits": constraints.independent(LOG_POTENTIAL, 2),
            "emission_logits": constraints.independent(LOG_POTENTIAL, 2),
        }

    @property
    def num_states(self) -> int:
        """The number Z of hidden states."""
        return self.emission_logits.shape[-2]

    @property
    def support(self) -> Any:
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)

    def expand(self, batch_shape: Any, _instance: Any = None) -> HMM:
        """Return the HMM with batch shape ``batch_shape`` (broadcast views, no copy).

        One batch dimension, as torch's ``expand``: ``[B]`` stays ``[B]`` and ``[1]`` becomes
        any ``[n]``; parameters given without a batch dimension stay shared.
        """
        B, T = self.observations.shape
        n = check_expand_shape("HMM", batch_shape, B)

        def grow(x: Any, event_dims: int) -> Any:
            # Parameterization objects (LowRankTransition, BlockedEmission) are batch-shared.
            if isinstance(x, Tensor) and x.dim() > event_dims:
                return x.expand(n, *x.shape[1:])
            return x

        init, transition, emission = self._generative_parameters()
        return type(self)(
            grow(init, 1),
            grow(transition, 2),
            grow(emission, 2),
            self.observations.expand(n, T),
            self.lengths.expand(n),
            validate_args=self._validate_args,
            backend=self._backend_spec(),
        )

    def _generative_parameters(self) -> tuple[Any, Any, Any]:
        """``(init, transition, emission)`` as the constructor takes them."""
        return self.init_logits, self.transition_logits, self.emission_logits

    def _backend_spec(self) -> BackendSpec:
        """The chain backend this HMM was built with (for `expand`)."""
        return self.structure.backend

    # ---- exponential-family hooks: those of the posterior ----------------------------------

    @property
    def structure(self) -> Chain:
        return self._structure

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return self.posterior._natural_params

    @property
    def log_partition(self) -> Tensor:
        """log p(x) per sequence ``[B]`` (the posterior's log-partition A(θ)).

        The chain gets the shared ``log P`` at its broadcast shape ``[1 or B, 1, Z, Z]``
        rather than expanded over the steps, so the gradient to it is summed over steps inside
        the kernel (per sequence, ``[B, 1, Z, Z]``) and no ``[B, T-1, Z, Z]`` buffer exists:
        ``O(B T Z + B Z^2)`` memory for training by ``log p(x)``, instead of ``O(B T Z^2)``.
        """
        value = self._log_normalizer(*self._evidence_params())
        self._check_feasible(value)
        return value

    def _evidence_params(self) -> tuple[Tensor, ...]:
        """θ with the transition block at its broadcast shape (see `log_partition`)."""
        Z = self.num_states
        unary = emission_unary(
            self.init_logits, self.emission_logits, self.observations, self.lengths
        )
        binary = torch.log_softmax(self.transition_logits, -1).reshape(-1, 1, Z, Z)
        return unary, binary

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.init_logits, self.transition_logits, self.emission_logits)

    def _replace(self, *parameters: Tensor) -> HMM:
        init, transition, emission = parameters
        return HMM(
            init, transition, emission, self.observations, self.lengths,
            validate_args=False, backend=self.structure.backend,
        )  # fmt: skip

    def _present(self, mu: tuple[Tensor, ...]) -> ChainMarginals:
        return ChainMarginals(mu[0], mu[1])

    @property
    def marginals(self) -> ChainMarginals:
        """Posterior marginals of the hidden states: ``ChainMarginals([B,T,Z], [B,T-1,Z,Z])``."""
        return self._present(self._mean_params)

    @property
    def argmax(self) -> Tensor:
        """The most probable hidden states given x (Viterbi), ``[B, T]``, 0 beyond lengths."""
        return super().argmax

    def score(self, value: Tensor) -> Tensor:
        """Compute log p(x, z) for hidden states z (``[*S, B, T]``) -> ``[*S, B]``."""
        return super().score(value)

    def sample_joint(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw (x, z) from the generative model with this HMM's parameters and lengths.

        The observations given to the constructor are not used (pass any LongTensor ``[B, T]``,
        e.g. zeros, to set the shape). Ancestral sampling: z_0, then z_t | z_{t-1} and
        x_t | z_t.

        Args:
            sample_shape: Leading shape S.
            generator: Optional ``torch.Generator`` for reproducible draws.

        Returns:
            ``(observations, states)``, both LongTensor ``[*S, B, T]`` with 0 beyond lengths.
        """
        shape = check_sample_shape(sample_shape)
        B, T = self.observations.shape
        Z, V = self.num_states, self.num_observations
        n = max(shape.numel(), 1)
        with torch.no_grad():
            # Parameters as [B, ...] so every draw indexes its own sequence's rows.
            init = torch.softmax(self.init_logits, -1).reshape(-1, Z).expand(B, Z)
            trans = torch.softmax(self.transition_logits, -1).reshape(-1, Z, Z).expand(B, Z, Z)
            emit = torch.softmax(self.emission_logits, -1).reshape(-1, Z, V).expand(B, Z, V)
            rows = torch.arange(B, device=init.device).repeat(n)  # shape: (n * B,)

            def draw(probs: Tensor) -> Tensor:
                return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

            states = [draw(init[rows])]
            for _ in range(1, T):
                states.append(draw(trans[rows, states[-1]]))
            z = torch.stack(states, -1)  # shape: (n * B, T)
            x = torch.stack([draw(emit[rows, z[:, t]]) for t in range(T)], -1)
            mask = lengths_to_mask(self.lengths, T).repeat(n, 1)
            z = torch.where(mask, z, torch.zeros_like(z))
            x = torch.where(mask, x, torch.zeros_like(x))
        return x.reshape((*shape, B, T)), z.reshape((*shape, B, T))
