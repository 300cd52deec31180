"""qp_solve against external references: cvxpy + Clarabel and qpth 0.0.18."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from structift.layers import qp_solve
from tests.layers.qp_problems import known_qp
from tests.seeding import seeded

pytestmark = pytest.mark.reference
F64 = torch.float64


def _clarabel(theta: tuple[torch.Tensor, ...]) -> np.ndarray:
    cp = pytest.importorskip("cvxpy")
    Q, q, G, h, A, b = (x.numpy() for x in theta)
    z = cp.Variable(q.shape[-1])
    cons = []
    if G.shape[0]:
        cons.append(G @ z <= h)
    if A.shape[0]:
        cons.append(A @ z == b)
    prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + q @ z), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13)
    assert prob.status == cp.OPTIMAL
    return np.asarray(z.value)


class TestClarabel:
    @pytest.mark.parametrize(("n", "m", "p"), [(8, 12, 2), (15, 30, 0), (5, 0, 3)])
    def test_known_solution_problems(self, n: int, m: int, p: int) -> None:
        P = known_qp(4, n, m, p, generator=seeded(n + m + p))
        z = qp_solve(*P.theta)
        for k in range(4):
            ref = torch.from_numpy(_clarabel(tuple(x[k] for x in P.theta)))
            assert (z[k] - ref).abs().max() <= 1e-8
            assert (P.z[k] - ref).abs().max() <= 1e-8  # the reference agrees with the construction

    def test_random_feasible_problems(self) -> None:
        # Not built from a solution: random data, feasible by construction (h ≥ G z0).
        g = seeded(7)
        B, n, m, p = 4, 10, 25, 3
        L = torch.randn(B, n, n, generator=g, dtype=F64)
        Q = L @ L.mT + 0.1 * torch.eye(n, dtype=F64)
        q = torch.randn(B, n, generator=g, dtype=F64) * 5
        G = torch.randn(B, m, n, generator=g, dtype=F64)
        z0 = torch.randn(B, n, generator=g, dtype=F64)
        h = (G @ z0[..., None])[..., 0] + torch.rand(B, m, generator=g, dtype=F64)
        A = torch.randn(B, p, n, generator=g, dtype=F64)
        b = (A @ z0[..., None])[..., 0]
        z = qp_solve(Q, q, G, h, A, b)
        for k in range(B):
            ref = torch.from_numpy(_clarabel((Q[k], q[k], G[k], h[k], A[k], b[k])))
            assert (z[k] - ref).abs().max() <= 1e-8


def _qpth(*theta: torch.Tensor) -> torch.Tensor:
    qpth = pytest.importorskip("qpth.qp")
    Q, q, G, h, A, b = theta
    if A.shape[-2] == 0:
        A = b = torch.empty(0, dtype=Q.dtype)
    return qpth.QPFunction(verbose=-1, eps=1e-12, maxIter=40)(Q, q, G, h, A, b)


class TestQpth:
    def test_solution_and_per_example_gradients_match(self) -> None:
        P = known_qp(6, 10, 15, 2, generator=seeded(11))
        w = torch.randn(6, 10, generator=seeded(12), dtype=F64)
        ours = [x.clone().requires_grad_() for x in P.theta]
        theirs = [x.clone().requires_grad_() for x in P.theta]
        z = qp_solve(*ours)
        z_ref = _qpth(*theirs)
        torch.testing.assert_close(z, z_ref, atol=1e-8, rtol=0)
        g = torch.autograd.grad((z * w).sum(), ours)
        g_ref = torch.autograd.grad((z_ref * w).sum(), theirs)
        for a, c in zip(g, g_ref):
            # qpth's backward is less accurate (it checks against finite differences to ~1e-4).
            torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-3)

    def test_shared_parameter_sum_versus_qpth_mean(self) -> None:
        # qpth 0.0.18 returns the batch mean for a parameter given without batch dim; we sum.
        P = known_qp(1, 8, 10, 0, generator=seeded(13))
        B = 4
        q = P.q + 0.2 * torch.randn(B, 8, generator=seeded(14), dtype=F64)
        w = torch.randn(B, 8, generator=seeded(15), dtype=F64)
        h_ours = P.h[0].clone().requires_grad_()
        h_qpth = P.h[0].clone().requires_grad_()
        (qp_solve(P.Q[0], q, P.G[0], h_ours) * w).sum().backward()
        (_qpth(P.Q[0], q, P.G[0], h_qpth, P.A[0], P.b[0]) * w).sum().backward()
        per_example = torch.stack(
            [
                torch.autograd.grad(
                    (qp_solve(P.Q[0], q[k], P.G[0], hk) * w[k]).sum(),
                    hk,
                )[0]
                for k in range(B)
                for hk in [P.h[0].clone().requires_grad_()]
            ]
        )
        assert h_ours.grad is not None and h_qpth.grad is not None
        torch.testing.assert_close(h_ours.grad, per_example.sum(0), atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(h_qpth.grad * B, h_ours.grad, atol=1e-5, rtol=1e-3)
