"""qp_solve / QPLayer: solutions, KKT residuals, gradients, batching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.layers import QPLayer, QPSolution, qp_solve
from tests.layers.qp_problems import kkt_residual, known_qp
from tests.seeding import fixed, seeded

F64 = torch.float64
SIZES = [(6, 8, 2), (5, 7, 0), (4, 0, 2), (3, 0, 0), (10, 25, 3)]


class TestForward:
    @pytest.mark.parametrize(("n", "m", "p"), SIZES)
    def test_recovers_known_solution_float64(
        self, device: torch.device, n: int, m: int, p: int
    ) -> None:
        P = known_qp(16, n, m, p, device=device)
        sol = qp_solve(*P.theta, full=True)
        assert isinstance(sol, QPSolution)
        assert (sol.z - P.z).abs().max() <= 1e-8
        if m:
            assert (sol.lam - P.lam).abs().max() <= 1e-8
        if p:
            assert (sol.nu - P.nu).abs().max() <= 1e-8
        assert bool(sol.status.converged.all())
        assert sol.status.kkt_residual.max() <= 1e-10

    def test_polished_solution_is_exact_to_rounding(self) -> None:
        P = known_qp(16, 12, 20, 3, generator=seeded(8))
        sol = qp_solve(*P.theta, full=True)
        assert bool(sol.status.polished.all())
        assert (sol.z - P.z).abs().max() <= 1e-12
        assert (sol.lam - P.lam).abs().max() <= 1e-12

    def test_no_jam_near_the_boundary(self) -> None:
        """Reproducer: element 14 of this well-conditioned batch (cond Q = 8.4) stalled at a
        scaled residual of 1.3e-2 when every step went to 0.99 of the boundary."""
        P = known_qp(16, 12, 20, 3, generator=fixed(4_000_020))
        sol = qp_solve(*P.theta, full=True)
        assert bool(sol.status.converged.all())
        assert (sol.z - P.z).abs().max() <= 1e-12

    def test_kkt_residual_is_zero_at_solution(self, device: torch.device) -> None:
        P = known_qp(8, 12, 20, 3, device=device, generator=seeded(3))
        sol = qp_solve(*P.theta, full=True)
        for r in kkt_residual(P.theta, sol.z, sol.lam, sol.nu):
            assert r.max() <= 1e-9

    def test_float32_matches_float64_solution_of_rounded_problem(
        self, device: torch.device
    ) -> None:
        P32 = known_qp(16, 20, 20, 2, dtype=torch.float32, device=device)
        z32 = qp_solve(*P32.theta)
        assert z32.dtype == torch.float32
        z64 = qp_solve(*(x.double() for x in P32.theta))
        assert (z32.double() - z64).abs().max() <= 1e-3 * (1 + z64.abs().max())

    def test_unbatched_and_multi_batch_shapes(self) -> None:
        P = known_qp(6, 5, 6, 1)
        z = qp_solve(*P.theta)
        single = qp_solve(*(x[0] for x in P.theta))
        assert single.shape == (5,)
        torch.testing.assert_close(single, z[0], atol=1e-10, rtol=0)
        grid = qp_solve(*(x.reshape(2, 3, *x.shape[1:]) for x in P.theta))
        assert grid.shape == (2, 3, 5)
        torch.testing.assert_close(grid.reshape(6, 5), z, atol=1e-10, rtol=0)

    def test_shared_arguments_broadcast(self) -> None:
        P = known_qp(1, 6, 8, 2)
        q = P.q + 0.3 * torch.randn(5, 6, dtype=F64)
        z = qp_solve(P.Q[0], q, P.G[0], P.h[0], P.A[0], P.b[0])
        loop = torch.stack([qp_solve(P.Q[0], qi, P.G[0], P.h[0], P.A[0], P.b[0]) for qi in q])
        torch.testing.assert_close(z, loop, atol=1e-10, rtol=0)

    def test_only_symmetric_part_of_Q_matters(self) -> None:
        P = known_qp(4, 5, 6, 1)
        skew = torch.randn(4, 5, 5, dtype=F64)
        skew = skew - skew.mT
        torch.testing.assert_close(
            qp_solve(P.Q + skew, *P.theta[1:]), qp_solve(*P.theta), atol=1e-10, rtol=0
        )

    def test_box_projection_is_clamp(self, device: torch.device) -> None:
        # argmin ½‖z − y‖² s.t. lo ≤ z ≤ hi is clamp(y, lo, hi), with gradient 1 inside the box.
        n = 7
        y = 2 * torch.randn(5, n, dtype=F64, device=device, requires_grad=True)
        lo, hi = -torch.ones(n, dtype=F64, device=device), torch.ones(n, dtype=F64, device=device)
        eye = torch.eye(n, dtype=F64, device=device)
        z = qp_solve(eye, -y, torch.cat([eye, -eye]), torch.cat([hi, -lo]))
        torch.testing.assert_close(z, y.clamp(-1, 1), atol=1e-9, rtol=0)
        (g,) = torch.autograd.grad(z.sum(), y)
        torch.testing.assert_close(g, ((y > -1) & (y < 1)).to(F64), atol=1e-7, rtol=0)

    def test_degenerate_vertex_converges(self) -> None:
        # z ≤ 0 and −z ≤ 0 twice over: four dependent active constraints at z = 0 (LICQ fails).
        Q = torch.eye(2, dtype=F64)
        q = torch.tensor([[-1.0, 2.0], [1.0, 1.0]], dtype=F64)
        G = torch.cat([torch.eye(2, dtype=F64), -torch.eye(2, dtype=F64)])
        sol = qp_solve(Q, q, G, torch.zeros(4, dtype=F64), full=True)
        torch.testing.assert_close(sol.z, torch.zeros(2, 2, dtype=F64), atol=1e-8, rtol=0)
        assert bool(sol.status.converged.all())

    def test_qplayer_module(self) -> None:
        P = known_qp(3, 4, 5, 1)
        layer = QPLayer(tol=1e-11)
        torch.testing.assert_close(layer(*P.theta), qp_solve(*P.theta), atol=1e-10, rtol=0)
        assert "tol" in repr(layer)
        sol = QPLayer(full=True)(*P.theta)
        assert isinstance(sol, QPSolution)


class TestBackward:
    def test_gradcheck_all_inputs_and_duals(self) -> None:
        P = known_qp(2, 4, 3, 1, generator=seeded(1))
        inputs = [x.clone().requires_grad_() for x in P.theta]

        def f(*theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            sol = qp_solve(*theta, full=True)
            return sol.z, sol.lam, sol.nu

        assert torch.autograd.gradcheck(f, inputs, atol=1e-6)

    def test_gradcheck_shared_parameters(self) -> None:
        P = known_qp(1, 4, 5, 1, generator=seeded(2))
        q = P.q + 0.1 * torch.randn(3, 4, dtype=F64)
        inputs = [x.clone().requires_grad_() for x in (P.Q[0], q, P.G[0], P.h[0], P.A[0], P.b[0])]
        assert torch.autograd.gradcheck(lambda *t: qp_solve(*t), inputs, atol=1e-6)

    def test_shared_parameter_gets_sum_of_per_example_gradients(self) -> None:
        # qpth 0.0.18 returns the batch MEAN here (1/B of the right answer); this catches that.
        P = known_qp(1, 6, 8, 2)
        B = 5
        q = P.q + 0.3 * torch.randn(B, 6, dtype=F64)
        w = torch.randn(B, 6, dtype=F64)
        shared = [x[0].clone().requires_grad_() for x in (P.Q, P.G, P.h, P.A, P.b)]
        Q, G, h, A, b = shared
        (qp_solve(Q, q, G, h, A, b) * w).sum().backward()
        for i, x in enumerate(shared):
            per_example = []
            for k in range(B):
                xs = [y.detach().clone().requires_grad_(j == i) for j, y in enumerate(shared)]
                zk = qp_solve(xs[0], q[k], xs[1], xs[2], xs[3], xs[4])
                per_example.append(torch.autograd.grad((zk * w[k]).sum(), xs[i])[0])
            assert x.grad is not None
            torch.testing.assert_close(
                x.grad, torch.stack(per_example).sum(0), atol=1e-8, rtol=1e-7
            )

    def test_finite_differences_along_random_direction(self, device: torch.device) -> None:
        P = known_qp(4, 30, 40, 5, device=device, generator=seeded(4))
        theta = [x.clone().requires_grad_() for x in P.theta]
        w = torch.randn(4, 30, dtype=F64, device=device)
        grads = torch.autograd.grad((qp_solve(*theta) * w).sum(), theta)
        dirs = [torch.randn_like(x) for x in P.theta]
        eps = 1e-6

        def loss(t: float) -> torch.Tensor:
            return (qp_solve(*(x + t * d for x, d in zip(P.theta, dirs))) * w).sum()

        fd = (loss(eps) - loss(-eps)) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, dirs))
        assert abs(fd - analytic) <= 1e-5 * (1 + abs(fd))

    def test_small_multipliers_do_not_bias_the_jacobian(self) -> None:
        # An active constraint with λ ~ 1e-4 keeps a slack ~ μ/λ on the central path, which
        # smooths W = s/λ by ~1e-5 relative to the Gram matrix; the polished solve removes it,
        # so dz/dh matches finite differences tightly. (The kink where such a constraint
        # releases is ~λ away, so the step must be smaller than that.)
        P = known_qp(2, 8, 10, 0, generator=seeded(9))
        lam = torch.where(P.lam > 0, P.lam * torch.tensor([1e-4, 1.0], dtype=F64)[:, None], 0.0)
        q = -((P.Q @ P.z[..., None])[..., 0] + (P.G.mT @ lam[..., None])[..., 0])
        h = P.h.clone().requires_grad_()
        z = qp_solve(P.Q, q, P.G, h)
        torch.testing.assert_close(z, P.z, atol=1e-11, rtol=0)
        (g,) = torch.autograd.grad(z.sum(), h)
        step = 1e-7
        for i in range(P.h.shape[-1]):
            e = torch.zeros_like(P.h)
            e[:, i] = step
            fd = (qp_solve(P.Q, q, P.G, P.h + e) - qp_solve(P.Q, q, P.G, P.h - e)).sum(-1) / (
                2 * step
            )
            torch.testing.assert_close(g[:, i], fd, atol=1e-7, rtol=0)

    def test_gradient_of_Q_is_symmetric(self) -> None:
        P = known_qp(3, 5, 6, 1)
        Q = P.Q.clone().requires_grad_()
        (g,) = torch.autograd.grad(qp_solve(Q, *P.theta[1:]).pow(2).sum(), Q)
        torch.testing.assert_close(g, g.mT, atol=1e-12, rtol=0)

    def test_unused_outputs_and_no_grad_inputs(self) -> None:
        P = known_qp(2, 4, 5, 1)
        q = P.q.clone().requires_grad_()
        sol = qp_solve(P.Q, q, P.G, P.h, P.A, P.b, full=True)
        (g,) = torch.autograd.grad(sol.lam.sum(), q)
        assert g.shape == q.shape and bool(g.isfinite().all())


@st.composite
def _problem_sizes(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    n = draw(st.integers(1, 6))
    return (
        draw(st.integers(1, 4)),
        n,
        draw(st.integers(0, 8)),
        draw(st.integers(0, n - 1)),
        draw(st.integers(0, 2**16)),
    )


class TestProperties:
    @given(_problem_sizes())
    def test_known_solution_and_kkt(self, sizes: tuple[int, int, int, int, int]) -> None:
        B, n, m, p, seed = sizes
        P = known_qp(B, n, m, p, generator=seeded(seed))
        sol = qp_solve(*P.theta, full=True)
        assert (sol.z - P.z).abs().max() <= 1e-8
        for r in kkt_residual(P.theta, sol.z, sol.lam, sol.nu):
            assert r.max() <= 1e-8

    @given(_problem_sizes())
    def test_batch_equals_stacked_singles(self, sizes: tuple[int, int, int, int, int]) -> None:
        B, n, m, p, seed = sizes
        P = known_qp(B, n, m, p, generator=seeded(seed))
        theta = [x.clone().requires_grad_() for x in P.theta]
        w = torch.randn(B, n, generator=seeded(seed), dtype=F64)
        z = qp_solve(*theta)
        grads = torch.autograd.grad((z * w).sum(), theta)
        for k in range(B):
            single = [x[k].detach().clone().requires_grad_() for x in P.theta]
            zk = qp_solve(*single)
            torch.testing.assert_close(zk, z[k].detach(), atol=1e-9, rtol=0)
            gk = torch.autograd.grad((zk * w[k]).sum(), single)
            for a, c in zip(gk, grads):
                torch.testing.assert_close(a, c[k], atol=1e-7, rtol=1e-6)


class TestEmptyBatch:
    @pytest.mark.parametrize(("m", "p"), [(5, 2), (0, 0), (4, 0)])
    def test_empty_batch_gives_empty_results_and_gradients(self, m: int, p: int) -> None:
        n = 3
        P = known_qp(1, n, m, p)
        # Per-problem q and h with batch 0; Q, G, A, b shared.
        shared = [x[0].clone().requires_grad_() for x in (P.Q, P.G, P.A, P.b)]
        Q, G, A, b = shared
        q = torch.zeros(0, n, dtype=F64, requires_grad=True)
        h = torch.zeros(0, m, dtype=F64, requires_grad=True)
        sol = qp_solve(Q, q, G, h, A, b, full=True)
        assert (sol.z.shape, sol.lam.shape, sol.nu.shape) == ((0, n), (0, m), (0, p))
        assert all(s.shape == (0,) for s in sol.status)
        loss = sol.z.sum() + sol.lam.sum() + sol.nu.sum()
        inputs = [Q, q, G, h, A, b]
        grads = torch.autograd.grad(loss, inputs)
        for g, x in zip(grads, inputs):
            assert g.shape == x.shape
            assert bool((g == 0).all())

    def test_empty_leading_dimension_of_a_grid(self) -> None:
        Q = torch.eye(4, dtype=F64).expand(2, 0, 4, 4)
        z = qp_solve(Q, torch.zeros(2, 0, 4, dtype=F64), full=True)
        assert z.z.shape == (2, 0, 4)
        assert z.status.converged.shape == (2, 0)

    def test_qplayer_on_empty_batch(self) -> None:
        z = QPLayer()(torch.eye(2, dtype=F64), torch.zeros(0, 2, dtype=F64))
        assert z.shape == (0, 2)
