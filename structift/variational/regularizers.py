"""Regularizers of the marginal-polytope argmax, as values: ``Entropy()`` and ``L2(...)``.

``regularized_argmax(dist, τ, regularizer=...)`` solves max_{μ ∈ M} ⟨θ, μ⟩ − τ Ω(μ) with

- `Entropy` (the default): Ω = −H, the solution ∇A(θ/τ) (dense, softmax on the simplex);
- `L2`: Ω = ½‖μ_U‖² on the node part μ_U, SparseMAP (sparse, sparsemax on the simplex;
  `structift.variational.sparsemap`). Its solver options are its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["L2", "Entropy", "Regularizer"]


@dataclass(frozen=True)
class Entropy:
    """Ω(μ) = −H(μ): the entropy-regularized argmax μ* = ∇A(θ/τ)."""


@dataclass(frozen=True)
class L2:
    """Ω(μ) = ½‖μ_U‖²: SparseMAP, solved by the active-set method of `sparsemap`.

    Args:
        max_iter: active-set iteration budget.
        tol: relative tolerance on the duality gap.
        on_failure: ``"raise"`` or ``"warn"`` when the budget runs out.
    """

    max_iter: int = 10_000
    tol: float = 1e-12
    on_failure: Literal["raise", "warn"] = "raise"


Regularizer = Entropy | L2
