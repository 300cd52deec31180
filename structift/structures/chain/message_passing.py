"""An iterative forward solver for the chain problem: damped parallel message passing.

Sum-product message passing is block coordinate ascent on the Lagrangian dual of the Bethe
variational problem (Yedidia, Freeman & Weiss 2005; Wainwright & Jordan 2008, §4.1): its fixed
points are the stationary points of ⟨θ, μ⟩ + τ H_Bethe(μ) over the local polytope, and on a chain
(a tree) the fixed point is unique and exact, μ* = ∇A(θ/τ). Here every message is updated at
once from the previous iterate (a parallel, "flooding" schedule, so each iteration is one batched
tensor operation over all positions) and mixed geometrically with the old message,
log msg ← (1 − ρ) log msg + ρ log msg_new. With damping ρ < 1 the error decays geometrically and
smoothly with the iteration count, which makes it a good stand-in for "a solver that does not
know forward-backward": the IFT gradient must not care how μ was found.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from structift._ops import logsumexp

__all__ = ["MessagePassingResult", "chain_message_passing"]


class MessagePassingResult(NamedTuple):
    """Output of `chain_message_passing`.

    Attributes:
        mu_unary: node beliefs ``[B, T, Z]`` (zero beyond ``lengths``).
        mu_binary: edge beliefs ``[B, T-1, Z, Z]`` (zero beyond ``lengths - 1``).
        iterations: number of parallel updates performed.
        change: the last max-abs change of the finite log-messages.
    """

    mu_unary: Tensor
    mu_binary: Tensor
    iterations: int
    change: float


def _normalize(x: Tensor) -> Tensor:
    """Subtract logsumexp over the last dim; rows with no finite entry stay all −inf."""
    z = logsumexp(x, -1).unsqueeze(-1)
    return x - torch.where(torch.isfinite(z), z, torch.zeros_like(z))


def _mix(old: Tensor, new: Tensor, damping: float) -> Tensor:
    if damping >= 1.0:
        return new
    mixed = (1 - damping) * old + damping * new
    # −inf in either operand means a zero-mass state: keep −inf (and avoid −inf · 0 = NaN).
    dead = torch.isneginf(old) | torch.isneginf(new)
    return torch.where(dead, torch.full_like(mixed, -torch.inf), mixed)


def _beliefs(
    u: Tensor, w: Tensor, fwd: Tensor, bwd: Tensor, node_mask: Tensor, edge_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Return normalized node and edge beliefs from the messages (log domain in, probs out)."""
    B, T, Z = u.shape
    into_node = u + torch.nn.functional.pad(fwd, (0, 0, 1, 0)) + bwd  # shape: (B, T, Z)
    m = torch.exp(_normalize(into_node)) * node_mask[..., None]
    left = u[:, :-1] + torch.nn.functional.pad(fwd, (0, 0, 1, 0))[:, :-1]  # shape: (B, T-1, Z)
    right = u[:, 1:] + bwd[:, 1:]  # shape: (B, T-1, Z)
    edge = left[..., :, None] + w + right[..., None, :]  # shape: (B, T-1, Z, Z)
    M = torch.exp(_normalize(edge.reshape(B, T - 1, Z * Z))).reshape(B, T - 1, Z, Z)
    return m, M * edge_mask[..., None, None]


def chain_message_passing(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    temperature: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 1000,
    damping: float = 0.5,
) -> MessagePassingResult:
    """Solve max_μ ⟨θ, μ⟩ + τ H(μ) over a chain's marginal polytope by damped message passing.

    Iterates until the largest change of a finite log-message is below ``tol`` or ``max_iter``
    updates were made; the result is returned either way (check ``change``, or the KKT residual
    with `structift.variational.kkt_residual`). The iterates are plain tensor operations,
    so autograd can unroll them (used by the benchmark to compare memory with the IFT).

    Args:
        unary: ``[B, T, Z]`` node potentials (−inf allowed).
        binary: ``[B, T-1, Z, Z]`` edge potentials laid out ``[from, to]`` (−inf allowed).
        lengths: LongTensor ``[B]``, ``1 <= lengths <= T``.
        temperature: τ > 0.
        tol: stopping tolerance on the max-abs change of the log-messages.
        max_iter: iteration budget.
        damping: ρ in (0, 1]; ρ = 1 is undamped flooding (exact after max(lengths) - 1 sweeps).

    Returns:
        A `MessagePassingResult`.
    """
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    B, T, Z = unary.shape
    pos = torch.arange(T, device=unary.device)
    node_mask = pos[None, :] < lengths[:, None]  # shape: (B, T)
    edge_mask = pos[None, : T - 1] < lengths[:, None] - 1  # shape: (B, T-1)
    # Padding becomes neutral: zero node potentials, and edges that do not exist send nothing.
    u = torch.where(node_mask[..., None], unary / temperature, torch.zeros_like(unary))
    w = torch.where(edge_mask[..., None, None], binary / temperature, torch.zeros_like(binary))
    # fwd[:, t] is the message edge t sends to node t+1; bwd[:, t] the one node t receives from
    # edge t (zero at the last node of each sequence).
    fwd = unary.new_zeros(B, T - 1, Z)
    bwd = unary.new_zeros(B, T, Z)
    emask = edge_mask[..., None]
    change = float("inf")
    it = 0
    while it < max_iter and change > tol:
        into_left = u[:, :-1] + torch.nn.functional.pad(fwd, (0, 0, 1, 0))[:, :-1]
        new_fwd = _normalize(logsumexp(into_left[..., :, None] + w, -2))
        into_right = u[:, 1:] + bwd[:, 1:]
        new_bwd_edge = _normalize(logsumexp(w + into_right[..., None, :], -1))
        new_fwd = torch.where(emask, new_fwd, torch.zeros_like(new_fwd))
        new_bwd = torch.nn.functional.pad(
            torch.where(emask, new_bwd_edge, torch.zeros_like(new_bwd_edge)), (0, 0, 0, 1)
        )
        nxt_fwd, nxt_bwd = _mix(fwd, new_fwd, damping), _mix(bwd, new_bwd, damping)
        change = _max_change(fwd, nxt_fwd) if T > 1 else 0.0
        change = max(change, _max_change(bwd, nxt_bwd))
        fwd, bwd = nxt_fwd, nxt_bwd
        it += 1
    m, M = _beliefs(u, w, fwd, bwd, node_mask, edge_mask)
    return MessagePassingResult(m, M, it, change)


def _max_change(old: Tensor, new: Tensor) -> float:
    finite = torch.isfinite(old) & torch.isfinite(new)
    if not bool(finite.any()):
        return 0.0
    return float((new - old).abs()[finite].max().detach())
