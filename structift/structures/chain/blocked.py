"""``BlockedChain``: a chain whose state at each step lies in one known block of states.

With blocked emissions (Chiu & Rush, arXiv:2011.04640) the states are partitioned into blocks
of ``S`` consecutive states and observation ``x_t`` can only be emitted by the states of its
block ``c_t``, so ``z_t = c_t S + s_t`` with ``s_t`` in ``[0, S)``. The posterior over ``z`` is a
chain over ``s`` with ``S`` states per step: θ = (unary ``[B, T, S]``, binary
``[B, T-1, S, S]``) in block coordinates, the cost ``O(T S^2)`` instead of ``O(T Z^2)``.

This structure wraps the dense ``Chain`` on ``s`` and only translates structures between
state ids ``z`` (what users see: ``argmax``, ``sample``, ``topk``, ``score``) and block
coordinates ``s = z - offsets``; every computation on θ is the inner chain's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.structures.base import AbstractRegularized, AbstractStructure, Params
from structift.structures.chain.structure import Chain

__all__ = ["BlockedChain"]


class BlockedChain(AbstractStructure):
    """State sequences ``z [B, T]`` with ``z_t`` in ``[offsets[b, t], offsets[b, t] + S)``.

    Args:
        inner: the dense chain over block coordinates ``s`` (``S`` states).
        offsets: LongTensor ``[B, T]``, the first state of each step's block (0 on padding).
        num_states: Z, the number of states.
    """

    def __init__(self, inner: Chain, offsets: Tensor, num_states: int) -> None:
        self.inner, self.offsets, self.num_states = inner, offsets, num_states
        self.lengths, self.num_steps = inner.lengths, inner.num_steps

    @property
    def block_size(self) -> int:
        """S."""
        return self.inner.num_states

    def states(self) -> Tensor:
        """The state ids of every step's block, ``[B, T, S]``."""
        S = self.block_size
        return self.offsets[..., None] + torch.arange(S, device=self.offsets.device)

    def to_states(self, s: Tensor) -> Tensor:
        """Block coordinates ``[*S, B, T]`` -> state ids (0 beyond lengths)."""
        mask = self.inner.mask()
        return torch.where(mask, s + self.offsets, torch.zeros_like(s))

    def to_block(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """State ids -> ``(block coordinates clamped into [0, S), inside the block)``."""
        s = value - self.offsets
        inside = (s >= 0) & (s < self.block_size) | ~self.inner.mask()
        return s.clamp(0, self.block_size - 1), inside

    # ---- space ---------------------------------------------------------------------------

    @property
    def batch_shape(self) -> torch.Size:
        return self.inner.batch_shape

    @property
    def event_shape(self) -> torch.Size:
        return self.inner.event_shape

    def same_space(self, other: AbstractStructure) -> bool:
        if not isinstance(other, BlockedChain) or other.num_states != self.num_states:
            return False
        same = other.offsets.shape == self.offsets.shape
        return (
            same
            and bool((other.offsets == self.offsets).all())
            and self.inner.same_space(other.inner)
        )

    def describe(self) -> str:
        return f"blocked {self.inner.describe()[:-1]}, Z={self.num_states})"

    # ---- A(θ): the inner chain's -------------------------------------------------------------

    def log_partition(self, theta: Params) -> Tensor:
        return self.inner.log_partition(theta)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        return self.inner.posterior(theta, create_graph)

    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        return self.inner.hvp(mu, v)

    # ---- structures: translated ------------------------------------------------------------

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        s, score = self.inner.argmax(theta)
        return self.to_states(s), score

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        s, scores = self.inner.topk(theta, k)
        return self.to_states(s), scores

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        return self.to_states(self.inner.sample(theta, sample_shape, generator))

    def score(self, theta: Params, value: Tensor) -> Tensor:
        """``log p(x, z)``; ``-inf`` where some ``z_t`` lies outside its step's block."""
        s, inside = self.to_block(value)
        out = self.inner.score(theta, s)
        return torch.where(inside.all(-1), out, torch.full_like(out, float("-inf")))

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        """φ in block coordinates (states outside their block are clamped into it)."""
        return self.inner.statistics(self.to_block(value)[0], dtype)

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        from structift._checks import check_index_tensor

        B, T = self.lengths.shape[0], self.num_steps
        check_index_tensor(name, value, (B, T), self.num_states, device, self.inner.mask())

    # ---- entropy, KL, variational: the inner chain's ------------------------------------------

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        return self.inner.entropy(theta, mu)

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        return self.inner.kl(theta_p, theta_q, mu_p)

    def regularized(self, temperature: float) -> AbstractRegularized:
        return self.inner.regularized(temperature)
