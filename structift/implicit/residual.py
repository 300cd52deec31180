"""Residuals as objects: the optimality condition ``F(z, *θ) = 0`` that ``custom_root`` uses.

A plain function ``F(z, *θ)`` is a residual; so is an ``AbstractResidual``, which can add what
only its author knows: the θ-cotangent ``−(∂F/∂θ)ᵀ u`` in closed form (θ often enters F
linearly, e.g. through a mask), instead of ``custom_root`` evaluating F once more under
autograd to get it. "What to solve" (the residual) and "how to solve the linear system" (the
solver) stay separate objects.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["AbstractResidual", "FunctionResidual"]


class AbstractResidual(abc.ABC):
    """``F(z, *θ)``, with an optional closed-form θ-cotangent.

    Invariant (the one ``custom_root`` relies on): the solver's output z satisfies
    ``self(z, *θ) == 0`` and ``∂F/∂z`` is invertible there.
    """

    @abc.abstractmethod
    def __call__(self, z: Any, *theta: Any) -> Any:
        """F(z, *θ): the same number of entries as z (any pytree layout), differentiable."""

    def theta_cotangent(self, u: Any, z: Any, *theta: Any) -> Sequence[Tensor | None] | None:
        """Return ``−(∂F/∂θ)ᵀ u`` per θ argument, or ``None`` to let autograd compute it.

        ``u`` solves ``(∂F/∂z)ᵀ u = v`` and has z's pytree layout; return one entry per θ
        argument, a tensor of that argument's shape or ``None`` (zero, or not a tensor). The
        result is what ``custom_root`` returns as θ's gradient: return new tensors, never
        ones you keep. For second derivatives it must be differentiable by autograd.
        """
        return None


class FunctionResidual(AbstractResidual):
    """A plain function as a residual, with an optional ``(∂F/∂θ)ᵀ u`` function.

    Args:
        fn: ``F(z, *θ)``.
        theta_vjp: ``(u, z, *θ) -> (∂F/∂θ)ᵀ u`` per θ argument (negated here), or None.
    """

    def __init__(
        self, fn: Callable[..., Any], theta_vjp: Callable[..., Sequence[Any]] | None = None
    ) -> None:
        self.fn, self.theta_vjp = fn, theta_vjp

    def __call__(self, z: Any, *theta: Any) -> Any:
        return self.fn(z, *theta)

    def theta_cotangent(self, u: Any, z: Any, *theta: Any) -> Sequence[Tensor | None] | None:
        if self.theta_vjp is None:
            return None
        out = self.theta_vjp(u, z, *theta)
        if not isinstance(out, tuple | list):
            return out  # custom_root reports the wrong type
        return [pytree.tree_map(lambda g: None if g is None else -g, x) for x in out]
