"""Blocked emissions (Chiu & Rush, arXiv:2011.04640 §3), as a value for ``st.HMM``.

``BlockedEmission(logits, clusters, num_clusters)`` partitions the ``Z`` states into
``M = num_clusters`` blocks of ``S = Z / M`` consecutive states and the vocabulary into the same
``M`` clusters (``clusters[w]`` is word ``w``'s cluster); a state emits only the words of its
own cluster:

    p(x = w | z) = softmax over {w' : clusters[w'] = c(z)} of logits[z, w'],  0 elsewhere,

with ``c(z) = z // S``. Observing ``x_t`` therefore pins ``z_t`` to the block of ``clusters[x_t]``,
and forward-backward runs over the ``S`` states of each step's block: ``O(T S^2)`` per
sequence instead of ``O(T Z^2)`` (``structift.structures.chain.blocked``).

The transitions may be dense logits ``[Z, Z]`` (one ``O(Z^2)`` softmax per call) or a
``LowRankTransition`` (Chiu, Deng & Rush, arXiv:2201.02715): then only the ``S x S`` blocks
``P[block_t, block_{t+1}] = A[block_t] B[:, block_{t+1}]`` of the steps are formed, each an
``[S, r] @ [r, S]`` product, so a call costs ``O(Z r + Z V / M + B T S^2 r)`` and nothing
of size ``Z x Z`` exists: this is what makes ``Z = 2^14`` states cheap to train.
"""

from __future__ import annotations

import copy
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
from structift.families.lowrank import LowRankTransition
from structift.structures.chain import BackendSpec, Chain
from structift.structures.chain.blocked import BlockedChain

__all__ = ["BlockedEmission", "BlockedHMM", "BlockedMarginals", "state_dropout"]


class BlockedEmission:
    """Emission logits restricted to a word -> cluster partition.

    Build it from dense logits ``BlockedEmission(logits [Z, V], clusters, M)`` (only each
    state's own-cluster entries are used) or, without ever forming ``[Z, V]``, from the
    compact per-cluster layout with `from_blocks`. Either way it holds the block logits
    ``blocks [M, S, W]``: ``blocks[c, s, i]`` is the logit of state ``c S + s`` for the ``i``-th
    word of cluster ``c`` (words in increasing id order; ``W >= `` the largest cluster, entries
    past a cluster's size are padding and ignored). Everything costs ``O(Z W)``, i.e.
    ``O(Z V / M)`` for balanced clusters, not ``O(Z V)``.

    Args:
        logits: ``[Z, V]`` emission logits.
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
        self._partition(clusters, num_clusters, V, logits.device)
        check_log_potential("logits", logits)
        self._finish(Z // num_clusters, ("logits", logits))

    @classmethod
    def from_blocks(cls, blocks: Tensor, clusters: Tensor) -> BlockedEmission:
        """The emission from block logits ``[M, S, W]`` (see the class docstring).

        Args:
            blocks: ``[M, S, W]`` float logits, ``W`` at least the largest cluster's size;
                ``blocks[c, s, i]`` scores the ``i``-th word (by id) of cluster ``c`` for state
                ``c S + s``; entries past the cluster's size are ignored.
            clusters: LongTensor ``[V]`` of cluster ids in ``[0, M)``.

        Raises:
            TypeError: ``blocks`` is not a float tensor or ``clusters`` not integers.
            ValueError: ``blocks`` is not 3-D, ``W`` is smaller than a cluster, a word outside
                every cluster, an empty cluster, NaN/``+inf`` in a used entry, or a state
                with no finite logit in its cluster.
        """
        check_float_tensor("blocks", blocks)
        if blocks.dim() != 3:
            raise ValueError(
                "BlockedEmission.from_blocks: blocks must have shape [M, S, W] (clusters, "
                f"states per cluster, words per cluster); got {tuple(blocks.shape)}."
            )
        self = cls.__new__(cls)
        M, _, W = blocks.shape
        V = clusters.shape[0] if isinstance(clusters, Tensor) and clusters.dim() == 1 else -1
        self._partition(clusters, M, V, blocks.device)
        largest = self._cluster_words.shape[1]
        if W < largest:
            c = int(torch.bincount(clusters, minlength=M).argmax())
            raise ValueError(
                f"BlockedEmission.from_blocks: blocks has W = {W} word slots (shape[2]) but "
                f"cluster {c} holds {largest} words; W must be at least the largest cluster."
            )
        used = blocks[..., :largest].masked_fill(self._pad[:, None, :], 0.0)
        check_log_potential("blocks", used)
        self._finish(blocks.shape[1], ("blocks", blocks))
        return self

    def _partition(self, clusters: Tensor, M: int, V: int, device: torch.device) -> None:
        """Check ``clusters`` and index it: words grouped by cluster, padded to the largest."""
        if (
            not isinstance(clusters, Tensor)
            or clusters.is_floating_point()
            or clusters.is_complex()
        ):
            raise TypeError(
                f"BlockedEmission: clusters must be a LongTensor [V] of cluster ids; got "
                f"{type(clusters).__name__} {getattr(clusters, 'dtype', '')}."
            )
        if clusters.dim() != 1 or (V >= 0 and clusters.shape[0] != V) or clusters.device != device:
            raise ValueError(
                f"BlockedEmission: clusters must have shape [V] = [{V}] (one cluster per word "
                f"of logits [Z, V]) on {device}; got {tuple(clusters.shape)} on "
                f"{clusters.device}."
            )
        outside = (clusters < 0) | (clusters >= M)
        if bool(outside.any()):
            w = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: word {w} is outside every cluster: clusters[{w}] = "
                f"{int(clusters[w])}, expected a cluster id in [0, {M})."
            )
        sizes = torch.bincount(clusters, minlength=M)
        if bool((sizes == 0).any()):
            c = int((sizes == 0).nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: cluster {c} has no words (clusters never equals {c}); its "
                "states could emit nothing. Use fewer clusters or assign words to it."
            )
        self.clusters, self.num_clusters = clusters, M
        order = torch.argsort(clusters, stable=True)
        start = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(int(sizes.max()), device=device)
        self._pad = slot[None, :] >= sizes[:, None]  # shape: (M, W)
        position = (start[:, None] + slot[None, :]).clamp_max(clusters.shape[0] - 1)
        self._cluster_words = torch.where(self._pad, order[0], order[position])  # (M, W)
        # The slot of each word within its cluster: [V].
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.shape[0], device=device)
        self.positions = rank - start[clusters]

    def _finish(self, block_size: int, source: tuple[str, Tensor]) -> None:
        self.block_size, self._source = block_size, source
        finite = torch.isfinite(self.log_normalizer().detach())
        if not bool(finite.all()):
            z = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"BlockedEmission: state {z} (cluster {z // self.block_size}) has no finite "
                "logit among its cluster's words (its emission row is all -inf)."
            )

    @property
    def blocks(self) -> Tensor:
        """The block logits ``[M, S, W]``, ``-inf`` on padding (recomputed on each access, so
        every use has its own autograd graph)."""
        kind, source = self._source
        M, S, W = self.num_clusters, self.block_size, self._cluster_words.shape[1]
        if kind == "logits":
            index = self._cluster_words[:, None, :].expand(M, S, W)
            blocks = source.reshape(M, S, -1).gather(2, index)
        else:
            blocks = source[..., :W]
        return blocks.masked_fill(self._pad[:, None, :], float("-inf"))

    @property
    def num_states(self) -> int:
        """Z."""
        return self.num_clusters * self.block_size

    @property
    def num_words(self) -> int:
        """V."""
        return int(self.clusters.shape[0])

    @property
    def logits(self) -> Tensor:
        """The tensor it was built from: ``[Z, V]`` logits, or the ``[M, S, W]`` blocks."""
        return self._source[1]

    def log_normalizer(self) -> Tensor:
        """``log Σ_{w in c(z)} exp(logits[z, w])`` ``[Z]``, ``O(Z W)``."""
        return torch.logsumexp(self.blocks, -1).reshape(-1)

    def word_log_probs(self, words: Tensor) -> Tensor:
        """``log p(words | each state of its cluster)``: ``[*, S]`` for LongTensor ``words``."""
        cluster, slot = self.clusters[words][..., None], self.positions[words][..., None]
        states = torch.arange(self.block_size, device=words.device)
        blocks = self.blocks
        norm = torch.logsumexp(blocks, -1)  # shape: (M, S)
        return blocks[cluster, states, slot] - norm[cluster, states]

    def restrict(self, keep: Tensor) -> BlockedEmission:
        """The emission of the states ``keep [M, k]`` (block coordinates, per cluster).

        The same partition (not indexed or checked again) and a subset of already checked
        rows: a per-batch call of state dropout costs one gather.
        """
        blocks = self.blocks
        M, _, W = blocks.shape
        out = copy.copy(self)
        out.block_size = keep.shape[1]
        out._source = ("blocks", blocks.gather(1, keep[..., None].expand(M, keep.shape[1], W)))
        return out

    def log_probs(self) -> Tensor:
        """The dense ``[Z, V]`` log-emission matrix, ``-inf`` outside each state's cluster."""
        blocks = self.blocks
        M, S, W = blocks.shape
        V = self.num_words
        dense = blocks.new_full((M, S, V + 1), float("-inf"))
        index = torch.where(self._pad, V, self._cluster_words)[:, None, :].expand(M, S, W)
        dense = dense.scatter(2, index, torch.log_softmax(blocks, -1))
        return dense[..., :V].reshape(M * S, V)


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
    batch) and ``transition_logits`` dense ``[Z, Z]`` / ``[B, Z, Z]`` or a (shared)
    ``LowRankTransition``. Every ``ExpFamily`` method is exact and costs ``O(B T S^2)`` after
    forming the ``[B, T-1, S, S]`` transition blocks (gathered from the dense ``log P``, or
    ``O(B T S^2 r)`` products of the low-rank factors' rows); ``kl`` and ``cross_entropy``
    need the same observations' clusters.
    """

    def __init__(
        self,
        init_logits: Tensor,
        transition_logits: Tensor | LowRankTransition,
        emission_logits: BlockedEmission,
        observations: Tensor,
        lengths: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        mask: Tensor | None = None,
        backend: BackendSpec = None,
    ) -> None:
        emission = emission_logits
        low = transition_logits if isinstance(transition_logits, LowRankTransition) else None
        weights = low.u if low is not None else transition_logits
        assert isinstance(weights, Tensor)
        validate = _resolve_validate(validate_args, init_logits, weights)
        Z, V = emission.num_states, emission.num_words
        if validate:
            check_float_tensor("init_logits", init_logits)
            check_float_tensor("transition_logits", weights)
            check_same_dtype_device(
                "init_logits", init_logits, transition_logits=weights,
                emission_logits=emission.blocks,
            )  # fmt: skip
            check_observations(observations)
        B, T = observations.shape
        device = init_logits.device
        if validate:
            _check_parameter("init_logits", init_logits, (Z,), B)
            if low is None:
                _check_parameter("transition_logits", weights, (Z, Z), B)
            elif low.num_states != Z:
                raise ValueError(
                    f"transition_logits: the LowRankTransition has Z = {low.num_states} "
                    f"states (u.shape[0]) but the BlockedEmission has Z = {Z} "
                    "(logits.shape[0]); they must agree."
                )
        lengths = observation_lengths(observations, lengths, mask, V, device, validate)
        valid = lengths_to_mask(lengths, T)
        self.init_logits = init_logits
        self.transition_logits = transition_logits  # type: ignore[assignment]  # its HMM name
        self.emission, self.emission_logits = emission, emission.logits
        self.observations, self.lengths = observations, lengths
        self.num_observations = V
        safe = torch.where(valid, observations, torch.zeros_like(observations))
        self._words = safe
        offsets = emission.clusters[safe] * emission.block_size * valid  # shape: (B, T)
        S = emission.block_size
        like = emission.blocks.new_empty(0, T, S)
        inner = Chain.build(like, self.lengths, backend)
        self._structure = BlockedChain(inner, offsets, Z)  # type: ignore[assignment]
        super(HMM, self).__init__(torch.Size((B,)), torch.Size((T,)), validate_args=False)
        self._validate_args = validate

    def _block_potentials(self) -> tuple[Tensor, Tensor]:
        """``(unary [B, T, S], binary [B, T-1, S, S])`` in block coordinates."""
        states = self.structure.states()  # shape: (B, T, S)
        B = states.shape[0]
        Z = self.num_states
        unary = self.emission.word_log_probs(self._words)  # shape: (B, T, S)
        log_init = torch.log_softmax(self.init_logits, -1).reshape(-1, Z).expand(B, Z)
        first = unary[:, :1] + log_init.gather(1, states[:, 0])[:, None]
        unary = torch.cat([first, unary[:, 1:]], 1)
        if isinstance(self.transition_logits, LowRankTransition):
            return unary, self._low_rank_blocks()
        log_p = torch.log_softmax(self.transition_logits, -1)
        src, dst = states[:, :-1, :, None], states[:, 1:, None, :]
        if log_p.dim() == 2:
            binary = log_p[src, dst]  # shape: (B, T-1, S, S)
        else:
            binary = log_p[torch.arange(B, device=states.device)[:, None, None, None], src, dst]
        return unary, binary

    @property
    def num_states(self) -> int:
        """Z."""
        return self.emission.num_states

    def _low_rank_blocks(self) -> Tensor:
        """``log P[block_t, block_{t+1}]`` ``[B, T-1, S, S]`` from the factors' block rows.

        ``log(exp(log A[rows]) @ exp(log B[:, cols]))`` with each row of both factors shifted
        by its maximum (so every product has a term ``>= exp(-(spread of a row))``), clamped at
        the dtype's smallest normal so that a product that underflows is a finite, tiny
        transition instead of a ``-inf`` whose gradient is NaN.
        """
        transition = self.transition_logits
        assert isinstance(transition, LowRankTransition)
        log_a, log_b = transition.factors()  # shapes: (Z, r), (r, Z)
        M, S, r = self.emission.num_clusters, self.emission.block_size, transition.rank
        block = self.structure.offsets // S  # shape: (B, T)
        B, T = block.shape
        rows = log_a.reshape(M, S, r)[block[:, :-1]].reshape(-1, S, r)
        cols = log_b.T.reshape(M, S, r)[block[:, 1:]].reshape(-1, S, r)
        shift_rows = rows.detach().amax(-1, keepdim=True)
        shift_cols = cols.detach().amax(-1, keepdim=True)
        product = torch.bmm(torch.exp(rows - shift_rows), torch.exp(cols - shift_cols).mT)
        tiny = torch.finfo(product.dtype).tiny
        out = torch.log(product.clamp_min(tiny)) + shift_rows + shift_cols.mT
        return out.reshape(B, T - 1, S, S)

    @property
    def posterior(self) -> LinearChainCRF:
        """p(z | x) as a ``LinearChainCRF`` over block coordinates ``s`` (``z = states[s]``)."""
        unary, binary = self._block_potentials()
        return LinearChainCRF(unary, binary, self.lengths, validate_args=False)

    @property
    def arg_constraints(self) -> dict[str, Any]:
        out = {"init_logits": constraints.independent(LOG_POTENTIAL, 1)}
        if not isinstance(self.transition_logits, LowRankTransition):
            out["transition_logits"] = constraints.independent(LOG_POTENTIAL, 2)
        return out

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

    def _evidence_params(self) -> tuple[Tensor, ...]:
        return self._natural_params

    @property
    def _parameters(self) -> tuple[Tensor, ...]:
        transition = self.transition_logits
        if isinstance(transition, LowRankTransition):
            return (self.init_logits, transition.u, transition.v, self.emission.logits)
        return (self.init_logits, transition, self.emission.logits)

    def _replace(self, *parameters: Tensor) -> BlockedHMM:
        init, *weights, logits = parameters
        transition: Any = LowRankTransition(*weights) if len(weights) == 2 else weights[0]
        clusters, M = self.emission.clusters, self.emission.num_clusters
        if self.emission._source[0] == "blocks":
            emission = BlockedEmission.from_blocks(logits, clusters)
        else:
            emission = BlockedEmission(logits, clusters, M)
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
        """Draw (x, z) from the generative model (the sampler of dense ``log_probs()`` emissions).

        With a ``LowRankTransition`` that sampler is the low-rank one (``O(Z + r)`` a step).
        """
        dense = HMM(
            self.init_logits, self.transition_logits, self.emission.log_probs(),
            self.observations, self.lengths, validate_args=False,
        )  # fmt: skip
        return dense.sample_joint(sample_shape, generator)


def state_dropout(
    init_logits: Tensor,
    transition_logits: Tensor | LowRankTransition,
    emission: BlockedEmission,
    keep: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Any, BlockedEmission, Tensor]:
    """Keep ``keep`` random states of every cluster: the HMM on the kept states, for training.

    State dropout (Chiu & Rush, arXiv:2011.04640 §4): each batch trains the HMM restricted to
    a random subset of ``keep`` states per cluster, renormalised over the kept states; a step
    then costs ``O(keep^2)`` instead of ``O(S^2)``. This is exactly the HMM whose dropped
    states have ``-inf`` init and transition logits (rows of dropped states are never
    reached). Evaluate with all states. A ``LowRankTransition(u, v)`` becomes
    ``LowRankTransition(u[kept], v[kept])``: the same kernel with the dropped states' features
    removed, renormalised over the kept states.

    Args:
        init_logits: ``[Z]``.
        transition_logits: ``[Z, Z]`` (shared, ``[from, to]``) or a ``LowRankTransition``.
        emission: the ``BlockedEmission`` (S states per cluster).
        keep: states kept per cluster, ``1 <= keep <= S``.
        generator: optional ``torch.Generator`` for the draw.

    Returns:
        ``(init [Z'], transition [Z', Z'] or a LowRankTransition, emission, kept [Z'])`` with
        ``Z' = M keep``:
        differentiable gathers of the parameters, and the kept state ids (sorted, cluster by
        cluster), so that ``st.HMM(init, transition, emission, x)`` is the dropped-out model.
    """
    S, M = emission.block_size, emission.num_clusters
    if not isinstance(keep, int) or not 1 <= keep <= S:
        raise ValueError(
            f"state_dropout: keep must be an int in [1, S] with S = {S} states per cluster; "
            f"got {keep!r}."
        )
    if isinstance(transition_logits, LowRankTransition):
        if M * keep < transition_logits.rank:
            raise ValueError(
                f"state_dropout: keeping keep = {keep} of S = {S} states in each of M = {M} "
                f"clusters leaves {M * keep} states, fewer than the LowRankTransition's rank "
                f"r = {transition_logits.rank}; keep at least ceil(r / M) states per cluster."
            )
        shape: tuple[int, ...] = (transition_logits.num_states,) * 2
    else:
        shape = tuple(transition_logits.shape)
    if init_logits.dim() != 1 or len(shape) != 2:
        raise ValueError(
            "state_dropout: init_logits [Z] and transition_logits [Z, Z] must be shared (no "
            f"batch dimension); got {tuple(init_logits.shape)} and {shape}."
        )
    device = emission.blocks.device
    scores = torch.rand(M, S, generator=generator, device=generator.device if generator else None)
    pick = scores.to(device).argsort(-1)[:, :keep].sort(-1).values  # shape: (M, keep)
    kept = (pick + S * torch.arange(M, device=device)[:, None]).reshape(-1)
    restricted = emission.restrict(pick)
    if isinstance(transition_logits, LowRankTransition):
        u, v = transition_logits.u, transition_logits.v
        return init_logits[kept], LowRankTransition(u[kept], v[kept]), restricted, kept
    return init_logits[kept], transition_logits[kept][:, kept], restricted, kept
