r"""The SparseMAP Fenchel–Young loss: training structured predictors with sparse marginals.

For a regularizer Ω and gold structure y, the Fenchel–Young loss (Blondel, Martins & Niculae,
JMLR 2020, arXiv:1901.02324) is

    L_Ω(θ; y) = Ω*(θ) + Ω(φ(y)) − ⟨θ, φ(y)⟩,    Ω*(θ) = max_{μ ∈ M} ⟨θ, μ⟩ − Ω(μ),

non-negative, zero exactly when μ*(θ) = φ(y), convex in θ, with gradient ∇_θ L = μ*(θ) − φ(y)
(Danskin). With Ω = −H it is the CRF negative log-likelihood (Ω* = A); with
Ω(μ) = (τ/2)‖μ_U‖² it is the SparseMAP loss (Niculae et al., arXiv:1802.04223): μ* is the sparse
combination of a few structures returned by `structift.variational.sparsemap`, and only those
structures receive gradient, so a training step costs a few MAP calls instead of
forward-backward.

The value is assembled from the active set, μ* = Σ_s α_s φ(y_s): ⟨θ, μ*⟩ = Σ_s α_s ⟨θ, φ(y_s)⟩,
with the weights α held fixed (no graph through the solver is needed: the gradient of the
maximum is the maximizer's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.families import ExpFamily
from structift.variational.argmax import _check_dist, _check_temperature
from structift.variational.sparsemap import OnFailure, solve_active_set

__all__ = ["sparsemap_loss"]


def _half_norm(unary: Tensor, batch_dims: int) -> Tensor:
    return 0.5 * unary.flatten(batch_dims).square().sum(-1)


def sparsemap_loss(
    dist: ExpFamily,
    value: Tensor,
    temperature: float = 1.0,
    *,
    max_iter: int = 10_000,
    tol: float = 1e-9,
    on_failure: OnFailure = "raise",
) -> Tensor:
    r"""The SparseMAP Fenchel–Young loss L(θ; y) of gold structures ``value`` (module docstring).

    L = [⟨θ, μ*⟩ − (τ/2)‖μ*_U‖²] − [⟨θ, φ(y)⟩ − (τ/2)‖φ_U(y)‖²] with μ* the SparseMAP solution;
    ∇_θ L = μ* − φ(y).

    Args:
        dist: a structift distribution with an ``argmax`` (e.g. a `structift.LinearChainCRF`,
            as built by `structift.CRF.distribution`).
        value: gold structures ``[*batch, *event]`` (e.g. tags ``[B, T]``; padding ignored).
        temperature: τ > 0 of the L2 regularizer.
        max_iter: the active-set solver's iteration limit (as in `sparsemap`).
        tol: its duality-gap tolerance (as in `sparsemap`; looser by default, enough for a loss).
        on_failure: ``"raise"`` or ``"warn"`` when it does not converge (as in `sparsemap`).

    Returns:
        Tensor ``[*batch]``, ``>= 0`` up to the solver's tolerance (clamped at 0), differentiable
        in the natural parameters.

    Raises:
        ValueError: ``value`` is not a structure of ``dist`` (as ``dist.log_prob``), the gold
            structure is forbidden by −inf potentials, or as `sparsemap`.
    """
    tau = _check_temperature(temperature)
    dist = _check_dist(dist)
    dist._check_value(value)
    structure, theta = dist.structure, dist._natural_params
    nb = len(structure.batch_shape)
    gold = structure.score(theta, value)  # shape: (*batch)
    if bool(torch.isneginf(gold.detach()).any()):
        index = tuple(int(i) for i in torch.isneginf(gold.detach()).nonzero()[0])
        raise ValueError(
            f"sparsemap_loss: the gold structure at batch index {index} has score -inf (the "
            "potentials forbid it); fix the labels or the constraints"
        )
    if structure.batch_shape.numel() == 0:
        return gold
    state = solve_active_set(dist, tau, max_iter, tol, on_failure)
    dtype = theta[0].dtype
    K = state.values.shape[0]
    used = (state.active & (state.alpha > 0)).T.reshape(K, *structure.batch_shape)
    weights = torch.where(used, state.alpha.T.reshape(used.shape), 0.0).to(dtype)
    scores = structure.score(theta, state.values)  # shape: (K, *batch)
    inner = (weights * torch.where(used, scores, 0.0)).sum(0)
    unary = structure.unary_statistics(state.values, dtype)  # shape: (K, *batch, *part)
    mu_u = (weights.reshape(*weights.shape, *(1,) * (unary.dim() - weights.dim())) * unary).sum(0)
    gold_u = structure.unary_statistics(value, dtype)
    loss = (inner - tau * _half_norm(mu_u, nb)) - (gold - tau * _half_norm(gold_u, nb))
    return loss.clamp_min(0.0)
