"""``Chain``: the linear chain as an instance of the structure protocol.

θ = (unary ``[B, T, Z]``, binary broadcastable to ``[B, T-1, Z, Z]``, laid out ``[from, to]``);
the structures are tag sequences ``[B, T]`` within ``lengths``. The backend is chosen once,
when the structure is built (``backends.resolve``), and every computation uses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.structures.base import AbstractRegularized, AbstractStructure, Params
from structift.structures.chain import _decode, _hvp, _kbest, _local, _primitives
from structift.structures.chain.backends import AbstractChainBackend, BackendSpec, resolve

__all__ = ["Chain", "ChainSpace"]


class ChainSpace(AbstractStructure):
    """The space every chain structure shares: tag sequences ``[B, T]`` within ``lengths``.

    Subclasses set ``lengths`` (LongTensor ``[B]``), ``num_steps`` (T) and ``num_states`` (Z).
    ``same_space`` also asks for the same structure class: entropy/KL between two chains pair
    their natural parameters term by term, which only means something for one parameterization
    of the transitions (dense with dense, low-rank with low-rank).
    """

    lengths: Tensor
    num_steps: int
    num_states: int
    _kind = "chain"

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size(self.lengths.shape)

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size((self.num_steps,))

    def same_space(self, other: AbstractStructure) -> bool:
        if type(other) is not type(self):
            return False
        assert isinstance(other, ChainSpace)
        if (other.num_steps, other.num_states) != (self.num_steps, self.num_states):
            return False
        lengths = other.lengths
        return lengths.shape == self.lengths.shape and bool((lengths == self.lengths).all())

    def describe(self) -> str:
        lengths = tuple(self.lengths.tolist())
        return f"{self._kind}(T={self.num_steps}, Z={self.num_states}, lengths={lengths})"

    def mask(self) -> Tensor:
        """BoolTensor ``[B, T]``, True at valid positions."""
        return lengths_to_mask(self.lengths, self.num_steps)


class Chain(ChainSpace):
    """Tag sequences ``y ∈ {0..Z-1}^L`` of lengths ``L = lengths[b] <= T``.

    Args:
        lengths: LongTensor ``[B]`` (validated by the families).
        num_steps: T.
        num_states: Z.
        backend: the engine (a resolved ``AbstractChainBackend``).
    """

    def __init__(
        self, lengths: Tensor, num_steps: int, num_states: int, backend: AbstractChainBackend
    ) -> None:
        self.lengths = lengths
        self.num_steps, self.num_states = num_steps, num_states
        self.backend = backend

    @classmethod
    def build(cls, unary: Tensor, lengths: Tensor, backend: BackendSpec = None) -> Chain:
        """The chain of potentials like ``unary`` ``[B, T, Z]``, its backend resolved now."""
        _, T, Z = unary.shape
        return cls(lengths, T, Z, resolve(backend, unary))

    # ---- A(θ) ----------------------------------------------------------------------------

    def log_partition(self, theta: Params) -> Tensor:
        unary, binary = theta
        if torch.is_grad_enabled() and (unary.requires_grad or binary.requires_grad):
            out = _primitives.posterior(unary, binary, self.lengths, self.backend, full=False)[0]
        else:
            out = _primitives.log_partition_values(unary, binary, self.lengths, self.backend)
        return out.to(unary.dtype)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        unary, binary = theta
        if create_graph:
            out = _primitives.posterior(unary, binary, self.lengths, self.backend, full=True)
        else:
            with torch.no_grad():
                out = _primitives.posterior(unary, binary, self.lengths, self.backend, full=True)
        log_z, mu_u, mu_b = (x.to(unary.dtype) for x in out)
        return log_z, (mu_u, mu_b)

    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        """``∇²A v`` from the marginals; differentiable (plain torch ops) under grad mode."""
        mu_u, mu_b = mu
        B, T, Z = mu_u.shape
        vu = v[0].expand(B, T, Z)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (*mu, *v) if x is not None):
            mask = self.mask()
            return _hvp.hvp(mu_u, mu_b, mask, vu, v[1], sweeps=self.backend.sweeps)
        key = _primitives.backend_key(self.backend)
        vb = v[1].expand(mu_b.shape) if v[1] is not None else mu_u.new_zeros(0)
        return _primitives._hvp_op(mu_u, mu_b, self.lengths, vu, vb, key)

    # ---- structures ----------------------------------------------------------------------

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        unary, binary = theta
        with torch.no_grad():
            tags = _primitives.viterbi_tags(unary, binary, self.lengths, self.backend)
        return tags, _decode.score(unary, binary, self.lengths, tags)

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """k-best Viterbi (``_kbest``): tags ``[k, B, T]``, scores ``[k, B]``, any backend."""
        unary, binary = theta
        return _kbest.topk(unary, binary, self.lengths, k)

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        unary, binary = (_primitives._work(x.detach()) for x in theta)
        with torch.no_grad():
            return self.backend.sample(unary, binary, self.lengths, tuple(sample_shape), generator)

    def score(self, theta: Params, value: Tensor) -> Tensor:
        unary, binary = theta
        B, T, Z = unary.shape
        tags = torch.where(self.mask(), value, torch.zeros_like(value))
        sample_shape = tags.shape[:-2]
        n = sample_shape.numel()
        if n == 1:
            out = _decode.score(unary, binary, self.lengths, tags.reshape(B, T))
            return out.reshape((*sample_shape, B))
        # Score every sample against the same potentials by folding S into the batch.
        u = unary.unsqueeze(0).expand(n, B, T, Z).reshape(n * B, T, Z)
        b = binary.expand(B, T - 1, Z, Z).unsqueeze(0).expand(n, B, T - 1, Z, Z)
        out = _decode.score(
            u, b.reshape(n * B, T - 1, Z, Z), self.lengths.repeat(n), tags.reshape(n * B, T)
        )
        return out.reshape((*sample_shape, B))

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        mask = self.mask()
        tags = torch.where(mask, value, torch.zeros_like(value))
        weight = mask.to(dtype)  # shape: (B, T)
        unary = torch.nn.functional.one_hot(tags, self.num_states).to(dtype) * weight[..., None]
        pair = weight[:, 1:]  # the pair (t, t+1) exists iff t + 1 < length
        binary = unary[..., :-1, :, None] * unary[..., 1:, None, :] * pair[..., None, None]
        return unary, binary

    def unary_statistics(self, value: Tensor, dtype: torch.dtype) -> Tensor:
        """The tag indicators ``[*S, B, T, Z]`` alone (no Z² pairwise indicators)."""
        mask = self.mask()
        tags = torch.where(mask, value, torch.zeros_like(value))
        onehot = torch.nn.functional.one_hot(tags, self.num_states).to(dtype)
        return onehot * mask[..., None].to(dtype)

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        from structift._checks import check_index_tensor

        B, T = self.lengths.shape[0], self.num_steps
        check_index_tensor(name, value, (B, T), self.num_states, device, self.mask())

    # ---- entropy and KL ------------------------------------------------------------------

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        return _local.entropy(theta[0], theta[1], self.lengths, mu[0])

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        return _local.kl((theta_p[0], theta_p[1]), (theta_q[0], theta_q[1]), self.lengths, mu_p[0])

    # ---- the variational view ------------------------------------------------------------

    def regularized(self, temperature: float) -> AbstractRegularized:
        from structift.structures.chain.regularized import ChainRegularized

        return ChainRegularized(self, temperature)
