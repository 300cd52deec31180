"""``Simplex``: one of n outcomes (the categorical), as an instance of the structure protocol.

θ = (logits ``[*batch, n]``,); the structures are outcomes ``[*S, *batch]``; A(θ) = logsumexp(θ),
μ = softmax(θ), ∇²A v = μ ⊙ (v − ⟨μ, v⟩). Also the one home of the simplex's variational
problem (the seed's worked example, §4):

    z*(θ) = argmax_{z ∈ Δⁿ} ⟨θ, z⟩ + τ H(z) = softmax(θ/τ),

with the KKT residual ``F_z = τ log z + ν − θ`` (on the support S = {z > tiny}; ``F_z = z``
off it), ``F_ν = Σ_S z − 1``, whose Jacobian ``K = [[τ diag(1/z), 1], [1ᵀ, 0]]`` is symmetric,
and the two forward solvers: Newton's method on the one-dimensional dual (``dual_newton``) and
entropic mirror descent (``mirror_descent``). ``structift.variational.simplex`` builds its
worked-example API on these.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from structift._ops import logsumexp, softmax_entropy, softmax_kl
from structift.implicit import ConvergenceError
from structift.implicit._deprecation import renamed_kwargs
from structift.implicit.solvers import AbstractLinearSolver, LinearSolution, Status
from structift.structures.base import (
    AbstractKKTSystem,
    AbstractRegularized,
    AbstractStructure,
    Exact,
    Iterative,
    Params,
)

__all__ = [
    "Simplex",
    "SimplexKKT",
    "dual_newton",
    "kkt_residual",
    "mirror_descent",
    "point_from_primal",
    "support",
]

Temperature = float | Tensor


class SimplexKKT(NamedTuple):
    """A primal-dual point of the simplex problem: ``z`` ``[..., n]``, ``nu`` ``[..., 1]``."""

    z: Tensor
    nu: Tensor


def support(z: Tensor) -> Tensor:
    """The support ``z > tiny``: subnormal masses count as zero (their reciprocals overflow)."""
    return z > torch.finfo(z.dtype).tiny


def kkt_residual(
    point: SimplexKKT, theta: Tensor, temperature: Temperature = 1.0, *, scaled: bool = False
) -> SimplexKKT:
    """Return the KKT residual (F_z, F_ν) of the entropy-regularized argmax (seed eq. 4).

    On the support S: ``F_z = τ log z + ν − θ`` (or, with ``scaled=True``,
    ``D (τ log z + ν − θ)`` with D = diag(z) held constant (detached): the same equations
    left-preconditioned, whose Jacobian [[τI, z], [1ᵀ, 0]] is well conditioned however small
    z gets, and whose IFT derivative equals the unscaled one at every point); off the support
    ``F_zᵢ = zᵢ``; ``F_ν = Σ_{i∈S} zᵢ − 1``. Zero exactly at
    ``(softmax(θ/τ), τ logsumexp(θ/τ))``.

    Args:
        point: ``SimplexKKT(z [..., n], nu [..., 1])``.
        theta: logits ``[..., n]`` (−inf where zᵢ = 0).
        temperature: τ > 0, a float or a tensor broadcastable to ``[..., 1]``.
        scaled: use the row-scaled (non-symmetric, well-conditioned) form.

    Returns:
        ``SimplexKKT(F_z [..., n], F_nu [..., 1])``.
    """
    z, nu = point
    on = support(z.detach())
    safe_z = torch.where(on, z, torch.ones_like(z))
    safe_theta = torch.where(on, theta, torch.zeros_like(theta))
    stationarity = temperature * torch.log(safe_z) + nu - safe_theta
    if scaled:
        # A constant (detached) row scaling is a left preconditioner: (D ∂F/∂z)⁻¹ D ∂F/∂θ is
        # the same IFT derivative at every point.
        stationarity = safe_z.detach() * stationarity
    F_z = torch.where(on, stationarity, z)
    F_nu = torch.where(on, z, torch.zeros_like(z)).sum(-1, keepdim=True) - 1
    return SimplexKKT(F_z, F_nu)


def point_from_primal(z: Tensor, theta: Tensor, temperature: Temperature = 1.0) -> SimplexKKT:
    """Complete a primal z to a KKT point: ν = Σ_S zᵢ (θᵢ − τ log zᵢ) (exact at the optimum)."""
    on = support(z)
    gap = torch.where(on, theta - temperature * torch.log(torch.where(on, z, 1.0)), 0.0)
    return SimplexKKT(z, (torch.where(on, z, 0.0) * gap).sum(-1, keepdim=True))


@renamed_kwargs(max_iters="max_iter")
def dual_newton(
    theta: Tensor, temperature: Temperature = 1.0, max_iter: int = 100, tol: float | None = None
) -> SimplexKKT:
    """Solve the problem by Newton's method on its one-dimensional dual.

    The optimal ν solves φ(ν) = Σᵢ exp((θᵢ − ν)/τ) − 1 = 0, a convex decreasing function.
    Newton from ν₀ = max θ (where φ ≥ 0) increases ν monotonically to the root:
    ν ← ν + τ φ/(1 + φ). Then zᵢ = exp((θᵢ − ν)/τ). No graph is built.

    Args:
        theta: ``[..., n]`` logits (−inf allowed, one finite per row).
        temperature: τ > 0 (float or tensor broadcastable to ``[..., 1]``).
        max_iter: Newton budget (about log n + 10 steps are needed).
        tol: stop when every step is below ``tol · τ`` (default 4·eps).

    Raises:
        ConvergenceError: if the budget is spent first.
    """
    tol = 4 * torch.finfo(theta.dtype).eps if tol is None else tol
    with torch.no_grad():
        theta = theta.detach()
        if isinstance(temperature, Tensor):
            temperature = temperature.detach()
        nu = theta.amax(-1, keepdim=True)
        if theta.numel() == 0:
            return SimplexKKT(torch.zeros_like(theta), nu)
        for _ in range(max_iter):
            phi = torch.exp((theta - nu) / temperature).sum(-1, keepdim=True) - 1
            step = temperature * phi / (1 + phi)
            nu = nu + step
            if bool((step.abs() <= tol * temperature * (1 + nu.abs())).all()):
                break
        else:
            raise ConvergenceError(
                f"dual_newton did not converge in {max_iter} steps (last step "
                f"{float(step.abs().max()):.3g}); raise max_iter or loosen tol"
            )
        return SimplexKKT(torch.exp((theta - nu) / temperature), nu)


def _normalize(log_z: Tensor) -> Tensor:
    """Subtract logsumexp over the last dim; rows with no finite entry stay all −inf."""
    total = logsumexp(log_z, -1).unsqueeze(-1)
    return log_z - torch.where(torch.isfinite(total), total, torch.zeros_like(total))


@renamed_kwargs(steps="max_iter", step_size="damping")
def mirror_descent(
    theta: Tensor,
    temperature: Temperature = 1.0,
    max_iter: int = 100,
    damping: float = 0.5,
    tol: float | None = None,
) -> Tensor:
    """Solve the problem by entropic mirror descent (exponentiated gradient).

    One step with step size η = ρ/τ is ``log z ← (1 − ρ) log z + ρ θ/τ``, normalized: the
    error of log z contracts by |1 − ρ| per step (ρ = 1 jumps to the solution). −inf logits stay
    at zero mass. Without ``tol`` exactly ``max_iter`` steps run, differentiable by autograd
    (the unrolled baseline: its memory grows with the steps); with ``tol`` it stops once the
    largest change of a finite log-iterate is below ``tol``.

    Args:
        theta: ``[..., n]`` logits (−inf allowed, one finite per row).
        temperature: τ > 0.
        max_iter: iteration budget K.
        damping: ρ ∈ (0, 2) (ρ ≤ 1 converges monotonically).
        tol: optional stopping tolerance.

    Returns:
        z ``[..., n]`` on the simplex.
    """
    if not 0 < damping < 2:
        raise ValueError(f"damping must be in (0, 2); got {damping}")
    target = theta / temperature
    log_z = _normalize(torch.where(torch.isneginf(target), target, torch.zeros_like(target)))
    for _ in range(max_iter):
        mixed = (1 - damping) * log_z + damping * target
        new = _normalize(torch.where(torch.isneginf(target), target, mixed))
        if tol is not None:
            finite = torch.isfinite(new)
            change = (new - log_z).abs()[finite]
            log_z = new
            if not change.numel() or float(change.max()) <= tol:
                break
        else:
            log_z = new
    return torch.exp(log_z)


class SimplexSolve(AbstractLinearSolver):
    """The exact solve of the simplex KKT system at z, in closed form (a Schur complement).

    On the support, ``K [x; y] = [r; ρ]`` with ``K = [[τ diag(1/z), 1], [1ᵀ, 0]]`` gives
    ``y = (⟨z, r⟩ − τ ρ) / Σz`` and ``x = z ⊙ (r − y) / τ``: O(n), no factorization. Off the
    support K is the identity. Right-hand sides are ``[B, n + 1]`` (z's block, then ν).
    """

    def __init__(self, z: Tensor, temperature: float) -> None:
        self.n = z.shape[-1]
        self.z, self.tau = z.detach().reshape(-1, self.n), temperature

    def init(self, operator: Any) -> Any:
        """Keep the operator (only used to report the residual)."""
        return operator

    def transpose(self, state: Any) -> Any:
        """K is symmetric."""
        return state

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        """Solve ``K x = rhs`` exactly and report the true residual."""
        r, rho = rhs[:, : self.n], rhs[:, self.n :]
        on = support(self.z)
        zs = torch.where(on, self.z, 0.0)
        total = zs.sum(-1, keepdim=True).clamp_min(torch.finfo(zs.dtype).tiny)
        y = ((zs * r).sum(-1, keepdim=True) - self.tau * rho) / total
        x = torch.where(on, zs * (r - y) / self.tau, r)
        sol = torch.cat([x, y], -1)
        rnorm = torch.linalg.vector_norm(rhs - state.mv(sol), dim=-1)
        return LinearSolution(sol, rnorm, 0, Status.SUCCESS)


class Simplex(AbstractStructure):
    """One of ``n`` outcomes, for a batch of shape ``batch_shape`` (θ = logits ``[*batch, n]``).

    Args:
        batch_shape: the batch shape.
        num_events: n.
    """

    def __init__(self, batch_shape: torch.Size, num_events: int) -> None:
        self._batch_shape = torch.Size(batch_shape)
        self.num_events = num_events

    @property
    def batch_shape(self) -> torch.Size:
        return self._batch_shape

    @property
    def event_shape(self) -> torch.Size:
        return torch.Size()

    def same_space(self, other: AbstractStructure) -> bool:
        return isinstance(other, Simplex) and other.num_events == self.num_events

    def describe(self) -> str:
        return f"simplex(n={self.num_events})"

    def log_partition(self, theta: Params) -> Tensor:
        return logsumexp(theta[0], -1)

    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            (logits,) = theta
            # softmax as a ratio with the finite maximum: exact ties, 0 for -inf logits
            m = logits.detach().amax(-1, keepdim=True)
            e = torch.exp(logits - torch.where(torch.isfinite(m), m, 0.0))
            return logsumexp(logits, -1), (e / e.sum(-1, keepdim=True),)

    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        (p,), (w,) = mu, v
        w = torch.where(p > 0, w, 0.0)  # directions on zero-mass outcomes do not matter
        return (p * (w - (p * w).sum(-1, keepdim=True)),)

    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        (logits,) = theta
        best = logits.detach().argmax(-1)
        return best, logits.gather(-1, best.unsqueeze(-1)).squeeze(-1)

    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` largest logits, ties to the lower index (a stable descending sort)."""
        (logits,) = theta
        n = self.num_events
        order = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices
        if k > n:  # ranks past n are missing: index 0, score -inf below
            pad = order.new_zeros((*order.shape[:-1], k - n))
            order = torch.cat([order, pad], -1)
        order = order[..., :k]
        scores = logits.gather(-1, order)
        rank = torch.arange(k, device=logits.device)
        exists = (rank < n) & (scores.detach() > float("-inf"))
        values = torch.where(exists, order, torch.zeros_like(order)).movedim(-1, 0)
        scores = torch.where(exists, scores, torch.full_like(scores, float("-inf")))
        return values, scores.movedim(-1, 0)

    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        (logits,) = theta
        shape = torch.Size(sample_shape)
        if shape.numel() == 0 or logits.numel() == 0:
            return torch.zeros(shape + self.batch_shape, dtype=torch.long, device=logits.device)
        with torch.no_grad():
            probs = self.posterior(theta)[1][0].reshape(-1, self.num_events)
            draws = torch.multinomial(probs, shape.numel(), replacement=True, generator=generator)
        return draws.t().reshape(shape + self.batch_shape)  # [prod(batch), prod(S)] -> [*S, *batch]

    def score(self, theta: Params, value: Tensor) -> Tensor:
        logits = theta[0].expand((*value.shape, self.num_events))
        return logits.gather(-1, value.unsqueeze(-1)).squeeze(-1)

    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        return (torch.nn.functional.one_hot(value, self.num_events).to(dtype),)

    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        from structift._checks import check_index_tensor

        check_index_tensor(name, value, tuple(self.batch_shape), self.num_events, device)

    def entropy(self, theta: Params, mu: Params) -> Tensor:
        return softmax_entropy(theta[0])

    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        return softmax_kl(theta_p[0], theta_q[0])

    def regularized(self, temperature: float) -> AbstractRegularized:
        return SimplexRegularized(self, temperature)


class SimplexRegularized(AbstractRegularized):
    """``argmax_{z ∈ Δ} ⟨θ, z⟩ + τ H(z)`` in the KKT form of the module docstring."""

    def __init__(self, structure: Simplex, temperature: float) -> None:
        self.structure, self.temperature = structure, temperature

    def solve(self, theta: Params, solver: Exact | Iterative) -> Params:
        tau = self.temperature
        with torch.no_grad():
            if isinstance(solver, Iterative):
                z = mirror_descent(theta[0], tau, solver.max_iter, solver.damping, solver.tol)
                return (z,)
            return self.structure.posterior((theta[0] / tau,))[1]

    def at(self, mu: Params, theta: Params) -> SimplexKKTSystem:
        return SimplexKKTSystem(mu[0], theta[0], self.temperature)

    def empty(self, theta: Params) -> SimplexKKT:
        (logits,) = theta
        link = logits.sum() * 0  # keeps the autograd edge to θ
        nu = logits.new_zeros((*logits.shape[:-1], 1))
        return SimplexKKT(logits.new_zeros(logits.shape) + link, nu + link)

    def mu(self, z: Any) -> Params:
        return (z.z,)


class SimplexKKTSystem(AbstractKKTSystem):
    """The simplex KKT system at one solution (module docstring); its solve is closed-form."""

    def __init__(self, z: Tensor, theta: Tensor, temperature: float) -> None:
        self.temperature = temperature
        self.point = point_from_primal(z.detach(), theta.detach(), temperature)

    def __call__(self, z: Any, *theta: Tensor) -> SimplexKKT:
        return kkt_residual(z, theta[0], self.temperature)

    def theta_cotangent(self, u: Any, z: Any, *theta: Tensor) -> Params:
        """``−(∂F/∂θ)ᵀ u = u_z`` on the support: ``F_z = τ log z + ν − θ`` is linear in θ."""
        return (torch.where(support(self.point.z), u.z, 0.0),)

    def structured_solver(self, check: bool, rtol: float | None) -> AbstractLinearSolver:
        return SimplexSolve(self.point.z, self.temperature)

    def scales(self) -> SimplexKKT:
        z, tau = self.point.z, self.temperature
        s_z = torch.where(support(z), torch.sqrt(z.clamp_min(0) / tau), 1.0)
        return SimplexKKT(s_z, torch.full_like(self.point.nu, tau**0.5))
