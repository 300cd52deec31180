"""Implicit differentiation of root finders and fixed points: ``custom_root``.

If a solver returns z*(θ) with ``F(z*(θ), θ) = 0`` and ∂F/∂z is invertible there, the
implicit function theorem gives ``dz*/dθ = −(∂F/∂z)⁻¹ ∂F/∂θ``. A vector-Jacobian product
therefore needs one transposed linear solve, ``(∂F/∂z)ᵀ u = v``, and one product
``−(∂F/∂θ)ᵀ u`` — never the solver's iterations (Krantz & Parks, *The Implicit Function
Theorem*, 2002; Blondel et al., arXiv:2105.15183).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .krylov import GMRES
from .layout import Layout, flatten_out
from .operators import AbstractLinearOperator, JacobianOperator, linearize
from .registry import LinearSolverName, resolve_linear_solver
from .residual import AbstractResidual, FunctionResidual
from .solvers import AbstractLinearSolver, AbstractTreeSolver, Dense, LinearSolution

__all__ = ["custom_fixed_point", "custom_root"]

_DENSE_MAX_SIZE = 1024

ThetaVJP = Callable[..., Sequence[Any]]
"""``theta_vjp(u, z, *theta) -> one entry per theta argument`` (deprecated, see custom_root)."""


class _Problem:
    """Everything the backward pass needs besides tensors: residual, layouts, solver."""

    def __init__(
        self,
        residual: AbstractResidual,
        z_layout: Layout,
        theta_leaves: list[Any],
        theta_spec: Any,
        diff_index: list[int],
        solver: AbstractLinearSolver,
        symmetric: bool,
        on_solve: Callable[[LinearSolution], None] | None = None,
    ) -> None:
        self.residual, self.z_layout = residual, z_layout
        self.theta_leaves, self.theta_spec, self.diff_index = theta_leaves, theta_spec, diff_index
        self.solver, self.symmetric, self.on_solve = solver, symmetric, on_solve

    def report(self, solution: LinearSolution) -> LinearSolution:
        """Hand a backward solve's result (residual, iterations, status) to ``on_solve``."""
        if self.on_solve is not None:
            self.on_solve(solution)
        return solution

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

    def state(self, op: AbstractLinearOperator) -> Any:
        """The solver's state for ``(∂F/∂z)ᵀ`` given ``op`` = ``∂F/∂z``.

        Symmetric: ``init`` on the reverse-mode form of the same operator (no forward-mode AD
        needed, no transpose). Otherwise ``transpose(init(∂F/∂z))``, so one preparation (a
        factorization) serves the transposed solve.
        """
        if self.symmetric:
            return self.solver.init(op.transpose())
        return self.solver.transpose(self.solver.init(op))

    def theta_cotangents(self, u: Any, z: Any, diff: Sequence[Tensor]) -> list[Any] | None:
        """``−(∂F/∂θ)ᵀ u`` per differentiable θ leaf from the residual's closed form, or None."""
        theta = self.theta(diff)
        out = self.residual.theta_cotangent(u, z, *theta)
        if out is None:
            return None
        if not isinstance(out, tuple | list) or len(out) != len(theta):
            raise ValueError(
                f"theta_cotangent must return a tuple with one entry per theta argument "
                f"({len(theta)}), got {type(out).__name__}"
                + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
            )
        leaves = pytree.tree_flatten(list(out), is_leaf=lambda x: x is None)[0]
        if len(leaves) != len(self.theta_leaves):
            raise ValueError(
                f"theta_cotangent must return one entry (a tensor or None) per theta leaf "
                f"({len(self.theta_leaves)}), got {len(leaves)}"
            )
        grads: list[Any] = []
        for i, t in zip(self.diff_index, diff):
            g = leaves[i]
            if g is not None and (not isinstance(g, Tensor) or g.shape != t.shape):
                got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"theta_cotangent returned {got} for theta leaf {i}; expected a tensor of "
                    f"shape {tuple(t.shape)} (or None for a zero cotangent)"
                )
            grads.append(g)
        return grads


class _LazyJacobian(AbstractLinearOperator):
    """``∂F/∂z`` on ``[B, N]`` vectors, built (z flattened, F linearized) on first use.

    Handed to tree solvers so that one which never applies the operator (a closed-form
    structured solve) costs no flattening of z.
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
            self._op = JacobianOperator(lambda x: p.F(x, *d), zflat, symmetric=p.symmetric)
        return self._op

    def mv(self, x: Tensor) -> Tensor:
        return self._get().mv(x)

    def transpose(self) -> AbstractLinearOperator:
        return _Lazy(lambda: self._get().transpose(), self)

    def materialize(self) -> Tensor:
        return self._get().materialize()


class _Lazy(AbstractLinearOperator):
    """An operator (the transpose of a lazy Jacobian) built on first use."""

    def __init__(self, make: Callable[[], AbstractLinearOperator], like: _LazyJacobian) -> None:
        self._make, self._like = make, like
        self.batch_size, self.size = like.batch_size, like.size
        self.dtype, self.device, self.symmetric = like.dtype, like.device, like.symmetric

    def mv(self, x: Tensor) -> Tensor:
        return self._make().mv(x)

    def transpose(self) -> AbstractLinearOperator:
        return self._like

    def materialize(self) -> Tensor:
        return self._make().materialize()


def _solve_transposed(
    problem: _Problem, zflat: Tensor, diff: Sequence[Tensor], v: Tensor
) -> Tensor:
    """Solve ``(∂F/∂z)ᵀ u = v`` at ``(z, θ)``, differentiably when grad mode is on."""

    def solve(zf: Tensor, d: Sequence[Tensor], rhs: Tensor) -> Tensor:
        op = JacobianOperator(lambda x: problem.F(x, *d), zf, symmetric=problem.symmetric)
        return problem.report(problem.solver.solve(problem.state(op), rhs)).solution

    if not torch.is_grad_enabled():
        return solve(zflat, diff, v)

    # Second order: u(z, θ, v) is itself the root of G(u) = (∂F/∂z)ᵀ u − v, so differentiate
    # it with the same machinery (its Jacobian in u is (∂F/∂z)ᵀ).
    def G(u: Tensor, zf: Tensor, d: tuple[Tensor, ...], rhs: Tensor) -> Tensor:
        vjp_fn = linearize(lambda x: problem.F(x, *d), zf)[1]
        return vjp_fn(u)[0] - rhs

    def forward(zf: Tensor, d: tuple[Tensor, ...], rhs: Tensor) -> Tensor:
        return solve(zf, d, rhs)

    # G's Jacobian in u is (∂F/∂z)ᵀ, so its own IFT solve is with ∂F/∂z (a transpose again).
    # Its unknown u is a flat [B, N] tensor: the solver serves through its flat interface.
    solver = _Flat(problem.solver)
    wrapped = custom_root(G, solver, batch_ndim=1, symmetric=problem.symmetric)(forward)
    return wrapped(zflat, tuple(diff), v)


class _Flat(AbstractLinearSolver):
    """A solver seen through its ``[B, N]`` interface only (a tree solver's ``solve``)."""

    def __init__(self, inner: AbstractLinearSolver) -> None:
        self.inner = inner

    def init(self, operator: AbstractLinearOperator) -> Any:
        return self.inner.init(operator)

    def solve(self, state: Any, rhs: Tensor) -> LinearSolution:
        return self.inner.solve(state, rhs)

    def transpose(self, state: Any) -> Any:
        return self.inner.transpose(state)


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(problem: _Problem, z_leaves: tuple[Tensor, ...], *diff: Tensor) -> Any:
        return tuple(z.clone() for z in z_leaves)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        problem, _, *diff = inputs
        ctx.problem, ctx.n_z = problem, len(output)
        ctx.save_for_backward(*output, *diff)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: _Problem, z_leaves: tuple, *diff: Tensor):
        """vmap of the forward (the solution passes through); the backward does not vmap.

        The backward's linear solvers check convergence with data-dependent control flow,
        which ``vmap`` cannot trace: ``vmap(grad(f))`` over a custom root raises, map with a
        Python loop there (or fold the vmapped dimension into ``batch_ndim``).
        """
        return tuple(z.clone() for z in z_leaves), tuple(in_dims[1])

    @staticmethod
    def backward(ctx: Any, *grad_z: Tensor | None) -> Any:
        problem: _Problem = ctx.problem
        saved = ctx.saved_tensors
        z_leaves, diff = saved[: ctx.n_z], saved[ctx.n_z :]
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grad_z, z_leaves)]
        layout = problem.z_layout
        if layout.B == 0:
            return (None, None, *_empty_batch_cotangents(problem, z_leaves, diff))
        z_tree = pytree.tree_unflatten(list(z_leaves), layout.spec)
        if isinstance(problem.solver, AbstractTreeSolver) and not torch.is_grad_enabled():
            # Tree-shaped first-order solve: no [B, N] copies of z, v or u.
            state = problem.state(_LazyJacobian(problem, z_leaves, diff))
            v_tree = pytree.tree_unflatten(grads, layout.spec)
            u_tree = problem.report(problem.solver.solve_tree(state, v_tree)).solution
            cotangents = problem.theta_cotangents(u_tree, z_tree, diff)
            if cotangents is not None:
                return (None, None, *cotangents)
            u = layout.flatten(pytree.tree_leaves(u_tree))
            zflat = layout.flatten(z_leaves)
        else:
            zflat = layout.flatten(z_leaves)
            u = _solve_transposed(problem, zflat, diff, layout.flatten(grads))
            cotangents = problem.theta_cotangents(layout.unflatten(u), z_tree, diff)
            if cotangents is not None:
                return (None, None, *cotangents)
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
    residual: AbstractResidual,
    z: Any,
    theta: tuple[Any, ...],
    linear_solver: AbstractLinearSolver | None,
    batch_ndim: int,
    symmetric: bool,
    on_solve: Callable[[LinearSolution], None] | None = None,
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
        residual, layout, theta_leaves, theta_spec, diff_index, solver, symmetric, on_solve
    )
    diff = [theta_leaves[i] for i in diff_index]
    out = _ImplicitRoot.apply(problem, tuple(z_leaves), *diff)
    return pytree.tree_unflatten(list(out), z_spec)


def custom_root(
    residual: Callable[..., Any] | AbstractResidual,
    linear_solver: AbstractLinearSolver | LinearSolverName | None = None,
    *,
    batch_ndim: int = 0,
    symmetric: bool = False,
    theta_vjp: ThetaVJP | None = None,
    on_solve: Callable[[LinearSolution], None] | None = None,
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
            `structift.implicit.registry.LINEAR_SOLVERS`); default `Dense`
            when z has at most 1024 entries per batch element, else `GMRES`.
        batch_ndim: number of leading batch dims of z (default 0: one problem). An empty
            batch (a batch dim of size 0) gives empty z and zero θ gradients without a
            linear solve.
        symmetric: declare ∂F/∂z symmetric (required by CG / MINRES).
        on_solve: called with the ``LinearSolution`` of every backward linear solve (its true
            residual norm, iterations and status), e.g. to log them; a failed solve raises
            before this is called.
        theta_vjp: deprecated: give ``residual`` as an
            `structift.implicit.AbstractResidual` with a ``theta_cotangent`` method
            instead (``FunctionResidual(F, theta_vjp)`` wraps the old form).

    Extension points: ``residual`` may be an `structift.implicit.AbstractResidual`
    whose ``theta_cotangent(u, z, *theta)`` returns ``−(∂F/∂θ)ᵀ u`` in closed form (then the
    residual is not evaluated again under autograd), and ``linear_solver`` may be an
    `structift.implicit.AbstractTreeSolver`, which receives the first-order
    right-hand side in z's pytree layout (``solve_tree``) so nothing is flattened to
    ``[B, N]``; under ``create_graph`` it gets ``[B, N]`` vectors (``solve``) as every solver.

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
    if theta_vjp is not None:
        warnings.warn(
            "custom_root(theta_vjp=...) is deprecated: pass the residual as an "
            "AbstractResidual with theta_cotangent (FunctionResidual(residual, theta_vjp) "
            "wraps this form); the argument goes away in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
    if not isinstance(residual, AbstractResidual):
        residual = FunctionResidual(residual, theta_vjp)

    res: AbstractResidual = residual

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(solver)
        def wrapped(*theta: Any) -> Any:
            with torch.no_grad():
                z = solver(*theta)
            return _attach(res, z, theta, solver_object, batch_ndim, symmetric, on_solve)

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

    The same as `custom_root` with the residual ``F(z, θ) = z − T(z, θ)``, so
    ∂F/∂z = I − ∂T/∂z must be invertible (e.g. T a contraction) and ``Identity()`` gives
    Jacobian-free backpropagation (arXiv:2103.12803). ``symmetric`` declares ∂T/∂z
    symmetric. See `custom_root` for the arguments.
    """

    def residual(z: Any, *theta: Any) -> Any:
        return pytree.tree_map(torch.sub, z, T(z, *theta))

    return custom_root(residual, linear_solver, batch_ndim=batch_ndim, symmetric=symmetric)
