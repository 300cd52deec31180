"""custom_root's extension points: a residual with a closed-form θ-cotangent
(``AbstractResidual.theta_cotangent``) and tree-shaped solves (``AbstractTreeSolver``).

With a hook the gradient must equal the gradient without it (float64), on a generic problem
whose z is a named tuple: min_z ½ zᵀQz − θᵀz + γ Σ z log z, z = (a, b) split in two.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.implicit import (
    AbstractResidual,
    AbstractTreeSolver,
    Dense,
    FunctionResidual,
    LinearSolution,
    custom_root,
)
from tests.implicit.test_root import Convex, convex_problems, convex_residual, newton
from tests.seeding import seeded

DT = torch.float64


class Split(NamedTuple):
    a: torch.Tensor  # [B, k]
    b: torch.Tensor  # [B, n - k]


def _join(z: Split) -> torch.Tensor:
    return torch.cat([z.a, z.b], dim=-1)


def _split(x: torch.Tensor, k: int) -> Split:
    return Split(x[..., :k], x[..., k:])


def tree_residual(z: Split, theta: torch.Tensor, Q: torch.Tensor, gamma: torch.Tensor) -> Split:
    return _split(convex_residual(_join(z), theta, Q, gamma), z.a.shape[-1])


def tree_theta_vjp(
    u: Split, z: Split, theta: torch.Tensor, Q: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∂F/∂θ)ᵀu for F = Qz − θ + γ(log z + 1): −u, u zᵀ and Σ u (log z + 1), by hand."""
    uf, zf = _join(u), _join(z)
    return -uf, uf[..., :, None] * zf[..., None, :], (uf * (torch.log(zf) + 1)).sum()


class TreeResidual(AbstractResidual):
    """The split residual with its θ-cotangent in closed form."""

    def __call__(self, z: Split, *theta: torch.Tensor) -> Split:
        return tree_residual(z, *theta)

    def theta_cotangent(self, u: Split, z: Split, *theta: torch.Tensor) -> tuple:
        return tuple(-g for g in tree_theta_vjp(u, z, *theta))


class TreeDense(Dense, AbstractTreeSolver):
    """Dense that accepts the right-hand side in z's layout; records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[type] = []

    def solve(self, state: Any, rhs: torch.Tensor) -> LinearSolution:
        self.seen.append(type(rhs))
        return super().solve(state, rhs)

    def solve_tree(self, state: Any, rhs: Any) -> LinearSolution:
        self.seen.append(type(rhs))
        k = rhs.a.shape[-1]
        sol = super().solve(state, _join(rhs))
        return sol._replace(solution=_split(sol.solution, k))


def _fixed_problem() -> Convex:
    g = seeded(1)
    M = torch.randn(2, 3, 3, dtype=DT, generator=g)
    Q = M @ M.mT / 3 + torch.eye(3, dtype=DT)
    return Convex(torch.randn(2, 3, dtype=DT, generator=g), Q, torch.tensor(0.5, dtype=DT))


def _solver(problem: Convex, k: int):
    def solve(theta: torch.Tensor, Q: torch.Tensor, gamma: torch.Tensor) -> Split:
        return _split(newton(theta, Q, gamma, 80), k)

    return solve


def _grads(problem: Convex, k: int, w: torch.Tensor, linear_solver: Any, residual: Any):
    theta = problem.theta.clone().requires_grad_(True)
    Q = problem.Q.clone().requires_grad_(True)
    gamma = problem.gamma.clone().requires_grad_(True)
    f = custom_root(residual, linear_solver, batch_ndim=1, symmetric=True)(_solver(problem, k))
    z = f(theta, Q, gamma)
    assert isinstance(z, Split)
    return torch.autograd.grad((w * _join(z)).sum(), (theta, Q, gamma))


@given(problem=convex_problems(), data=st.data())
def test_hooks_give_the_gradient_of_the_plain_path(problem: Convex, data: st.DataObject) -> None:
    n = problem.theta.shape[-1]
    k = data.draw(st.integers(0, n))
    w = torch.randn(problem.theta.shape, dtype=DT, generator=seeded(n))
    plain = _grads(problem, k, w, Dense(), tree_residual)
    tree = TreeDense()
    hooked = TreeResidual()
    for solver, res in [(Dense(), hooked), (tree, tree_residual), (tree, hooked)]:
        for g, ref in zip(_grads(problem, k, w, solver, res), plain):
            torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)
    # The tree solver got z's layout (first-order backward), never a flat [B, N] rhs.
    assert tree.seen == [Split, Split]


def test_theta_cotangent_is_used() -> None:
    """A hook that returns zeros gives zero gradients (the residual is not re-differentiated)."""
    problem = _fixed_problem()
    zero = lambda u, z, theta, Q, gamma: (torch.zeros_like(theta), None, None)  # noqa: E731
    theta = problem.theta.clone().requires_grad_(True)
    f = custom_root(FunctionResidual(tree_residual, zero), batch_ndim=1)(_solver(problem, 1))
    (g,) = torch.autograd.grad(_join(f(theta, problem.Q, problem.gamma)).sum(), theta)
    assert g.abs().max() == 0


def test_gradcheck_and_gradgradcheck_with_both_hooks() -> None:
    """Second order: the transposed solve is flat under create_graph, the hook differentiable."""
    g = seeded(0)
    n, B = 3, 2
    M = torch.randn(B, n, n, dtype=DT, generator=g)
    Q = (M @ M.mT / n + torch.eye(n, dtype=DT)).requires_grad_(True)
    theta = torch.randn(B, n, dtype=DT, generator=g).requires_grad_(True)
    gamma = torch.tensor(0.7, dtype=DT, requires_grad=True)
    tree = TreeDense()
    f = custom_root(TreeResidual(), tree, batch_ndim=1)(
        lambda t, q, c: _split(newton(t, q, c, 80), 2)
    )
    assert torch.autograd.gradcheck(lambda *a: tuple(f(*a)), (theta, Q, gamma))
    assert torch.autograd.gradgradcheck(lambda *a: tuple(f(*a)), (theta, Q, gamma))
    assert torch.Tensor in tree.seen and Split in tree.seen


@pytest.mark.parametrize(
    ("hook", "match"),
    [
        (lambda u, z, theta, Q, gamma: (-_join(u),), "one entry per theta argument"),
        (lambda u, z, theta, Q, gamma: (-_join(u)[0], None, None), "expected a tensor of shape"),
        (lambda u, z, theta, Q, gamma: -_join(u), "one entry per theta argument"),
    ],
)
def test_bad_theta_cotangent_raises(hook: Any, match: str) -> None:
    problem = _fixed_problem()
    theta = problem.theta.clone().requires_grad_(True)
    f = custom_root(FunctionResidual(tree_residual, hook), batch_ndim=1)(_solver(problem, 1))
    z = f(theta, problem.Q, problem.gamma)
    with pytest.raises(ValueError, match=match):
        torch.autograd.grad(_join(z).sum(), theta)


def test_a_cotangent_aliasing_the_solution_leaves_it_untouched() -> None:
    """The θ-cotangent is returned as the gradient, never written into: a hook whose result
    aliases the solution z leaves z (the user's output) as it was."""

    def residual(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return z - theta * z.detach()  # ∂F/∂z = I (z held fixed in the second term's detach)

    class Aliasing(AbstractResidual):
        def __call__(self, z: torch.Tensor, *theta: torch.Tensor) -> torch.Tensor:
            return residual(z, *theta)

        def theta_cotangent(self, u, z, *theta):
            return (z,)  # −(∂F/∂θ)ᵀu = z here, returned as the very tensor z

    solver = custom_root(Aliasing(), linear_solver=Dense())(lambda t: t.clone())
    theta = torch.randn(3, dtype=DT, requires_grad=True)
    z = solver(theta)
    z_before = z.detach().clone()
    (grad,) = torch.autograd.grad(z, theta, torch.randn(3, dtype=DT))
    torch.testing.assert_close(z.detach(), z_before, rtol=0, atol=0)
    torch.testing.assert_close(grad, z_before)


def test_the_old_theta_vjp_argument_still_works_with_a_warning() -> None:
    problem = _fixed_problem()
    w = torch.randn(problem.theta.shape, dtype=DT, generator=seeded(2))
    plain = _grads(problem, 1, w, Dense(), tree_residual)
    with pytest.warns(DeprecationWarning, match="theta_vjp=...\\) is deprecated"):
        root = custom_root(tree_residual, batch_ndim=1, symmetric=True, theta_vjp=tree_theta_vjp)
    theta = problem.theta.clone().requires_grad_(True)
    z = root(_solver(problem, 1))(theta, problem.Q, problem.gamma)
    (g,) = torch.autograd.grad((w * _join(z)).sum(), theta)
    torch.testing.assert_close(g, plain[0], rtol=1e-12, atol=1e-12)


def test_on_solve_sees_every_backward_solve() -> None:
    """The backward's LinearSolution (true residual, iterations, status) reaches on_solve."""
    from structift.implicit import MINRES, Status

    problem = _fixed_problem()
    seen: list[LinearSolution] = []
    root = custom_root(
        tree_residual, MINRES(rtol=1e-12), batch_ndim=1, symmetric=True, on_solve=seen.append
    )
    theta = problem.theta.clone().requires_grad_(True)
    z = root(_solver(problem, 1))(theta, problem.Q, problem.gamma)
    torch.autograd.grad(_join(z).sum(), theta)
    assert len(seen) == 1 and seen[0].status == Status.SUCCESS and seen[0].iterations > 0
    assert (seen[0].residual_norm <= 1e-10).all()
