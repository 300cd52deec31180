"""``LowRankChain``: tag sequences whose transition potentials have low non-negative rank.

θ = (unary ``[B, T, Z]``, log_a ``[Z, r]``, log_b ``[r, Z]``): the transition potentials are
``binary = log(exp(log_a) @ exp(log_b))``, shared by every step and sequence. The chain is the
marginal over ``k`` of a lifted chain ``z_0 -> k_0 -> z_1 -> ...`` (``_lowrank``), and θ are
that lifted chain's natural parameters, so the marginals ``μ = ∇A(θ)`` are the state marginals
and the *factored* expected transition counts (``E #(z_t = i, k_t = k)`` ``[B, Z, r]`` and
``E #(k_t = k, z_{t+1} = j)`` ``[B, r, Z]``); a ``[T, Z, Z]`` pairwise marginal is never formed.

Costs (B sequences, T steps, Z states, rank r):

- ``log_partition``, ``posterior``: ``O(B T Z r)`` time, ``O(B T Z + Z r)`` memory.
- ``sample``, ``score``: ``O(S B T (Z + r))``.
- ``entropy``: ``O(B T Z^2 + Z^2 r)`` time, ``O(B T Z + chunk)`` memory (``log P`` does not
  factor through the rank, so its rows are formed in chunks).
- ``argmax``, ``topk``: Viterbi on the materialized ``[Z, Z]`` matrix, ``O(T Z^2)`` time and
  ``O(Z^2)`` memory (max-product does not factor through a sum over ``k``): small Z only.

Not provided (they raise ``NotImplementedError``): ``hvp``, ``kl``, ``statistics`` (the lifted
statistics involve the unobserved ``k``) and ``regularized``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._ops import softmax_entropy
from structift.structures.base import AbstractRegularized, Params
from structift.structures.chain import _lowrank
from structift.structures.chain.backends import BackendSpec, resolve
from structift.structures.chain.structure import Chain, ChainSpace

__all__ = ["LowRankChain", "materialize"]

# Materialized blocks (entropy rows, log P) are formed in chunks of about this many elements.
CHUNK_ELEMENTS = 1 << 22


def materialize(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``log(exp(log_a) @ exp(log_b))`` ``[Z, Z]`` by a chunked logsumexp over the rank."""
    Z, r = log_a.shape
    step = max(1, CHUNK_ELEMENTS // max(1, r * Z))
    rows = [
        torch.logsumexp(log_a[i : i + step, :, None] + log_b[None], dim=1)
        for i in range(0, Z, step)
    ]
    return torch.cat(rows, 0)


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"LowRankChain.{what} is not implemented for low-rank transitions; materialize the "
        "transition matrix (LowRankTransition.log_probs()) and use dense transition_logits "
        "(small Z only)."
    )


class LowRankChain(ChainSpace):
    """Tag sequences ``[B, T]`` within ``lengths``, potentials θ = (unary, log_a, log_b).

    Args:
        lengths: LongTensor ``[B]`` (validated by the families).
        num_steps: T.
        num_states: Z.
        backend: the dense chain backend used for Viterbi on the materialized matrix.
    """

    def __init__(
        self, lengths: Tensor, num_steps: int, num_states: int, backend: BackendSpec = None
    ) -> None:
        self.lengths = lengths
        self.num_steps, self.num_states = num_steps, num_states
        self._backend = backend

    _kind = "low-rank chain"

    def dense(self, like: Tensor) -> Chain:
        """The dense chain on the same space (for decoding on the materialized matrix)."""
        return Chain(self.lengths, self.num_steps, self.num_states, resolve(self._backend, like))

    # ---- A(θ) ----------------------------------------------------------------------------

    def log_partition(self, theta: Params) -> Tensor:
        unary, log_a, log_b = theta
        return _lowrank.log_partition(unary, log_a, log_b, self.lengths)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        """``(A, (state marginals [B,T,Z], E #(z,k) [B,Z,r], E #(k,z') [B,r,Z]))``."""
        unary, log_a, log_b = theta
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            msg = _lowrank.forward(unary, log_a, log_b, self.lengths)
            back = _lowrank.backward(msg)
            gamma = _lowrank.state_marginals(msg, back)
            n, m = _lowrank.factored_counts(msg, back)
        return msg.log_z, (gamma, n, m)

    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        raise _unsupported("hvp")

    # ---- structures ----------------------------------------------------------------------

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        """Viterbi on the materialized ``[Z, Z]`` matrix (``O(T Z^2)``; small Z only)."""
        unary, log_a, log_b = theta
        with torch.no_grad():
            tags, _ = self.dense(unary).argmax((unary, materialize(log_a, log_b)))
        return tags, self.score(theta, tags)

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """k-best Viterbi on the materialized matrix (small Z only); scores factored."""
        unary, log_a, log_b = theta
        with torch.no_grad():
            values, dense = self.dense(unary).topk((unary, materialize(log_a, log_b)), k)
        scores = self.score(theta, values)
        return values, torch.where(dense > float("-inf"), scores, dense)

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        """Forward-filter, backward-sample through the lifted chain: ``k_t``, then ``z_t``."""
        unary, log_a, log_b = (x.detach() for x in theta)
        with torch.no_grad():
            msg = _lowrank.forward(unary, log_a, log_b, self.lengths)
            return _sample(msg, self.lengths, tuple(sample_shape), generator)

    def score(self, theta: Params, value: Tensor) -> Tensor:
        unary, log_a, log_b = theta
        T, Z = unary.shape[1:]
        mask = self.mask()
        tags = torch.where(mask, value, torch.zeros_like(value))  # shape: (*S, B, T)
        u = unary.expand(*tags.shape, Z).gather(-1, tags.unsqueeze(-1)).squeeze(-1)
        total = torch.where(mask, u, torch.zeros_like(u)).sum(-1)
        if T > 1:
            # log P[z_t, z_{t+1}] = logsumexp_k log_a[z_t, k] + log_b[k, z_{t+1}]: O(r) a step.
            pair = torch.logsumexp(log_a[tags[..., :-1]] + log_b.T[tags[..., 1:]], dim=-1)
            total = total + torch.where(mask[:, 1:], pair, torch.zeros_like(pair)).sum(-1)
        return total

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        raise _unsupported("statistics")

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        from structift._checks import check_index_tensor

        B, T = self.lengths.shape[0], self.num_steps
        check_index_tensor(name, value, (B, T), self.num_states, device, self.mask())

    # ---- entropy and KL ------------------------------------------------------------------

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        """H(z | x) as non-negative local terms: ``H(z_0) + Σ_t Σ_i p(z_t = i) H(z_{t+1} | i)``.

        Row ``(t, i)`` of the posterior transition has logits ``log P[i, :] + log g_{t+1}``
        (``_lowrank``), formed in chunks of rows; ``μ`` is not needed (recomputed here).
        """
        unary, log_a, log_b = (x.detach() for x in theta)
        with torch.no_grad():
            msg = _lowrank.forward(unary, log_a, log_b, self.lengths)
            back = _lowrank.backward(msg)
            gamma = _lowrank.state_marginals(msg, back).transpose(0, 1)  # shape: (T, B, Z)
            total = softmax_entropy(torch.log(gamma[0]))
            T, B, Z = gamma.shape
            if T == 1:
                return total
            inner = msg.mask[1:, :, None]
            log_g = torch.log(msg.expu[1:] * back.beta[1:]).masked_fill(~inner, 0.0)
            weights = gamma[:-1] * inner  # rows exist for t < L - 1
            step = max(1, CHUNK_ELEMENTS // max(1, (T - 1) * B * Z))
            log_p = materialize(log_a, log_b)
            for i0 in range(0, Z, step):
                rows = log_p[None, None, i0 : i0 + step] + log_g[:, :, None]  # (T-1, B, c, Z)
                w = weights[..., i0 : i0 + step]
                h = softmax_entropy(rows)
                total += torch.where(w > 0, w * h, 0.0).sum((0, 2))
        return total

    def differentiable_entropy_form(self, theta: Params) -> Tensor:
        """``A − E[<θ, φ>]`` with a graph: equal to H(z | x) as a function, for its gradient.

        ``E[log P[z_t, z_{t+1}]]`` needs the pair counts row block by row block
        (``O(B T Z^2)``); the per-step autograd graph of the messages is kept (``O(B T Z)``).
        """
        unary, log_a, log_b = theta
        msg = _lowrank.forward(unary, log_a, log_b, self.lengths)
        back = _lowrank.backward(msg)
        gamma = _lowrank.state_marginals(msg, back)
        inner = torch.where(gamma > 0, gamma * unary, torch.zeros_like(gamma)).sum((1, 2))
        Z = self.num_states
        if self.num_steps > 1:
            log_p = materialize(log_a, log_b)
            step = max(1, CHUNK_ELEMENTS // max(1, self.num_steps * unary.shape[0] * Z))
            for i0 in range(0, Z, step):
                counts = _lowrank.pair_counts(msg, back, slice(i0, i0 + step))
                block = log_p[None, i0 : i0 + step]
                inner = inner + torch.where(counts > 0, counts * block, 0.0).sum((1, 2))
        return msg.log_z - inner

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        raise _unsupported("kl")

    # ---- the variational view ------------------------------------------------------------

    def regularized(self, temperature: float) -> AbstractRegularized:
        raise _unsupported("regularized")


def _gumbel_argmax(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    return (logits - torch.log(-torch.log(u.clamp_min(tiny)))).argmax(-1)


def _sample(
    msg: _lowrank.Messages,
    lengths: Tensor,
    sample_shape: tuple[int, ...],
    generator: torch.Generator | None,
) -> Tensor:
    """Backward sampling: ``k_t ~ h_t[k] b[k, z_{t+1}]``, then ``z_t ~ alpha_t[i] a[i, k_t]``."""
    T, B, Z = msg.alpha.shape
    n = int(torch.Size(sample_shape).numel())
    lens = lengths.to(msg.alpha.device)
    log_alpha = torch.log(msg.alpha)  # shape: (T, B, Z)
    log_h = torch.log(msg.alpha @ msg.a)  # shape: (T, B, r)
    log_a, log_bt = torch.log(msg.a), torch.log(msg.b).T  # (Z, r), (Z, r)
    out = torch.zeros(n, B, T, dtype=torch.long, device=msg.alpha.device)
    nxt = torch.zeros(n, B, dtype=torch.long, device=msg.alpha.device)
    for t in range(T - 1, -1, -1):
        start = _gumbel_argmax(log_alpha[t].expand(n, B, Z), generator)
        z = start
        if t < T - 1:
            k = _gumbel_argmax(log_h[t] + log_bt[nxt], generator)  # shape: (n, B)
            back = _gumbel_argmax(log_alpha[t] + log_a.T[k], generator)  # shape: (n, B)
            z = torch.where((t < lens - 1)[None], back, z)
        z = torch.where((t < lens)[None], z, torch.zeros_like(z))
        out[:, :, t] = z
        nxt = z
    return out.reshape(*sample_shape, B, T)
