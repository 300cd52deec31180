"""``check_ift``: the IFT gradient of the regularized argmax against autograd through A(θ)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from structift.families import ExpFamily
from structift.variational.argmax import (
    ForwardSolver,
    LinearSolverSpec,
    kkt_residual,
    regularized_argmax,
)

__all__ = ["IFTCheck", "check_ift"]


class IFTCheck(NamedTuple):
    """Result of `check_ift`.

    Attributes:
        max_abs_error: max over cotangents and parameter entries of |IFT − autograd|; ``inf``
            if either VJP has a non-finite entry (at a finite parameter).
        max_rel_error: max over cotangents of
            ‖IFT − autograd‖_∞ / max(‖autograd‖_∞, floor), with the floor
            ``‖g‖_∞ / (4τ)``, the largest magnitude of one entry of the Jacobian
            (1/τ)∇²A(θ/τ) (a covariance of indicators is at most 1/4) times the cotangent: a
            peaked distribution's VJP can be 1e-30 of that, and dividing a correct result's
            rounding error by it would report 1e16. ``inf`` with any non-finite value.
        forward_residual: max over the batch of the KKT residual norm at the forward solution.
        forward_error: max |μ_forward − ∇A_τ(θ)| (how far the forward solver is from exact).
        reference_scale: max over cotangents of ‖autograd VJP‖_∞ (the relative error's scale).
    """

    max_abs_error: float
    max_rel_error: float
    forward_residual: float
    forward_error: float
    reference_scale: float


def _rebuild(dist: object) -> tuple[ExpFamily, list[Tensor]]:
    """Return a copy of ``dist`` on fresh leaf parameters (requiring grad) and those leaves."""
    if not isinstance(dist, ExpFamily):
        raise TypeError(
            f"dist must be a structift distribution (an ExpFamily); got {type(dist).__name__}"
        )
    leaves = [p.detach().clone().requires_grad_(True) for p in dist._parameters]
    return dist._replace(*leaves), leaves


def _amax(x: Tensor) -> float:
    """Return max |x| as a float: 0 for an empty tensor, ``inf`` if any entry is NaN or inf.

    (Python's ``max(err, nan)`` would drop a NaN: non-finite values are infinite errors.)
    """
    if not x.numel():
        return 0.0
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return float(x.abs().max())


def _pairing(xs: Sequence[Tensor], gs: Sequence[Tensor]) -> Tensor:
    """Return Σ_k ⟨x_k, g_k⟩ (a scalar to differentiate)."""
    return torch.stack([(x * g.reshape(x.shape)).sum() for x, g in zip(xs, gs)]).sum()


def _natural(dist: ExpFamily) -> tuple[Tensor, ...]:
    return tuple(dist._natural_params)


def check_ift(
    dist: ExpFamily,
    temperature: float = 1.0,
    solver: ForwardSolver = "exact",
    linear_solver: LinearSolverSpec = "structured",
    num_cotangents: int = 3,
    generator: torch.Generator | None = None,
) -> IFTCheck:
    """Compare the IFT vector-Jacobian product of the regularized argmax with autograd.

    For random cotangents g on μ, computes gᵀ dμ*/dθ two ways: through
    `regularized_argmax` (the KKT system and a linear solve) and by double-backward
    through the smoothed log-partition A_τ(θ) = τ A(θ/τ), whose Hessian (1/τ) ∇²A(θ/τ) is the
    exact Jacobian. For an HMM the parameters are its init/transition/emission logits
    (the posterior's potentials are functions of them).

    Args:
        dist: any structift distribution (Categorical, LinearChainCRF, HMM, ...).
        temperature: τ > 0.
        solver: forward solver (see `regularized_argmax`).
        linear_solver: backward linear solver (see `regularized_argmax`).
        num_cotangents: how many random cotangents (standard normal) to try.
        generator: a torch.Generator for the cotangents (default: the global RNG).

    Returns:
        An `IFTCheck` with the errors and the forward KKT residual.
    """
    tau = float(temperature)
    copy, params = _rebuild(dist)
    mu_ift = regularized_argmax(copy, tau, solver=solver, linear_solver=linear_solver)
    leaves_ift = [mu_ift] if isinstance(mu_ift, Tensor) else list(mu_ift)
    theta = _natural(copy)
    a_tau = tau * copy._log_normalizer(*(t / tau for t in theta))
    mu_ref = torch.autograd.grad(a_tau.sum(), theta, create_graph=True)

    max_abs, max_rel, max_scale = 0.0, 0.0, 0.0
    for _ in range(num_cotangents):
        gs = [
            torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            for x in leaves_ift
        ]
        floor = max(_amax(g) for g in gs) / (4 * tau)
        ift = torch.autograd.grad(
            _pairing(leaves_ift, gs),
            params,
            retain_graph=True,
            allow_unused=True,
        )
        ref = torch.autograd.grad(
            _pairing(mu_ref, gs),
            params,
            retain_graph=True,
            allow_unused=True,
        )
        err, scale = 0.0, 0.0
        for a, b, p in zip(ift, ref, params):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            # A −inf potential has zero mass: its derivative is 0 by definition in both paths,
            # so entries there are not compared; but a NaN/inf gradient anywhere is an error.
            finite = torch.isfinite(p)
            bad = not bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            err = max(err, float("inf") if bad else _amax(torch.where(finite, a - b, 0.0)))
            scale = max(scale, _amax(torch.where(finite, b, 0.0)))
        max_abs = max(max_abs, err)
        max_rel = max(max_rel, err / max(scale, floor) if max(scale, floor) > 0 else err)
        max_scale = max(max_scale, scale)

    res = kkt_residual(copy, mu_ift, tau)
    fwd_err = max(
        _amax(a.detach() - b.detach().reshape(a.shape)) for a, b in zip(leaves_ift, mu_ref)
    )
    return IFTCheck(max_abs, max_rel, _amax(res.norm), fwd_err, max_scale)
