"""Linear operators on batched flat vectors.

Every operator maps a tensor ``x`` of shape ``[B, N]`` to ``[B, N]`` and acts on each row
independently (block diagonal over the batch): row ``b`` of ``op.mv(x)`` is ``A_b x_b``.
Solvers only ever call `AbstractLinearOperator.mv`, `transpose` and
`materialize`, so an operator can be a dense matrix, a closure, or the Jacobian of a
function evaluated lazily with ``torch.func`` (never materialized unless a dense solver asks).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "AbstractLinearOperator",
    "FunctionOperator",
    "JacobianOperator",
    "MatrixOperator",
]


class AbstractLinearOperator(abc.ABC):
    """A batch of square linear maps ``A_b`` acting on rows of ``[B, N]`` tensors.

    Attributes:
        batch_size: B, the number of independent systems.
        size: N, the dimension of each system.
        dtype: floating dtype of the vectors.
        device: device of the vectors.
        symmetric: whether every ``A_b`` is symmetric (lets CG/MINRES skip transposes).
        positive_definite: whether every ``A_b`` is symmetric positive definite.
    """

    batch_size: int
    size: int
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = False
    positive_definite: bool = False

    @abc.abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """Apply the operator: ``x`` [B, N] -> ``A x`` [B, N]."""

    @abc.abstractmethod
    def transpose(self) -> AbstractLinearOperator:
        """Return the operator ``x -> Aᵀ x``."""

    @property
    def T(self) -> AbstractLinearOperator:
        """The transposed operator (alias of `transpose`)."""
        return self.transpose()

    def materialize(self) -> Tensor:
        """Return the dense matrices ``[B, N, N]`` by applying ``mv`` to the basis vectors."""
        basis = torch.eye(self.size, dtype=self.dtype, device=self.device)
        # shape: (N, B, N) -- one basis vector e_j per batch row, result column j of A_b
        basis = basis.unsqueeze(1).expand(self.size, self.batch_size, self.size)
        cols = torch.stack([self.mv(e) for e in basis])
        return cols.permute(1, 2, 0)  # shape: (B, N, N), [b, i, j] = A_b[i, j]

    def _check(self, x: Tensor) -> None:
        if x.shape != (self.batch_size, self.size):
            raise ValueError(
                f"operator expects vectors of shape {(self.batch_size, self.size)}, "
                f"got {tuple(x.shape)}"
            )


def linearize(
    fn: Callable[..., Tensor], *primals: Tensor
) -> tuple[Tensor, Callable[..., tuple[Tensor, ...]]]:
    """Evaluate ``fn(*primals)`` and return it with its vector-Jacobian product.

    Uses plain ``torch.autograd`` (works with any differentiable op, custom
    ``autograd.Function`` included). The graph is recorded once and reused. When grad mode is
    on at the call, the products are themselves differentiable (``create_graph``) with respect
    to the primals that require grad and anything ``fn`` closes over — what second
    derivatives through `structift.implicit.custom_root` need.

    Returns:
        ``(out, vjp)`` where ``vjp(u, batched=False)`` returns ``(∂fn/∂primal)ᵀ u`` for each
        primal (zeros where ``fn`` does not depend on it); ``batched=True`` maps over a
        leading dim of ``u``.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        # A fresh view per primal: gradients are partial derivatives through this argument
        # only (not through other paths to the same tensor), yet stay connected to the
        # primal's own graph for higher derivatives.
        inputs = [
            p.view_as(p) if create_graph and p.requires_grad else p.detach().requires_grad_(True)
            for p in primals
        ]
        out = fn(*inputs)

    def vjp(u: Tensor, batched: bool = False) -> tuple[Tensor, ...]:
        if not out.requires_grad:  # fn ignores every primal
            lead = u.shape[:1] if batched else ()
            return tuple(
                torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device) for p in inputs
            )
        with torch.enable_grad() if create_graph else torch.no_grad():
            grads = torch.autograd.grad(
                out,
                inputs,
                u,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
        lead = u.shape[:1] if batched else ()
        return tuple(
            torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
            for g, p in zip(grads, inputs)
        )

    return out, vjp


class MatrixOperator(AbstractLinearOperator):
    """An explicit batch of matrices.

    Args:
        matrix: ``[N, N]`` or ``[B, N, N]``.
        symmetric: declare every matrix symmetric (not checked).
        positive_definite: declare every matrix symmetric positive definite (not checked).
    """

    def __init__(
        self, matrix: Tensor, *, symmetric: bool = False, positive_definite: bool = False
    ) -> None:
        if matrix.ndim == 2:
            matrix = matrix.unsqueeze(0)
        if matrix.ndim != 3 or matrix.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                f"matrix must have shape [N, N] or [B, N, N], got {tuple(matrix.shape)}"
            )
        if not matrix.is_floating_point():
            raise TypeError(f"matrix must be floating point, got dtype {matrix.dtype}")
        self.matrix = matrix
        self.batch_size, self.size = matrix.shape[0], matrix.shape[-1]
        self.dtype, self.device = matrix.dtype, matrix.device
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite

    def mv(self, x: Tensor) -> Tensor:
        """Return ``A x`` for ``x`` [B, N]."""
        return (self.matrix @ x.unsqueeze(-1)).squeeze(-1)

    def transpose(self) -> MatrixOperator:
        """Return the transposed matrices as an operator."""
        if self.symmetric:
            return self
        return MatrixOperator(self.matrix.mT)

    def materialize(self) -> Tensor:
        """Return the matrices ``[B, N, N]``."""
        return self.matrix


class FunctionOperator(AbstractLinearOperator):
    """An operator given by a matrix-vector product closure.

    Args:
        mv: ``x`` [B, N] -> ``A x`` [B, N]; must be linear and act row by row.
        batch_size: B.
        size: N.
        dtype: dtype of the vectors.
        device: device of the vectors.
        rmv: optional ``x -> Aᵀ x``; without it `transpose` raises unless symmetric.
        symmetric: declare A symmetric.
        positive_definite: declare A symmetric positive definite.
    """

    def __init__(
        self,
        mv: Callable[[Tensor], Tensor],
        batch_size: int,
        size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        rmv: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool = False,
        positive_definite: bool = False,
    ) -> None:
        self._mv, self._rmv = mv, rmv
        self.batch_size, self.size = batch_size, size
        self.dtype, self.device = dtype, torch.device(device)
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite

    def mv(self, x: Tensor) -> Tensor:
        """Return ``A x`` for ``x`` [B, N]."""
        return self._mv(x)

    def transpose(self) -> FunctionOperator:
        """Return ``Aᵀ`` (needs ``rmv`` unless the operator is symmetric)."""
        if self.symmetric:
            return self
        if self._rmv is None:
            raise ValueError(
                "FunctionOperator.transpose needs rmv (x -> Aᵀ x); pass rmv=... or "
                "declare symmetric=True"
            )
        return FunctionOperator(
            self._rmv, self.batch_size, self.size, self.dtype, self.device, rmv=self._mv
        )


class JacobianOperator(AbstractLinearOperator):
    """The Jacobian ``∂f/∂x`` of ``f: [B, N] -> [B, N]`` at ``x``, evaluated lazily.

    ``mv`` is a forward-mode product (``torch.func.jvp``); the transposed operator and
    `materialize` use reverse mode (`linearize`, plain ``torch.autograd``), so the
    backward pass of `structift.implicit.custom_root` needs only ordinary autograd
    support from ``f`` (custom ``autograd.Function`` s included).
    ``f`` must act on each batch row independently (its Jacobian is block diagonal).

    Args:
        fn: the function ``[B, N] -> [B, N]``.
        x: the linearization point ``[B, N]``.
        symmetric: declare the Jacobian symmetric.
        positive_definite: declare the Jacobian symmetric positive definite.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        *,
        symmetric: bool = False,
        positive_definite: bool = False,
    ) -> None:
        if x.ndim != 2:
            raise ValueError(f"x must have shape [B, N], got {tuple(x.shape)}")
        self.fn, self.x = fn, x
        self.batch_size, self.size = x.shape
        self.dtype, self.device = x.dtype, x.device
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite
        self._vjp_fn: Callable[[Tensor], tuple[Tensor, ...]] | None = None

    def _vjp_function(self) -> Callable[..., tuple[Tensor, ...]]:
        # Linearize once and reuse the recorded graph for every product.
        if self._vjp_fn is None:
            out, self._vjp_fn = linearize(self.fn, self.x)
            if out.shape != self.x.shape:
                raise ValueError(
                    f"JacobianOperator needs a square map: f(x) has shape {tuple(out.shape)} "
                    f"but x has shape {tuple(self.x.shape)}"
                )
        return self._vjp_fn

    def _vjp(self, u: Tensor) -> Tensor:
        return self._vjp_function()(u)[0]

    def mv(self, x: Tensor) -> Tensor:
        """Return ``J x`` (forward mode)."""
        return torch.func.jvp(self.fn, (self.x,), (x,))[1]

    def transpose(self) -> AbstractLinearOperator:
        """Return ``Jᵀ`` as an operator whose ``mv`` is a vector-Jacobian product."""
        return _TransposedJacobian(self)

    def materialize(self) -> Tensor:
        """Return ``J`` as ``[B, N, N]``, built row by row from vector-Jacobian products."""
        basis = torch.eye(self.size, dtype=self.dtype, device=self.device)
        basis = basis.unsqueeze(1).expand(self.size, self.batch_size, self.size)
        vjp_fn = self._vjp_function()
        try:
            rows = vjp_fn(basis, batched=True)[0]  # shape: (N, B, N), [i, b] = row i of J_b
        except (RuntimeError, NotImplementedError):
            # Operations without a batching rule: one vector-Jacobian product per row.
            rows = torch.stack([vjp_fn(e)[0] for e in basis])
        return rows.permute(1, 0, 2)


class _TransposedJacobian(AbstractLinearOperator):
    """``Jᵀ`` of a `JacobianOperator`; ``mv`` is a vector-Jacobian product."""

    def __init__(self, jac: JacobianOperator) -> None:
        self.jac = jac
        self.batch_size, self.size = jac.batch_size, jac.size
        self.dtype, self.device = jac.dtype, jac.device
        self.symmetric, self.positive_definite = jac.symmetric, jac.positive_definite

    def mv(self, x: Tensor) -> Tensor:
        return self.jac._vjp(x)

    def transpose(self) -> AbstractLinearOperator:
        return self.jac

    def materialize(self) -> Tensor:
        return self.jac.materialize().mT
