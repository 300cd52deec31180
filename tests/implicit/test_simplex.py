"""Softmax as entropy-regularized argmax: KKT residual, IFT Jacobians, Schur complement, −inf."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.implicit import GMRES, MINRES, ConvergenceError, Dense, JacobianOperator
from structift.variational.simplex import (
    SimplexKKT,
    dense_kkt_jacobian,
    dual_newton,
    entropic_argmax,
    kkt_matrix,
    kkt_residual,
    mirror_descent,
    schur_jacobian,
    softmax_jacobian,
    solve_kkt,
)

DT = torch.float64


@st.composite
def logits(draw: st.DrawFn) -> torch.Tensor:
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    vals = draw(st.lists(st.floats(-4, 4), min_size=B * n, max_size=B * n))
    theta = torch.tensor(vals, dtype=DT).reshape(B, n)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * n, max_size=B * n)))
    mask = mask.reshape(B, n)
    mask[:, -1] = False
    return theta.masked_fill(mask, float("-inf"))


temperatures = st.sampled_from([0.3, 1.0, 2.5])


@given(theta=logits(), tau=temperatures)
def test_solution_is_softmax_and_residual_is_zero(theta: torch.Tensor, tau: float) -> None:
    point = solve_kkt(theta, tau)
    torch.testing.assert_close(point.z, torch.softmax(theta / tau, -1), rtol=1e-12, atol=1e-14)
    lse = tau * torch.logsumexp(theta / tau, -1, keepdim=True)
    torch.testing.assert_close(point.nu, lse, rtol=1e-12, atol=1e-12)
    for scaled in (False, True):
        F = kkt_residual(point, theta, tau, scaled=scaled)
        assert F.z.abs().max() < 1e-12 and F.nu.abs().max() < 1e-12


@given(theta=logits(), tau=temperatures)
def test_jacobians_agree(theta: torch.Tensor, tau: float) -> None:
    """IFT (custom_root), dense KKT solve, Schur complement, closed form, autograd softmax."""
    z = torch.softmax(theta / tau, -1)
    closed = softmax_jacobian(z, tau)
    torch.testing.assert_close(schur_jacobian(z, tau), closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense_kkt_jacobian(z, tau), closed, rtol=1e-10, atol=1e-12)
    finite = torch.isfinite(theta)
    for b in range(theta.shape[0]):
        ift = torch.autograd.functional.jacobian(
            lambda t: entropic_argmax(t, temperature=tau), theta[b].clone()
        )
        torch.testing.assert_close(ift, closed[b], rtol=1e-9, atol=1e-12)
        # Restricted to the support, it is the autograd Jacobian of torch.softmax.
        S = finite[b].nonzero().squeeze(-1)
        auto = torch.autograd.functional.jacobian(
            lambda t: torch.softmax(t / tau, -1), theta[b, S].clone()
        )
        torch.testing.assert_close(ift[S][:, S], auto, rtol=1e-9, atol=1e-12)
        assert (ift[~finite[b]] == 0).all() and (ift[:, ~finite[b]] == 0).all()


@pytest.mark.parametrize(
    ("scaled", "solver"),
    [(True, Dense()), (True, GMRES()), (False, Dense()), (False, MINRES()), (False, GMRES())],
    ids=["scaled-dense", "scaled-gmres", "sym-dense", "sym-minres", "sym-gmres"],
)
def test_every_linear_solver_gives_the_softmax_gradient(scaled: bool, solver) -> None:
    theta = torch.randn(4, 9, dtype=DT) * 2
    theta[0, :3] = float("-inf")
    w = torch.randn(4, 9, dtype=DT)
    t1 = theta.clone().requires_grad_(True)
    t2 = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(
        (w * entropic_argmax(t1, scaled=scaled, linear_solver=solver)).sum(), t1
    )
    (ref,) = torch.autograd.grad((w * torch.softmax(t2, -1)).sum(), t2)
    torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10)
    # the linear system the backward solved has residual ~0
    point = solve_kkt(theta, scaled=scaled)
    zf = torch.cat([point.z, point.nu], -1)

    def F(x: torch.Tensor) -> torch.Tensor:
        r = kkt_residual(SimplexKKT(x[:, :9], x[:, 9:]), theta, 1.0, scaled=scaled)
        return torch.cat(r, -1)

    op = JacobianOperator(F, zf).T
    rhs = torch.cat([w, torch.zeros(4, 1, dtype=DT)], -1)
    sol = solver.solve(solver.init(op), rhs)
    assert (sol.residual_norm <= 1e-9 * rhs.norm(dim=-1)).all()


def test_kkt_matrix_is_the_residual_jacobian_and_symmetric() -> None:
    theta = torch.randn(2, 5, dtype=DT)
    theta[1, 1] = float("-inf")
    point = solve_kkt(theta, 0.5)
    K = kkt_matrix(point.z, 0.5)
    torch.testing.assert_close(K, K.mT)
    zf = torch.cat([point.z, point.nu], -1)

    def F(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(kkt_residual(SimplexKKT(x[:, :5], x[:, 5:]), theta, 0.5), -1)

    torch.testing.assert_close(JacobianOperator(F, zf).materialize(), K)
    eig = torch.linalg.eigvalsh(K)
    assert ((eig < 0).sum(-1) == 1).all()  # a saddle point: exactly one negative eigenvalue


def test_gradcheck_gradgradcheck_temperature_and_log_partition() -> None:
    theta = torch.randn(2, 4, dtype=DT)
    theta[0, 2] = float("-inf")
    theta.requires_grad_(True)
    tau = torch.tensor(0.8, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: tuple(solve_kkt(t, s)), (theta, tau))
    assert torch.autograd.gradgradcheck(lambda t: entropic_argmax(t), (theta,))
    point = solve_kkt(theta, tau)
    (g,) = torch.autograd.grad(point.nu.sum(), theta)
    torch.testing.assert_close(g, point.z.detach())  # dν/dθ = z: ν is the log-partition


def test_unrolled_mirror_descent_converges_to_the_ift_gradient() -> None:
    theta = torch.randn(3, 6, dtype=DT)
    w = torch.randn(3, 6, dtype=DT)
    t1 = theta.clone().requires_grad_(True)
    (g_unrolled,) = torch.autograd.grad((w * mirror_descent(t1, max_iter=80)).sum(), t1)
    t2 = theta.clone().requires_grad_(True)
    (g_ift,) = torch.autograd.grad(
        (w * entropic_argmax(t2, method="mirror_descent", max_iter=80)).sum(), t2
    )
    torch.testing.assert_close(g_unrolled, g_ift, rtol=1e-9, atol=1e-12)
    t3 = theta.clone().requires_grad_(True)
    (g_short,) = torch.autograd.grad((w * mirror_descent(t3, max_iter=3)).sum(), t3)
    assert (g_short - g_ift).abs().max() > 1e-3  # unconverged unrolling is visibly wrong


def test_batched_equals_stacked_singles_and_dim() -> None:
    theta = torch.randn(2, 3, 5, dtype=DT, requires_grad=True)
    w = torch.randn(2, 3, 5, dtype=DT)
    (g,) = torch.autograd.grad((w * entropic_argmax(theta, dim=1)).sum(), theta)
    for b in range(2):
        for j in range(5):
            t = theta[b, :, j].detach().clone().requires_grad_(True)
            (gj,) = torch.autograd.grad((w[b, :, j] * entropic_argmax(t)).sum(), t)
            torch.testing.assert_close(g[b, :, j], gj)


def test_float32_large_n_default_gmres() -> None:
    theta = torch.randn(2, 3000) * 3
    t1 = theta.clone().requires_grad_(True)
    t2 = theta.clone().requires_grad_(True)
    w = torch.randn(2, 3000)
    (g,) = torch.autograd.grad((w * entropic_argmax(t1)).sum(), t1)
    (ref,) = torch.autograd.grad((w * torch.softmax(t2, -1)).sum(), t2)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_bad_input_and_nonconvergence() -> None:
    with pytest.raises(ValueError, match="NaN"):
        entropic_argmax(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="all -inf"):
        entropic_argmax(torch.full((2, 3), float("-inf")))
    with pytest.raises(TypeError, match="floating"):
        entropic_argmax(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        entropic_argmax(torch.ones(3), temperature=0.0)
    with pytest.raises(ValueError, match="method"):
        entropic_argmax(torch.ones(3), method="bfgs")  # type: ignore[arg-type]
    with pytest.raises(ConvergenceError, match="max_iter"):
        dual_newton(torch.randn(1000, dtype=DT) * 10, max_iter=2)
