"""The structure protocol: what a kind of structure must provide to join structift.

A *structure* owns the combinatorics of one sample space (the simplex, a linear chain, a
segmentation, a tree): given natural parameters θ it computes the log-partition A(θ), the
marginals μ = ∇A(θ), the one covariance-vector product ∇²A(θ) v, MAP and samples, scores and
statistics of given structures, the entropy and KL as sums of non-negative local terms, and the
pieces of its entropy-regularized variational problem (``regularized``). It holds no
parameters: a *family* (``structift.families``) is natural parameters plus a structure, and
everything the families, ``structift.variational`` and ``structift.layers`` need they ask the
structure for. So adding a structure means one module (or package) implementing this class,
and one export line.

Conventions: θ and μ are tuples of tensors in the structure's own layout, each
``[*batch, *part]``; ``value`` is a structure ``[*S, *batch, *event]`` (integer tensor).
Methods never validate user input (the families do) and never mutate their arguments.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from structift.implicit import AbstractLinearSolver, AbstractResidual

__all__ = ["AbstractKKTSystem", "AbstractRegularized", "AbstractStructure", "Exact", "Iterative"]

Params = tuple[Tensor, ...]


@dataclass(frozen=True)
class Exact:
    """Forward solver: the exact marginals at θ/τ (the structure's own dynamic program)."""


@dataclass(frozen=True)
class Iterative:
    """Forward solver that does not run the structure's dynamic program.

    Chains: damped parallel sum-product message passing (block coordinate ascent on the dual of
    the Bethe problem, exact on chains at convergence). The simplex: entropic mirror descent,
    log μ ← (1 − ρ) log μ + ρ θ/τ, normalized. Both stop when the max-abs change of the
    log-iterate is below ``tol``, or after ``max_iter`` steps.

    Args:
        tol: stopping tolerance on the change of the log-messages / log-iterate.
        max_iter: iteration budget.
        damping: ρ in (0, 1].
    """

    tol: float = 1e-12
    max_iter: int = 10_000
    damping: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"Iterative: damping must be in (0, 1]; got {self.damping}")
        if self.max_iter < 1:
            raise ValueError(f"Iterative: max_iter must be >= 1; got {self.max_iter}")


class AbstractStructure(abc.ABC):
    """The combinatorics of one kind of structure (see the module docstring).

    ``padding_value`` is what a structure holds where it has no entry (beyond its length) and
    what ranks of ``topk`` beyond the number of structures hold: 0 for tag sequences, -1 for
    trees and segmentations (whose 0 is a real head or label).
    """

    padding_value: int = 0

    @property
    @abc.abstractmethod
    def batch_shape(self) -> torch.Size:
        """The batch shape of the distributions over this space."""

    @property
    @abc.abstractmethod
    def event_shape(self) -> torch.Size:
        """The shape of one structure (e.g. ``[T]`` tags, ``()`` for a category)."""

    @abc.abstractmethod
    def same_space(self, other: AbstractStructure) -> bool:
        """Whether ``other`` describes the same sample space (shapes and lengths agree)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short description of the space for error messages."""

    # ---- A(θ) and its derivatives ---------------------------------------------------------

    @abc.abstractmethod
    def log_partition(self, theta: Params) -> Tensor:
        """A(θ), shape ``batch_shape``; differentiable to any order, ``-inf`` if infeasible."""

    @abc.abstractmethod
    def posterior(self, theta: Params, create_graph: bool = False) -> tuple[Tensor, Params]:
        """``(A(θ), μ)`` in one pass; μ differentiable when ``create_graph``.

        ``A(θ) = -inf`` exactly where no structure has a finite score (μ is 0 there).
        """

    @abc.abstractmethod
    def hvp(self, mu: Params, v: Params, theta: Params | None = None) -> Params:
        """The covariance-vector product ``∇²A(θ) v = Cov[φ, ⟨v, φ⟩]``.

        Chains and the simplex compute it from the marginals μ alone (their covariance is a
        function of μ) and ignore ``theta``; structures whose covariance is not (trees,
        segmentations: ``structift.structures.autograd``) need ``theta`` and ignore ``mu``.
        """

    # ---- structures -----------------------------------------------------------------------

    @abc.abstractmethod
    def argmax(self, theta: Params) -> tuple[Tensor, Tensor]:
        """``(the MAP structure, its score)``; ties broken by a documented rule."""

    @abc.abstractmethod
    def topk(self, theta: Params, k: int) -> tuple[Tensor, Tensor]:
        """``(values [k, *batch, *event], scores [k, *batch])``: the ``k`` best structures.

        Exact, best first, ties broken by a documented rule (for ``k = 1`` the rule of
        ``argmax``). ``scores`` are ``score(theta, values)``, differentiable in θ. Ranks beyond
        the number of finite-score structures are not structures: score ``-inf``, value
        ``padding_value``.
        ``k`` is a validated int ``>= 1`` (the families check it).
        """

    @abc.abstractmethod
    def sample(
        self, theta: Params, sample_shape: torch.Size, generator: torch.Generator | None
    ) -> Tensor:
        """Exact samples ``[*sample_shape, *batch, *event]`` (no gradient)."""

    @abc.abstractmethod
    def score(self, theta: Params, value: Tensor) -> Tensor:
        """⟨θ, φ(value)⟩ ``[*S, *batch]``, differentiable in θ."""

    @abc.abstractmethod
    def statistics(self, value: Tensor, dtype: torch.dtype) -> Params:
        """φ(value) in the layout of θ, each ``[*S, *batch, *part]``."""

    def unary_statistics(self, value: Tensor, dtype: torch.dtype) -> Tensor:
        """φ_U(value), the first part of ``statistics`` (SparseMAP's regularized part).

        Structures whose other parts are large (a chain's pairwise indicators, Z² per step)
        override this to skip building them.
        """
        return self.statistics(value, dtype)[0]

    @abc.abstractmethod
    def check_value(self, name: str, value: Tensor, device: torch.device) -> None:
        """Raise ``TypeError``/``ValueError`` naming ``name`` if ``value`` is not a structure."""

    # ---- entropy and KL as sums of non-negative local terms (no graph) ---------------------

    @abc.abstractmethod
    def entropy(self, theta: Params, mu: Params) -> Tensor:
        """H(p) from θ and the (detached) marginals μ, ``>= 0`` by construction."""

    @abc.abstractmethod
    def kl(self, theta_p: Params, theta_q: Params, mu_p: Params) -> Tensor:
        """KL(p ‖ q) on the same space, ``>= 0`` by construction, ``+inf`` if q forbids p."""

    # ---- the variational view --------------------------------------------------------------

    @abc.abstractmethod
    def regularized(self, temperature: float) -> AbstractRegularized:
        """The problem ``max_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ)`` over this structure's polytope."""


class AbstractRegularized(abc.ABC):
    """The entropy-regularized argmax over one structure's marginal polytope, in KKT form.

    μ*(θ) = argmax_{μ ∈ M} ⟨θ, μ⟩ + τ H(μ) = ∇A(θ/τ). ``structift.variational`` solves it
    (``solve``), builds its KKT system at the solution (``at``) and differentiates it by the
    implicit function theorem; everything structure-specific is here.
    """

    temperature: float

    @abc.abstractmethod
    def solve(self, theta: Params, solver: Exact | Iterative) -> Params:
        """μ* by the forward solver ``solver``, no graph."""

    @abc.abstractmethod
    def at(self, mu: Params, theta: Params) -> AbstractKKTSystem:
        """The KKT system at the candidate μ (duals recovered, support fixed from μ)."""

    @abc.abstractmethod
    def empty(self, theta: Params) -> Any:
        """The point of an empty batch: empty tensors of the right shapes, attached to θ."""

    @abc.abstractmethod
    def mu(self, z: Any) -> Params:
        """The marginals μ held by a point."""


class AbstractKKTSystem(AbstractResidual):
    """The KKT system of a regularized argmax at one solution, on its support.

    ``point`` is a pytree (a NamedTuple) of primal and dual variables, batch first; the system
    is a residual (``structift.implicit.AbstractResidual``): ``self(point, *θ) == 0`` is the
    invariant, and ``∂F/∂z`` is symmetric and nonsingular (the support restriction makes it
    so). Its optional ``theta_cotangent`` gives ``−(∂F/∂θ)ᵀ u`` in closed form.
    """

    point: Any

    @abc.abstractmethod
    def __call__(self, z: Any, *theta: Tensor) -> Any:
        """F(z; θ), the same pytree as z (differentiable in z and θ)."""

    @abc.abstractmethod
    def structured_solver(self, check: bool, rtol: float | None) -> AbstractLinearSolver:
        """An exact linear solver for ``∂F/∂z`` here (a ``structift.implicit`` solver)."""

    @abc.abstractmethod
    def scales(self) -> Any:
        """A diagonal scaling D (pytree like z): D K D has O(1) entries (for generic solvers)."""
