"""Blocked emissions (Chiu & Rush, arXiv:2011.04640 §3), as a value for ``st.HMM``.

``BlockedEmission(logits, clusters, num_clusters)`` partitions the ``Z`` states into
``M = num_clusters`` blocks of ``S = Z / M`` consecutive states and the vocabulary into the same
``M`` clusters (``clusters[w]`` is word ``w``'s cluster); a state emits only the words of its
own cluster:

    p(x = w | z) = softmax over {w' : clusters[w'] = c(z)} of logits[z, w'],  0 elsewhere,

with ``c(z) = z // S``. Observing ``x_t`` therefore pins ``z_t`` to the block of ``clusters[x_t]``,
and forward-backward runs over the ``S`` states of each step's block: ``O(T S^2)`` per
sequence instead of ``O(T Z^2)`` (``structift.structures.chain.blocked``).
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
    check_log_potential,
    check_same_dtype_device,
)
from structift._ops import lengths_to_mask
from structift.families.base import _resolve_validate
from structift.families.crf import LinearChainCRF
from structift.families.hmm import HMM, _check_parameter, check_observations, observation_lengths
from structift.structures.chain import BackendSpec, Chain
from structift.structures.chain.blocked import BlockedChain

__all__ = ["BlockedEmission", "BlockedHMM", "BlockedMarginals", "state_dropout"]


class BlockedEmission:
    """Emission logits ``[Z, V]`` restricted to a word -> cluster partition.

    Args:
        logits: ``[Z, V]`` emission logits (only entries of a state's own cluster are used).
        clusters: LongTensor ``[V]``, ``clusters[w]`` in ``[0, num_clusters)``.
        num_clusters: M; ``Z`` must be a multiple of ``M`` (block ``c`` holds states
            ``c S .. c S + S - 1``) and every cluster must hold at least one word.

    Raises:
        TypeError: ``logits`` is not a float tensor or ``clusters`` not an integer tensor.
        ValueError: shapes disagree, ``Z % M != 0``, a word outside every cluster, an empty
            cluster, NaN/``+inf`` logits, or a state with no finite logit in its cluster.
    """

    def __init__(self, logits: Tensor, clusters: Tensor, num_clusters: int) -> None:
        check_float_tensor("logits", logits)
        if logits.dim() != 2:
            raise ValueError(
                f"BlockedEmission: logits must have shape [Z, V]; got {tuple(logits.shape)}."
            )
        Z, V = logits.shape
        if not isinstance(num_clusters, int) or not 1 <= num_clusters <= Z or Z % num_clusters:
            raise ValueError(
                f"BlockedEmission: num_clusters must be an int dividing Z = {Z} (equal blocks "
                f"of states); got {num_clusters!r}."
            )
        if (
            not isinstance(clusters, Tensor)
            or clusters.is_floating_point()
            or clusters.is_complex()
        ):
            raise TypeError(
                f"BlockedEmission: clusters must be a LongTensor [V] of cluster ids; got "
                f"{type(clusters).__name__} {getattr(clusters, 'dtype', '')}."
            )
        if tuple(clusters.shape) != (V,) or clusters.device != logits.device:
            raise ValueError(
                f"BlockedEmission: clusters must have shape [V] = [{V}] (one cluster per word "
                f"of logits [Z, V]) on {logits.device}; got {tuple(clusters.shape)} on "
                f"{clusters.device}."
            )
        outside = (clusters < 0) | (clusters >= num_clusters)
        if bool(outside.any()):
            w = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: word {w} is outside every cluster: clusters[{w}] = "
                f"{int(clusters[w])}, expected a cluster id in [0, {num_clusters})."
            )
        sizes = torch.bincount(clusters, minlength=num_clusters)
        if bool((sizes == 0).any()):
            c = int((sizes == 0).nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: cluster {c} has no words (clusters never equals {c}); its "
                "states could emit nothing. Use fewer clusters or assign words to it."
            )
        check_log_potential("logits", logits)
        self.logits, self.clusters, self.num_clusters = logits, clusters, num_clusters
        self.block_size = Z // num_clusters
        finite = torch.isfinite(self.log_normalizer().detach())
        if not bool(finite.all()):
            z = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: state {z} (cluster {z // self.block_size}) has no finite "
                "logit among its cluster's words (its emission row is all -inf)."
            )

    def log_normalizer(self) -> Tensor:
        """``log Σ_{w in c(z)} exp(logits[z, w])`` ``[Z]``, one ``[S, V_c]`` block per cluster."""
        S = self.block_size
        parts = []
        for c in range(self.num_clusters):
            words = (self.clusters == c).nonzero().squeeze(-1)
            parts.append(torch.logsumexp(self.logits[c * S : (c + 1) * S, words], -1))
        return torch.cat(parts)

    def log_probs(self) -> Tensor:
        """The dense ``[Z, V]`` log-emission matrix, ``-inf`` outside each state's cluster."""
        Z = self.logits.shape[0]
        own = (
            self.clusters[None, :]
            == (torch.arange(Z, device=self.logits.device) // self.block_size)[:, None]
        )
        logits = torch.where(own, self.logits, torch.full_like(self.logits, float("-inf")))
        return torch.log_softmax(logits, -1)


class BlockedMarginals(NamedTuple):
    """Posterior marginals of a blocked HMM.

    Attributes:
        unary: ``[B, T, Z]``, ``p(z_t = i | x)`` (0 outside the step's block and padding).
        block_binary: ``[B, T-1, S, S]``, ``p(z_t = states[b, t, s], z_{t+1} =
            states[b, t+1, s'] | x)``.
        states: LongTensor ``[B, T, S]``, the state ids of each step's block.
    """

    unary: Tensor
    block_binary: Tensor
    states: Tensor


class BlockedHMM(HMM):
    """An HMM with ``BlockedEmission`` emissions; build it as ``st.HMM(...)``.

    Same arguments as ``HMM`` with ``emission_logits`` a ``BlockedEmission`` (shared by the
    batch) and dense ``transition_logits`` ``[Z, Z]`` or ``[B, Z, Z]``. Every ``ExpFamily``
    method is exact and costs ``O(B T S^2)`` (gathering the ``[B, T-1, S, S]`` transition
    blocks); ``kl`` and ``cross_entropy`` need the same observations' clusters.
    """

    def __init__(
        self,
        init_logits: Tensor,
        transition_logits: Tensor,
        emission_logits: BlockedEmission,
        observations: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        mask: Tensor | None = None,
        backend: BackendSpec = None,
    ) -> None:
        emission = emission_logits
        validate = _resolve_validate(validate_args, init_logits, transition_logits)
        Z, V = emission.logits.shape
        if validate:
            check_float_tensor("init_logits", init_logits)
            check_float_tensor("transition_logits", transition_logits)
            check_same_dtype_device(
                "init_logits", init_logits, transition_logits=transition_logits,
                emission_logits=emission.logits,
            )  # fmt: skip
            check_observations(observations)
        B, T = observations.shape
        device = init_logits.device
        if validate:
            _check_parameter("init_logits", init_logits, (Z,), B)
            _check_parameter("transition_logits", transition_logits, (Z, Z), B)
        lengths = observation_lengths(observations, lengths, mask, V, device, validate)
        valid = lengths_to_mask(lengths, T)
        self.init_logits, self.transition_logits = init_logits, transition_logits
        self.emission, self.emission_logits = emission, emission.logits
        self.observations, self.lengths = observations, lengths
        self.num_observations = V
        safe = torch.where(valid, observations, torch.zeros_like(observations))
        self._words = safe
        offsets = emission.clusters[safe] * emission.block_size * valid  # shape: (B, T)
        S = emission.block_size
        like = emission.logits.new_empty(0, T, S)
        inner = Chain.build(like, self.lengths, backend)
        self._structure = BlockedChain(inner, offsets, Z)  # type: ignore[assignment]
        super(HMM, self).__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    def _block_potentials(self) -> tuple[Tensor, Tensor]:
        """``(unary [B, T, S], binary [B, T-1, S, S])`` in block coordinates."""
        states = self.structure.states()  # shape: (B, T, S)
        B = states.shape[0]
        Z = self.num_states
        log_emit = self.emission.logits - self.emission.log_normalizer()[:, None]
        unary = log_emit[states, self._words[..., None]]  # shape: (B, T, S)
        log_init = torch.log_softmax(self.init_logits, -1).reshape(-1, Z).expand(B, Z)
        first = unary[:, :1] + log_init.gather(1, states[:, 0])[:, None]
        unary = torch.cat([first, unary[:, 1:]], 1)
        log_p = torch.log_softmax(self.transition_logits, -1)
        src, dst = states[:, :-1, :, None], states[:, 1:, None, :]
        if log_p.dim() == 2:
            binary = log_p[src, dst]  # shape: (B, T-1, S, S)
        else:
            binary = log_p[torch.arange(B, device=states.device)[:, None, None, None], src, dst]
        return unary, binary

    @property
    def posterior(self) -> LinearChainCRF:
        """p(z | x) as a ``LinearChainCRF`` over block coordinates ``s`` (``z = states[s]``)."""
        unary, binary = self._block_potentials()
        return LinearChainCRF(unary, binary, self.lengths, validate_args=False)

    @property
    def arg_constraints(self) -> dict[str, Any]:
        return {
            "init_logits": constraints.independent(LOG_POTENTIAL, 1),
            "transition_logits": constraints.independent(LOG_POTENTIAL, 2),
        }

    def _generative_parameters(self) -> tuple[Any, Any, Any]:
        return self.init_logits, self.transition_logits, self.emission

    def _backend_spec(self) -> BackendSpec:
        return self.structure.inner.backend

    @property
    def structure(self) -> BlockedChain:  # type: ignore[override]
        return self._structure  # type: ignore[return-value]

    @property
    def _natural_params(self) -> tuple[Tensor, ...]:
        return self._block_potentials()

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        return (self.init_logits, self.transition_logits, self.emission.logits)

    def _replace(self, *parameters: Tensor) -> BlockedHMM:
        init, transition, logits = parameters
        emission = BlockedEmission(logits, self.emission.clusters, self.emission.num_clusters)
        return BlockedHMM(
            init, transition, emission, self.observations, self.lengths,
            validate_args=False, backend=self.structure.inner.backend,
        )  # fmt: skip

    def _present(self, mu: tuple[Tensor, ...]) -> BlockedMarginals:  # type: ignore[override]
        states = self.structure.states()
        B, T, _ = states.shape
        full = mu[0].new_zeros(B, T, self.num_states).scatter(2, states, mu[0])
        return BlockedMarginals(full, mu[1], states)

    @property
    def marginals(self) -> BlockedMarginals:  # type: ignore[override]
        """``BlockedMarginals``: state marginals ``[B, T, Z]`` and block pair marginals."""
        return self._present(self._mean_params)

    def sample_joint(
        self, sample_shape: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw (x, z) from the generative model (the dense sampler on ``log_probs()``)."""
        dense = HMM(
            self.init_logits, self.transition_logits, self.emission.log_probs(),
            self.observations, self.lengths, validate_args=False,
        )  # fmt: skip
        return dense.sample_joint(sample_shape, generator)


def state_dropout(
    init_logits: Tensor,
    transition_logits: Tensor,
    emission: BlockedEmission,
    keep: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, BlockedEmission, Tensor]:
    """Keep ``keep`` random states of every cluster: the HMM on the kept states, for training.

    State dropout (Chiu & Rush, arXiv:2011.04640 §4): each batch trains the HMM restricted to
    a random subset of ``keep`` states per cluster, renormalised over the kept states; a step
    then costs ``O(keep^2)`` instead of ``O(S^2)``. This is exactly the HMM whose dropped
    states have ``-inf`` init and transition logits (rows of dropped states are never
    reached). Evaluate with all states.

    Args:
        init_logits: ``[Z]``; transition_logits: ``[Z, Z]`` (shared, ``[from, to]``).
        emission: the ``BlockedEmission`` (S states per cluster).
        keep: states kept per cluster, ``1 <= keep <= S``.
        generator: optional ``torch.Generator`` for the draw.

    Returns:
        ``(init [Z'], transition [Z', Z'], emission, kept [Z'])`` with ``Z' = M keep``:
        differentiable gathers of the parameters, and the kept state ids (sorted, cluster by
        cluster), so that ``st.HMM(init, transition, emission, x)`` is the dropped-out model.
    """
    S, M = emission.block_size, emission.num_clusters
    if not isinstance(keep, int) or not 1 <= keep <= S:
        raise ValueError(
            f"state_dropout: keep must be an int in [1, S] with S = {S} states per cluster; "
            f"got {keep!r}."
        )
    if init_logits.dim() != 1 or transition_logits.dim() != 2:
        raise ValueError(
            "state_dropout: init_logits [Z] and transition_logits [Z, Z] must be shared (no "
            f"batch dimension); got {tuple(init_logits.shape)} and "
            f"{tuple(transition_logits.shape)}."
        )
    device = emission.logits.device
    scores = torch.rand(M, S, generator=generator, device=generator.device if generator else None)
    pick = scores.to(device).argsort(-1)[:, :keep].sort(-1).values  # shape: (M, keep)
    kept = (pick + S * torch.arange(M, device=device)[:, None]).reshape(-1)
    restricted = BlockedEmission(emission.logits[kept], emission.clusters, M)
    return init_logits[kept], transition_logits[kept][:, kept], restricted, kept
