"""custom_root / custom_fixed_point: IFT gradients vs closed forms, unrolled autograd, gradcheck."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.implicit import (
    CG,
    GMRES,
    LINEAR_SOLVERS,
    MINRES,
    AbstractLinearSolver,
    ConvergenceError,
    Dense,
    Identity,
    Neumann,
    SingularSystemError,
    custom_fixed_point,
    custom_root,
    resolve_linear_solver,
)
from tests.seeding import seeded

DT = torch.float64


def circle_residual(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return theta**2 + x**2 - 1


def upper_circle(theta: torch.Tensor) -> torch.Tensor:
    # Bisection on [0, 1]: an iterative solver that knows nothing about the closed form.
    lo, hi = torch.zeros_like(theta), torch.ones_like(theta)
    for _ in range(60):
        mid = (lo + hi) / 2
        inside = circle_residual(mid, theta) < 0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    return (lo + hi) / 2


class TestUnitCircle:
    def test_gradient_is_minus_theta_over_x(self) -> None:
        circle = custom_root(circle_residual, batch_ndim=1)(upper_circle)
        theta = torch.linspace(-0.95, 0.95, 9, dtype=DT, requires_grad=True)
        x = circle(theta)
        torch.testing.assert_close(x, torch.sqrt(1 - theta.detach() ** 2))
        (g,) = torch.autograd.grad(x.sum(), theta)
        torch.testing.assert_close(g, -theta.detach() / x.detach(), rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize(
        "solver", [Dense(), CG(), MINRES(), GMRES()], ids=lambda s: type(s).__name__
    )
    def test_singular_at_x_zero_raises(self, solver: AbstractLinearSolver) -> None:
        circle = custom_root(circle_residual, solver, symmetric=True)(
            lambda t: torch.sqrt(1 - t**2)
        )
        theta = torch.tensor(1.0, dtype=DT, requires_grad=True)
        x = circle(theta)
        assert float(x.detach()) == 0.0
        with pytest.raises(SingularSystemError, match="singular"):
            x.backward()

    def test_gradcheck_and_gradgradcheck(self) -> None:
        circle = custom_root(circle_residual, batch_ndim=1)(upper_circle)
        theta = torch.tensor([-0.4, 0.3, 0.7], dtype=DT, requires_grad=True)
        assert torch.autograd.gradcheck(circle, (theta,))
        assert torch.autograd.gradgradcheck(circle, (theta,))
        # Second derivative closed form: d²x/dθ² = −1/x − θ²/x³.
        x = circle(theta)
        (g,) = torch.autograd.grad(x.sum(), theta, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), theta)
        xd, td = x.detach(), theta.detach()
        torch.testing.assert_close(h, -1 / xd - td**2 / xd**3)


# ----- strongly convex problems: min_z ½ zᵀQz − θᵀz + γ Σ z log z  over z > 0 -----


def convex_residual(
    z: torch.Tensor, theta: torch.Tensor, Q: torch.Tensor, gamma: torch.Tensor
) -> torch.Tensor:
    return torch.einsum("...ij,...j->...i", Q, z) - theta + gamma * (torch.log(z) + 1)


def newton(
    theta: torch.Tensor, Q: torch.Tensor, gamma: torch.Tensor, iters: int = 60
) -> torch.Tensor:
    """Damped Newton with a fraction-to-boundary rule; differentiable when unrolled."""
    z = torch.ones_like(theta)
    for _ in range(iters):
        H = Q + torch.diag_embed(gamma / z)
        step = torch.linalg.solve(H, convex_residual(z, theta, Q, gamma).unsqueeze(-1)).squeeze(-1)
        ratio = torch.where(step > 0, 0.5 * z / step.clamp_min(1e-300), torch.ones_like(z))
        t = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        z = z - t * step
    return z


class Convex(NamedTuple):
    theta: torch.Tensor
    Q: torch.Tensor
    gamma: torch.Tensor


@st.composite
def convex_problems(draw: st.DrawFn) -> Convex:
    n = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = seeded(seed)
    M = torch.randn(B, n, n, generator=g, dtype=DT)
    Q = M @ M.mT / n + draw(st.floats(0.1, 2.0)) * torch.eye(n, dtype=DT)
    theta = 2 * torch.randn(B, n, generator=g, dtype=DT)
    gamma = torch.tensor(draw(st.floats(0.2, 2.0)), dtype=DT)
    return Convex(theta, Q, gamma)


SOLVERS = [Dense(), CG(), MINRES(), GMRES()]


@given(problem=convex_problems(), which=st.sampled_from(range(len(SOLVERS))))
def test_ift_matches_closed_form_and_unrolled_autograd(problem: Convex, which: int) -> None:
    theta = problem.theta.clone().requires_grad_(True)
    Q, gamma = problem.Q, problem.gamma
    solve = custom_root(convex_residual, SOLVERS[which], batch_ndim=1, symmetric=True)(newton)
    z = solve(theta, Q, gamma)
    assert convex_residual(z.detach(), problem.theta, Q, gamma).abs().max() < 1e-10
    w = torch.randn_like(z)
    (g_ift,) = torch.autograd.grad((w * z).sum(), theta)
    # Closed form: dz/dθ = (Q + γ diag(1/z))⁻¹, symmetric.
    H = Q + torch.diag_embed(gamma / z.detach())
    g_closed = torch.linalg.solve(H, w.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(g_ift, g_closed, rtol=1e-7, atol=1e-9)
    theta_u = problem.theta.clone().requires_grad_(True)
    (g_unrolled,) = torch.autograd.grad((w * newton(theta_u, Q, gamma)).sum(), theta_u)
    torch.testing.assert_close(g_ift, g_unrolled, rtol=1e-6, atol=1e-8)


@given(problem=convex_problems())
def test_batched_equals_stacked_singles(problem: Convex) -> None:
    solve = custom_root(convex_residual, batch_ndim=1)(newton)
    theta = problem.theta.clone().requires_grad_(True)
    (g_batch,) = torch.autograd.grad(solve(theta, problem.Q, problem.gamma).sum(), theta)
    singles = []
    for b in range(theta.shape[0]):
        tb = problem.theta[b].clone().requires_grad_(True)
        single = custom_root(convex_residual)(newton)
        singles.append(torch.autograd.grad(single(tb, problem.Q[b], problem.gamma).sum(), tb)[0])
    torch.testing.assert_close(g_batch, torch.stack(singles), rtol=1e-9, atol=1e-11)


def test_gradcheck_all_parameters_and_gradgradcheck() -> None:
    n = 3
    M = torch.randn(2, n, n, dtype=DT)
    Q = (M @ M.mT / n + torch.eye(n, dtype=DT)).requires_grad_(True)
    theta = torch.randn(2, n, dtype=DT, requires_grad=True)
    gamma = torch.tensor(0.7, dtype=DT, requires_grad=True)
    solve = custom_root(convex_residual, batch_ndim=1)(lambda t, q, g: newton(t, q, g, 80))
    assert torch.autograd.gradcheck(solve, (theta, Q, gamma))
    assert torch.autograd.gradgradcheck(solve, (theta, Q, gamma))


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_pytree_z_and_theta() -> None:
    """z and θ as named tuples; a float θ and a non-grad tensor are constants."""

    def residual(z: Pair, params: tuple[torch.Tensor, torch.Tensor], scale: float) -> tuple:
        p, q = params
        return (z.a - scale * p, z.b * z.b.exp() - q)  # z.b = W(q): Lambert W

    def solver(params: tuple[torch.Tensor, torch.Tensor], scale: float) -> Pair:
        p, q = params
        w = torch.zeros_like(q)
        for _ in range(50):  # Newton on w eʷ = q
            w = w - (w * w.exp() - q) / ((w + 1) * w.exp())
        return Pair(scale * p, w)

    p = torch.randn(2, 3, dtype=DT, requires_grad=True)
    q = torch.rand(2, dtype=DT) + 0.5
    q.requires_grad_(True)
    f = custom_root(residual, batch_ndim=0)(solver)
    z = f((p, q), 2.0)
    assert isinstance(z, Pair)
    ga, gq = torch.autograd.grad(z.a.sum() + z.b.sum(), (p, q))
    torch.testing.assert_close(ga, torch.full_like(p, 2.0))
    w = z.b.detach()
    torch.testing.assert_close(gq, w / (q.detach() * (1 + w)))  # W'(q) = W / (q (1 + W))
    assert torch.autograd.gradcheck(lambda p, q: tuple(f((p, q), 2.0)), (p, q))


def test_custom_fixed_point_matches_closed_form() -> None:
    # z = tanh(A z + θ) with ‖A‖₂ = 1/2 is a contraction with factor 1/2 (tanh is
    # 1-Lipschitz): 200 iterations reach the fixed point to 2⁻²⁰⁰, i.e. exactly in float64.
    g = seeded(11)
    M = torch.randn(4, 4, dtype=DT, generator=g)
    A = 0.5 * M / torch.linalg.matrix_norm(M, ord=2)

    def T(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ A.T + theta)

    def iterate(theta: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(theta)
        for _ in range(200):
            z = T(z, theta)
        return z

    theta = torch.randn(3, 4, dtype=DT, generator=g).requires_grad_(True)
    z = custom_fixed_point(T, batch_ndim=1)(iterate)(theta)
    (g_ift,) = torch.autograd.grad(z.sum(), theta)
    s = 1 - z.detach() ** 2  # tanh' at the fixed point, in (0, 1]
    # dz/dθ = (I − S A)⁻¹ S; vᵀ dz/dθ = S (I − Aᵀ S)⁻¹ v with S = diag(s), v = 1. Both sides
    # are direct solves with κ(I − S A) <= (1 + 1/2) / (1 − 1/2) = 3: float64-accurate.
    J = torch.eye(4, dtype=DT) - s.unsqueeze(-1) * A
    u = torch.linalg.solve(J.mT, torch.ones_like(z).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(g_ift, s * u)
    # Jacobian-free backprop (Identity) replaces (I − AᵀS)⁻¹ by I, so its error is
    # S (I − AᵀS)⁻¹ AᵀS 1 = S Σ_{k>=1} (AᵀS)ᵏ 1, with 2-norm at most
    # max(s) · q/(1 − q) · ‖1‖₂, q = ‖AᵀS‖₂ <= 1/2 per row: close, but not exact.
    z_jfb = custom_fixed_point(T, Identity(), batch_ndim=1)(iterate)(theta)
    (g_jfb,) = torch.autograd.grad(z_jfb.sum(), theta)
    q = torch.linalg.matrix_norm(A.T * s.unsqueeze(-2), ord=2)  # ‖Aᵀ diag(s_b)‖₂ per row
    bound = s.amax(-1) * q / (1 - q) * 2.0  # ‖1‖₂ = √4
    err = (g_jfb - g_ift).norm(dim=-1)
    assert (err > 0).all() and (err <= bound * (1 + 1e-12)).all()


def test_solver_runs_without_graph_and_nonconvergence_raises() -> None:
    seen = []

    def solver(theta: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return upper_circle(theta)

    theta = torch.tensor([0.2, 0.5], dtype=DT, requires_grad=True)
    x = custom_root(circle_residual, CG(max_iter=1), batch_ndim=1, symmetric=True)(solver)(theta)
    assert seen == [False]
    assert x.requires_grad
    # 2 systems of size 1 converge in 1 CG step, so force failure with a tiny budget elsewhere:
    n = 20
    Qm = torch.randn(n, n, dtype=DT)
    Q = Qm @ Qm.T + 1e-3 * torch.eye(n, dtype=DT)
    gamma = torch.tensor(1e-3, dtype=DT)
    th = torch.randn(n, dtype=DT, requires_grad=True)
    f = custom_root(convex_residual, CG(max_iter=2), symmetric=True)(newton)
    with pytest.raises(ConvergenceError, match="max_iter"):
        f(th, Q, gamma).sum().backward()
    with pytest.raises(ConvergenceError, match="spectral radius"):
        custom_root(convex_residual, Neumann(alpha=10.0), symmetric=True)(newton)(
            th, Q, gamma
        ).sum().backward()


def test_bad_inputs() -> None:
    theta = torch.tensor([0.2], dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="non-finite"):
        custom_root(circle_residual)(lambda t: torch.full_like(t, float("nan")))(theta)
    with pytest.raises(TypeError, match="tensor"):
        custom_root(circle_residual)(lambda t: [1.0])(theta)
    with pytest.raises(ValueError, match="batch_ndim"):
        custom_root(circle_residual, batch_ndim=-1)
    wrong = custom_root(lambda x, t: torch.cat([x, x]))(upper_circle)
    with pytest.raises(ValueError, match="entries"):
        wrong(theta).sum().backward()


def test_no_grad_needed_returns_plain_tensor() -> None:
    theta = torch.tensor([0.2, 0.4], dtype=DT)
    x = custom_root(circle_residual, batch_ndim=1)(upper_circle)(theta)
    assert not x.requires_grad and x.grad_fn is None


def test_custom_root_on_device(device: torch.device) -> None:
    theta = torch.tensor([0.3, -0.6], dtype=DT, device=device, requires_grad=True)
    for solver in (Dense(), CG(), MINRES(), GMRES()):
        f = custom_root(circle_residual, solver, batch_ndim=1, symmetric=True)(upper_circle)
        x = f(theta)
        (g,) = torch.autograd.grad(x.sum(), theta)
        assert g.device == theta.device
        torch.testing.assert_close(g, -theta.detach() / x.detach())


class _Square(torch.autograd.Function):
    """A custom Function with the old-style forward(ctx, ...) and no functorch support."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_residual_with_custom_autograd_function() -> None:
    def residual(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return _Square.apply(theta) + _Square.apply(x) - 1

    theta = torch.tensor([0.2, -0.7], dtype=DT, requires_grad=True)
    for solver in (Dense(), GMRES()):
        x = custom_root(residual, solver, batch_ndim=1)(upper_circle)(theta)
        (g,) = torch.autograd.grad(x.sum(), theta)
        torch.testing.assert_close(g, -theta.detach() / x.detach())


def linear_residual(z: torch.Tensor, theta: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...j->...i", Q, z) - theta


def linear_solve(theta: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(Q, theta.T).T


class _NeverSolves(AbstractLinearSolver):
    """A linear solver that must not be called."""

    def init(self, operator):  # type: ignore[no-untyped-def]
        raise AssertionError("the linear solver was called for an empty batch")

    def solve(self, state, rhs):  # type: ignore[no-untyped-def]
        raise AssertionError("the linear solver was called for an empty batch")

    def transpose(self, state):  # type: ignore[no-untyped-def]
        raise AssertionError("the linear solver was called for an empty batch")


class TestEmptyBatch:
    @pytest.mark.parametrize(
        "linear_solver", [None, "dense", "cg", "minres", "gmres", "neumann", _NeverSolves()]
    )
    def test_empty_outputs_and_zero_gradients_first_and_second_order(
        self, linear_solver: object
    ) -> None:
        theta = torch.zeros(0, 3, dtype=DT, requires_grad=True)
        Q = (2 * torch.eye(3, dtype=DT)).requires_grad_(True)
        f = custom_root(linear_residual, linear_solver, batch_ndim=1, symmetric=True)  # type: ignore[arg-type]
        z = f(linear_solve)(theta, Q)
        assert z.shape == (0, 3)
        g_theta, g_Q = torch.autograd.grad(z.sum(), (theta, Q), create_graph=True)
        assert g_theta.shape == (0, 3)
        torch.testing.assert_close(g_Q, torch.zeros_like(Q))  # a sum over no problems
        assert g_Q.requires_grad  # connected to Q, so it differentiates again
        (gg,) = torch.autograd.grad(g_Q.sum(), Q)
        torch.testing.assert_close(gg, torch.zeros_like(Q))

    def test_pytree_z_with_two_batch_dims(self) -> None:
        theta = torch.zeros(2, 0, 3, dtype=DT, requires_grad=True)

        def residual(z: tuple[torch.Tensor, torch.Tensor], t: torch.Tensor) -> tuple:
            return (z[0] - t, z[1] - t.sum(-1))

        f = custom_root(residual, batch_ndim=2)(lambda t: (t.clone(), t.sum(-1)))
        a, b = f(theta)
        assert a.shape == (2, 0, 3) and b.shape == (2, 0)
        (g,) = torch.autograd.grad(a.sum() + b.sum(), theta)
        assert g.shape == (2, 0, 3)


class TestLinearSolverNames:
    @pytest.mark.parametrize("name", sorted(LINEAR_SOLVERS))
    def test_every_name_gives_its_solver_and_the_gradient(self, name: str) -> None:
        solver = resolve_linear_solver(name)
        assert isinstance(solver, AbstractLinearSolver)
        assert type(solver) is type(LINEAR_SOLVERS[name]())
        # The unit circle at θ = 0.6, x = 0.8: ∂F/∂x = 2x = 1.6 is SPD, dx/dθ = −θ/x.
        theta = torch.tensor([0.6], dtype=DT, requires_grad=True)
        x = custom_root(circle_residual, name, batch_ndim=1, symmetric=True)(upper_circle)(theta)  # type: ignore[arg-type]
        (g,) = torch.autograd.grad(x.sum(), theta)
        if name == "identity":  # ∂F/∂x replaced by 1: dx/dθ ≈ −∂F/∂θ = −2θ
            torch.testing.assert_close(g, -2 * theta.detach())
        elif name == "neumann":  # Σ_{j<50} (1 − 1.6)ʲ: relative truncation error 0.6⁵⁰ < 1e-11
            torch.testing.assert_close(g, -theta.detach() / x.detach(), rtol=1e-10, atol=0.0)
        else:
            torch.testing.assert_close(g, -theta.detach() / x.detach())

    def test_solver_objects_and_none_pass_through(self) -> None:
        solver = CG()
        assert resolve_linear_solver(solver) is solver
        assert resolve_linear_solver(None) is None

    def test_unknown_name_raises_value_error_naming_the_argument(self) -> None:
        with pytest.raises(ValueError, match=r"linear_solver must be one of .*'dense'.*'lu'"):
            custom_root(circle_residual, "lu")  # type: ignore[arg-type]

    @pytest.mark.parametrize("bad", [Dense, 3, ["dense"]], ids=["class", "int", "list"])
    def test_other_types_raise_type_error_naming_the_argument(self, bad: object) -> None:
        with pytest.raises(TypeError, match="linear_solver must be a linear solver object"):
            custom_root(circle_residual, bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="linear_solver"):
            custom_fixed_point(lambda z, t: z, bad)  # type: ignore[arg-type]
