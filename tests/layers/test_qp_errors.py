"""qp_solve on bad input: clear errors naming the argument, or a status with check=False."""

from __future__ import annotations

import pytest
import torch

from structift.layers import InfeasibleQPError, QPConvergenceError, qp_solve
from tests.layers.qp_problems import known_qp

F64 = torch.float64


def _box_lp(B: int = 1) -> tuple[torch.Tensor, ...]:
    """min −1ᵀz s.t. 0 ≤ z ≤ 1 (n = 3): an LP whose optimum is the vertex z = 1."""
    eye = torch.eye(3, dtype=F64)
    q = -torch.ones(B, 3, dtype=F64)
    G = torch.cat([eye, -eye])
    h = torch.cat([torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)])
    return torch.zeros(3, 3, dtype=F64), q, G, h


class TestNonConvex:
    def test_indefinite_Q_raises(self) -> None:
        Q = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
        with pytest.raises(ValueError, match="not positive semidefinite"):
            qp_solve(Q, torch.zeros(2, dtype=F64))

    def test_singular_Q_raises_and_suggests_ridge(self) -> None:
        Q, q, G, h = _box_lp()
        with pytest.raises(ValueError, match="ridge"):
            qp_solve(Q, q, G, h)

    def test_unbounded_lp_is_rejected_before_solving(self) -> None:
        # min −z1 with no constraints is unbounded; Q = 0 is caught as singular.
        with pytest.raises(ValueError, match="singular"):
            qp_solve(torch.zeros(1, 1, dtype=F64), -torch.ones(1, dtype=F64))

    def test_lp_with_ridge_is_differentiable_with_stated_bias(self) -> None:
        # With ridge ε, min ½ε‖z‖² − 1ᵀz over the box has z = min(1/ε, 1) = 1 and ∂z/∂h = 1.
        Q, q, G, h = _box_lp()
        h = h.clone().requires_grad_()
        z = qp_solve(Q, q, G, h, ridge=1e-3)
        torch.testing.assert_close(z, torch.ones(1, 3, dtype=F64), atol=1e-8, rtol=0)
        (g,) = torch.autograd.grad(z.sum(), h)
        torch.testing.assert_close(g[:3], torch.ones(3, dtype=F64), atol=1e-6, rtol=0)
        # A large ridge moves the solution inside: z = 1/ε, the stated O(ε) regime ended.
        z_big = qp_solve(Q, q, G, h.detach(), ridge=4.0)
        torch.testing.assert_close(z_big, torch.full((1, 3), 0.25, dtype=F64), atol=1e-8, rtol=0)

    def test_negative_ridge_raises(self) -> None:
        with pytest.raises(ValueError, match="ridge"):
            qp_solve(torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64), ridge=-1.0)


class TestInfeasible:
    def _infeasible(self) -> tuple[torch.Tensor, ...]:
        # Batch of 3: element 1 asks z ≤ −1 and z ≥ 1.
        Q = torch.eye(1, dtype=F64)
        q = torch.zeros(3, 1, dtype=F64)
        G = torch.tensor([[1.0], [-1.0]], dtype=F64)
        h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0, 1.0]], dtype=F64)
        return Q, q, G, h

    def test_infeasible_raises_with_status(self) -> None:
        with pytest.raises(InfeasibleQPError, match="infeasible") as info:
            qp_solve(*self._infeasible())
        assert info.value.status.infeasible.tolist() == [False, True, False]
        assert isinstance(info.value, ValueError)
        cert = info.value.certificate
        assert cert.batch_index.tolist() == [[1]]
        assert bool(cert.check().valid.all())
        # λ ∝ (1, 1): Gᵀλ = 0 and hᵀλ = −2λ₁ < 0.
        torch.testing.assert_close(cert.lam[0, 0], cert.lam[0, 1], atol=1e-12, rtol=0)
        assert "batch elements [1]" in str(info.value)
        assert "rows [0, 1] of (G, h)" in str(info.value)

    def test_check_false_returns_status(self) -> None:
        sol = qp_solve(*self._infeasible(), full=True, check=False)
        assert sol.status.infeasible.tolist() == [False, True, False]
        assert sol.status.converged.tolist() == [True, False, True]
        torch.testing.assert_close(sol.z[[0, 2]], torch.zeros(2, 1, dtype=F64), atol=1e-9, rtol=0)

    def test_inconsistent_equalities_raise(self) -> None:
        # Rank deficient and inconsistent: infeasible, with a certificate ν (Aᵀν = 0, bᵀν < 0).
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
        with pytest.raises(InfeasibleQPError, match="full row rank") as info:
            qp_solve(Q, q, A=A, b=torch.tensor([0.0, 1.0], dtype=F64))
        assert bool(info.value.certificate.check().valid.all())

    def test_redundant_equalities_raise(self) -> None:
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
        with pytest.raises(ValueError, match=r"full row rank.*redundant"):
            qp_solve(Q, q, A=A, b=torch.tensor([1.0, 1.0], dtype=F64))

    def test_too_many_equalities_raise(self) -> None:
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        with pytest.raises(ValueError, match="full row rank"):
            qp_solve(Q, q, A=torch.randn(3, 2, dtype=F64), b=torch.zeros(3, dtype=F64))


class TestNotConverged:
    def test_iteration_cap_raises_with_status(self) -> None:
        P = known_qp(2, 6, 10, 1)
        with pytest.raises(QPConvergenceError, match="did not converge") as info:
            qp_solve(*P.theta, max_iter=1)
        assert not bool(info.value.status.converged.any())
        sol = qp_solve(*P.theta, max_iter=1, check=False, full=True)
        assert (sol.status.iterations == 1).all()
        assert bool(sol.z.isfinite().all())


class TestArguments:
    def _theta(self) -> list[torch.Tensor]:
        return list(known_qp(2, 4, 5, 1).theta)

    @pytest.mark.parametrize(
        ("index", "bad", "match"),
        [
            (0, torch.ones(2, 4, 3, dtype=F64), "Q must have shape"),
            (1, torch.ones(2, 3, dtype=F64), "q must have shape"),
            (2, torch.ones(2, 5, 3, dtype=F64), "G must have shape"),
            (3, torch.ones(2, 4, dtype=F64), "h must have shape"),
            (4, torch.ones(2, 1, 5, dtype=F64), "A must have shape"),
            (5, torch.ones(2, 2, dtype=F64), "b must have shape"),
            (1, torch.ones(3, 4, dtype=F64), "batch dimensions do not broadcast"),
        ],
    )
    def test_shape_errors_name_the_argument(
        self, index: int, bad: torch.Tensor, match: str
    ) -> None:
        theta = self._theta()
        theta[index] = bad
        with pytest.raises(ValueError, match=match):
            qp_solve(*theta)

    def test_dtype_mismatch(self) -> None:
        theta = self._theta()
        theta[3] = theta[3].float()
        with pytest.raises(TypeError, match=r"h has dtype torch\.float32"):
            qp_solve(*theta)

    def test_integer_dtype(self) -> None:
        with pytest.raises(TypeError, match="float32 or float64"):
            qp_solve(torch.eye(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))

    def test_device_mismatch(self) -> None:
        theta = self._theta()
        theta[1] = theta[1].to("meta")
        with pytest.raises(ValueError, match="q is on meta"):
            qp_solve(*theta)

    def test_nan_input(self) -> None:
        theta = self._theta()
        theta[3] = theta[3].clone()
        theta[3][0, 0] = float("nan")
        with pytest.raises(ValueError, match="h contains NaN"):
            qp_solve(*theta)

    def test_half_given_constraint(self) -> None:
        Q, q, G, _, _, _ = self._theta()
        with pytest.raises(ValueError, match="both of G, h"):
            qp_solve(Q, q, G)

    def test_non_tensor(self) -> None:
        with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
            qp_solve(torch.eye(2, dtype=F64), [0.0, 0.0])  # type: ignore[arg-type]

    def test_bad_options(self) -> None:
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        with pytest.raises(ValueError, match="max_iter"):
            qp_solve(Q, q, max_iter=0)
        with pytest.raises(ValueError, match="tol"):
            qp_solve(Q, q, tol=0.0)
