"""Implicit differentiation of root finders and fixed points: ``custom_root``.

If a solver returns z*(θ) with ``F(z*(θ), θ) = 0`` and ∂F/∂z is invertible there, the
implicit function theorem gives ``dz*/dθ = −(∂F/∂z)⁻¹ ∂F/∂θ``. A vector-Jacobian product
therefore needs one transposed linear solve, ``(∂F/∂z)ᵀ u = v``, and one product
``−(∂F/∂θ)ᵀ u`` — never the solver's iterations (Krantz & Parks, *The Implicit Function
Theorem*, 2002; Blondel et al., arXiv:2105.15183).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .krylov import GMRES
from .layout import Layout, flatten_out
from .operators import AbstractLinearOperator, JacobianOperator, linearize
from .registry import LinearSolverName, resolve_linear_solver
from .solvers import AbstractLinearSolver, Dense

__all__ = ["custom_fixed_point", "custom_root"]

_DENSE_MAX_SIZE = 1024

ThetaVJP = Callable[..., Sequence[Any]]
"""``theta_vjp(u, z, *theta) -> one entry per theta argument``: see :func:`custom_root`."""


class _Problem:
    """Everything the backward pass needs besides tensors: residual, layouts, solver."""

    def __init__(
        self,
        residual: Callable[..., Any],
        z_layout: Layout,
        theta_leaves: list[Any],
        theta_spec: Any,
        diff_index: list[int],
        solver: AbstractLinearSolver,
        symmetric: bool,
        theta_vjp: ThetaVJP | None = None,
    ) -> None:
        self.residual, self.z_layout = residual, z_layout
        self.theta_leaves, self.theta_spec, self.diff_index = theta_leaves, theta_spec, diff_index
        self.solver, self.symmetric, self.theta_vjp = solver, symmetric, theta_vjp

    def theta(self, diff: Sequence[Tensor]) -> tuple[Any, ...]:
        leaves = list(self.theta_leaves)
        for i, t in zip(self.diff_index, diff):
            leaves[i] = t
        return tuple(pytree.tree_unflatten(leaves, self.theta_spec))

    def F(self, zflat: Tensor, *diff: Tensor) -> Tensor:
        """The residual as a map ``[B, N] -> [B, N]``."""
        out = flatten_out(
            self.residual(self.z_layout.unflatten(zflat), *self.theta(diff)), zflat.shape[0]
        )
        if out.shape != zflat.shape:
            raise ValueError(
                f"residual(z, *theta) must have as many entries as z per batch element: got "
                f"{out.shape[-1]} entries for z with {zflat.shape[-1]}"
            )
        return out

    def theta_cotangents(
        self, u: Any, z: Any, diff: Sequence[Tensor], keep: Sequence[Tensor] = ()
    ) -> list[Tensor | None]:
        """Return ``−(∂F/∂θ)ᵀ u`` for each differentiable θ leaf from the user's ``theta_vjp``.

        Without grad mode a returned tensor is negated in place (no new [B, N]-sized buffer)
        unless it shares storage with z, θ or a tensor in ``keep`` (the incoming cotangents).
        """
        assert self.theta_vjp is not None
        out = self.theta_vjp(u, z, *self.theta(diff))
        if not isinstance(out, tuple | list) or len(out) != len(self.theta(diff)):
            raise ValueError(
                f"theta_vjp must return a tuple with one entry per theta argument "
                f"({len(self.theta(diff))}), got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
            )
        leaves = pytree.tree_flatten(list(out), is_leaf=lambda x: x is None)[0]
        if len(leaves) != len(self.theta_leaves):
            raise ValueError(
                f"theta_vjp must return one entry (a tensor or None) per theta leaf "
                f"({len(self.theta_leaves)}), got {len(leaves)}"
            )
        grads: list[Tensor | None] = []
        in_place = not torch.is_grad_enabled()
        if in_place:
            z_leaves = pytree.tree_leaves(z)
            others = [*z_leaves, *self.theta_leaves, *diff, *keep]
            taken = {x.untyped_storage().data_ptr() for x in others if isinstance(x, Tensor)}
        for i, t in zip(self.diff_index, diff):
            g = leaves[i]
            if g is None:
                grads.append(None)
                continue
            if not isinstance(g, Tensor) or g.shape != t.shape:
                got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"theta_vjp returned {got} for theta leaf {i}; expected a tensor of "
                    f"shape {tuple(t.shape)} (or None for a zero cotangent)"
                )
            if in_place and not g.requires_grad and g.untyped_storage().data_ptr() not in taken:
                grads.append(g.neg_())
            else:
                grads.append(torch.neg(g))
        return grads


class _LazyTransposedJacobian(AbstractLinearOperator):
    """``(∂F/∂z)ᵀ`` on ``[B, N]`` vectors, built (z flattened, F linearized) on first use.

    Handed to solvers with ``accepts_tree`` so that a solver which never applies the
    operator (a closed-form structured solve) costs no flattening of z.
    """

    def __init__(
        self, problem: _Problem, z_leaves: Sequence[Tensor], diff: Sequence[Tensor]
    ) -> None:
        layout = problem.z_layout
        self.problem, self.z_leaves, self.diff = problem, z_leaves, diff
        self.batch_size, self.size = layout.B, layout.N
        self.dtype, self.device = z_leaves[0].dtype, z_leaves[0].device
        self.symmetric = problem.symmetric
        self._op: AbstractLinearOperator | None = None

    def _get(self) -> AbstractLinearOperator:
        if self._op is None:
            p, d = self.problem, self.diff
            zflat = p.z_layout.flatten(self.z_leaves)
            self._op = JacobianOperator(lambda x: p.F(x, *d), zflat, symmetric=p.symmetric).T
        return self._op

    def mv(self, x: Tensor) -> Tensor:
        return self._get().mv(x)

    def transpose(self) -> AbstractLinearOperator:
        return self._get().transpose()

    def materialize(self) -> Tensor:
        return self._get().materialize()


def _solve_transposed(
    problem: _Problem, zflat: Tensor, diff: Sequence[Tensor], v: Tensor
) -> Tensor:
    """Solve ``(∂F/∂z)ᵀ u = v`` at ``(z, θ)``, differentiably when grad mode is on."""

    def solve(zf: Tensor, d: Sequence[Tensor], rhs: Tensor) -> Tensor:
        op = JacobianOperator(lambda x: problem.F(x, *d), zf, symmetric=problem.symmetric).T
        return problem.solver.solve(problem.solver.init(op), rhs).solution

    if not torch.is_grad_enabled():
        return solve(zflat, diff, v)

    # Second order: u(z, θ, v) is itself the root of G(u) = (∂F/∂z)ᵀ u − v, so differentiate
    # it with the same machinery (its Jacobian in u is (∂F/∂z)ᵀ).
    def G(u: Tensor, zf: Tensor, d: tuple[Tensor, ...], rhs: Tensor) -> Tensor:
        vjp_fn = linearize(lambda x: problem.F(x, *d), zf)[1]
        return vjp_fn(u)[0] - rhs

    def forward(zf: Tensor, d: tuple[Tensor, ...], rhs: Tensor) -> Tensor:
        return solve(zf, d, rhs)

    wrapped = custom_root(G, problem.solver, batch_ndim=1)(forward)
    return wrapped(zflat, tuple(diff), v)


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, problem: _Problem, z_leaves: tuple[Tensor, ...], *diff: Tensor) -> Any:
        out = tuple(z.clone() for z in z_leaves)
        ctx.problem, ctx.n_z = problem, len(out)
        ctx.save_for_backward(*out, *diff)
        return out

    @staticmethod
    def backward(ctx: Any, *grad_z: Tensor | None) -> Any:
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        z_leaves, diff = saved[: ctx.n_z], saved[ctx.n_z :]
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grad_z, z_leaves)]
        layout = problem.z_layout
        if layout.B == 0:
            return (None, None, *_empty_batch_cotangents(problem, z_leaves, diff))
        if problem.solver.accepts_tree and not torch.is_grad_enabled():
            # Tree-shaped first-order solve: no [B, N] copies of z, v or u.
            op = _LazyTransposedJacobian(problem, z_leaves, diff)
            v_tree = pytree.tree_unflatten(grads, layout.spec)
            u_tree = problem.solver.solve(problem.solver.init(op), v_tree).solution
            if problem.theta_vjp is not None:
                z_tree = pytree.tree_unflatten(list(z_leaves), layout.spec)
                return (None, None, *problem.theta_cotangents(u_tree, z_tree, diff, grads))
            u = layout.flatten(pytree.tree_leaves(u_tree))
            zflat = layout.flatten(z_leaves)
        else:
            zflat = layout.flatten(z_leaves)
            u = _solve_transposed(problem, zflat, diff, layout.flatten(grads))
            if problem.theta_vjp is not None:
                z_tree = pytree.tree_unflatten(list(z_leaves), layout.spec)
                u_tree = layout.unflatten(u)
                return (None, None, *problem.theta_cotangents(u_tree, z_tree, diff, grads))
        vjp_theta = linearize(lambda *d: problem.F(zflat, *d), *diff)[1]
        return (None, None, *vjp_theta(-u))


def _empty_batch_cotangents(
    problem: _Problem, z_leaves: Sequence[Tensor], diff: Sequence[Tensor]
) -> list[Tensor]:
    """θ cotangents for an empty batch (B = 0): sums over no problems, so zero.

    No linear solve runs (a solver need not accept an empty system). The zeros are the
    residual's vector-Jacobian product with an empty cotangent, so under ``create_graph``
    they stay connected to θ and differentiate again (to zero).
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        d = [t.view_as(t) if create_graph else t.detach().requires_grad_(True) for t in diff]
        z_tree = pytree.tree_unflatten(list(z_leaves), problem.z_layout.spec)
        out = [
            x
            for x in pytree.tree_leaves(problem.residual(z_tree, *problem.theta(d)))
            if isinstance(x, Tensor) and x.requires_grad
        ]
        grads: Sequence[Tensor | None] = [None] * len(d)
        if out:
            cotangents = [torch.zeros_like(x) for x in out]
            grads = torch.autograd.grad(
                out, d, cotangents, allow_unused=True, create_graph=create_graph
            )
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, diff)]


def _attach(
    residual: Callable[..., Any],
    z: Any,
    theta: tuple[Any, ...],
    linear_solver: AbstractLinearSolver | None,
    batch_ndim: int,
    symmetric: bool,
    theta_vjp: ThetaVJP | None = None,
) -> Any:
    z_leaves, z_spec = pytree.tree_flatten(z)
    layout = Layout(z, batch_ndim, "the solver's output z")
    z_leaves = [x.detach() for x in z_leaves]
    for x in z_leaves:
        if not torch.isfinite(x).all():
            raise ValueError(
                "the solver returned a non-finite z (NaN or inf); cannot differentiate"
            )
    theta_leaves, theta_spec = pytree.tree_flatten(theta)
    diff_index = [
        i
        for i, t in enumerate(theta_leaves)
        if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not diff_index or not torch.is_grad_enabled():
        return pytree.tree_unflatten(z_leaves, z_spec)
    solver = linear_solver
    if solver is None:
        solver = Dense() if layout.N <= _DENSE_MAX_SIZE else GMRES()
    problem = _Problem(
        residual, layout, theta_leaves, theta_spec, diff_index, solver, symmetric, theta_vjp
    )
    diff = [theta_leaves[i] for i in diff_index]
    out = _ImplicitRoot.apply(problem, tuple(z_leaves), *diff)
    return pytree.tree_unflatten(list(out), z_spec)


def custom_root(
    residual: Callable[..., Any],
    linear_solver: AbstractLinearSolver | LinearSolverName | None = None,
    *,
    batch_ndim: int = 0,
    symmetric: bool = False,
    theta_vjp: ThetaVJP | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver(*theta) -> z`` differentiable by the implicit function theorem.

    Invariant: the decorated solver returns z with ``residual(z, *theta) == 0`` (to the
    accuracy you want in the gradient), and ``∂residual/∂z`` is invertible there. Then

        dz/dθ = −(∂F/∂z)⁻¹ ∂F/∂θ,   F = residual,

    and the backward pass computes ``vᵀ dz/dθ`` by solving ``(∂F/∂z)ᵀ u = v`` with
    ``linear_solver`` (matrix-free: vector-Jacobian products of ``residual`` recorded once
    with ``torch.autograd``) and returning ``−(∂F/∂θ)ᵀ u``. The solver itself runs under
    ``torch.no_grad()``: no graph is built through its iterations, so memory is independent
    of how many it takes.

    ``z`` and each ``theta`` may be a tensor or a (named) tuple / list / dict of tensors;
    ``residual(z, *theta)`` returns the same number of entries as z (any pytree layout).
    Non-tensor theta (floats, flags) and tensors that do not require grad are constants.

    Batching: with ``batch_ndim = k`` the leading k dims of every leaf of z form a batch of
    independent problems (the residual of batch element b depends only on z[b], so ∂F/∂z is
    block diagonal); the linear solves then run per element, batched. θ need not carry the
    batch dims (a shared parameter gets the sum over the batch).

    Higher order: the backward is itself differentiable (its linear solve is again an
    implicit root), so ``torch.autograd.grad(..., create_graph=True)`` and gradgradcheck work.

    Args:
        residual: ``F(z, *theta)``; must be differentiable by ``torch.autograd``.
        linear_solver: a solver object, or the name of one with its default settings:
            ``"dense"``, ``"cholesky"`` (``Dense(assume="spd")``), ``"cg"``, ``"minres"``,
            ``"gmres"``, ``"neumann"``, ``"identity"`` (the table
            :data:`~structift.implicit.registry.LINEAR_SOLVERS`); default :class:`Dense`
            when z has at most 1024 entries per batch element, else :class:`GMRES`.
        batch_ndim: number of leading batch dims of z (default 0: one problem). An empty
            batch (a batch dim of size 0) gives empty z and zero θ gradients without a
            linear solve.
        symmetric: declare ∂F/∂z symmetric (required by CG / MINRES).
        theta_vjp: optional ``theta_vjp(u, z, *theta)`` returning ``(∂F/∂θ)ᵀ u``, the
            vector-Jacobian product of the residual with respect to θ, to use instead of
            evaluating the residual once more under autograd (worth it when F is linear in θ
            or the product has a closed form). Contract: ``u`` is the solution of
            ``(∂F/∂z)ᵀ u = v`` with z's pytree layout (the residual's flattened entries
            reshaped like z; exactly the residual's output when F returns z's layout), ``z``
            is the solution and ``theta`` the solver's arguments. Return a tuple with one
            entry per theta argument, laid out like that argument: a tensor of the leaf's
            shape, or None for a zero product and for non-tensor leaves. custom_root negates
            it; in a first-order backward it does so in place when the tensor shares no
            memory with ``z``, ``theta`` or the incoming cotangent (a product computed from
            ``u``, or ``u``'s own entries, are such tensors), so do not return a tensor you
            keep elsewhere. For second derivatives the product must be differentiable by
            ``torch.autograd`` in ``u``, ``z`` and ``theta``. Default: autograd on ``residual``.

    Linear solvers whose class sets ``accepts_tree = True`` (see
    :class:`~structift.implicit.solvers.AbstractLinearSolver`) receive, in the first-order
    backward, the right-hand side v with z's pytree layout and return u in it; z and v are
    then never copied to ``[B, N]`` unless the solver applies the operator. Under
    ``create_graph`` they get ``[B, N]`` vectors as every other solver.

    Returns:
        A decorator: ``custom_root(F)(solver)`` has the solver's signature.

    Raises:
        TypeError: if ``linear_solver`` is neither a solver, a name nor None (ValueError for
            an unknown name).
        SingularSystemError: (in the backward) when ∂F/∂z is singular at z.
        ConvergenceError: (in the backward) when an iterative linear solve does not converge.

    Example:
        >>> import torch
        >>> from structift.implicit import custom_root
        >>> F = lambda x, theta: theta**2 + x**2 - 1  # the unit circle
        >>> circle = custom_root(F)(lambda theta: torch.sqrt(1 - theta**2))
        >>> theta = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        >>> torch.autograd.grad(circle(theta), theta)[0]  # −θ/x = −0.6/0.8
        tensor(-0.7500, dtype=torch.float64)
    """
    if not isinstance(batch_ndim, int) or batch_ndim < 0:
        raise ValueError(f"batch_ndim must be a non-negative int, got {batch_ndim!r}")
    solver_object = resolve_linear_solver(linear_solver)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def wrapped(*theta: Any) -> Any:
            with torch.no_grad():
                z = solver(*theta)
            return _attach(residual, z, theta, solver_object, batch_ndim, symmetric, theta_vjp)

        return wrapped

    return decorator


def custom_fixed_point(
    T: Callable[..., Any],
    linear_solver: AbstractLinearSolver | LinearSolverName | None = None,
    *,
    batch_ndim: int = 0,
    symmetric: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make ``solver(*theta) -> z`` with ``z = T(z, *theta)`` differentiable.

    The same as :func:`custom_root` with the residual ``F(z, θ) = z − T(z, θ)``, so
    ∂F/∂z = I − ∂T/∂z must be invertible (e.g. T a contraction) and ``Identity()`` gives
    Jacobian-free backpropagation (arXiv:2103.12803). ``symmetric`` declares ∂T/∂z
    symmetric. See :func:`custom_root` for the arguments.
    """

    def residual(z: Any, *theta: Any) -> Any:
        return pytree.tree_map(torch.sub, z, T(z, *theta))

    return custom_root(residual, linear_solver, batch_ndim=batch_ndim, symmetric=symmetric)
