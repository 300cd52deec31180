"""float32 robustness of qp_solve: the rank test on A itself, ill-conditioned equalities.

Before, the full-row-rank test factored A Q⁻¹ Aᵀ, whose condition number is cond(A)² cond(Q):
in float32 an A with cond 1.2e3 was rejected; and the dual residual was scaled by 1 + ‖q‖∞
although its terms Aᵀν are cond(A) times larger, so square systems with cond(A) of 45–140
failed to converge (44 of 200 below, 35 of 200 with inequalities).
"""

from __future__ import annotations

import pytest
import torch

from structift.layers import qp_solve
from tests.layers.qp_problems import conditioned_matrix, known_qp, square_equality_qp
from tests.seeding import seeded

F64, F32 = torch.float64, torch.float32
EPS32 = torch.finfo(F32).eps


def _solve_both(theta: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Solve the float32-rounded problems in float32 and (as truth) in float64."""
    theta32 = tuple(x.to(F32) for x in theta)
    sol = qp_solve(*theta32, full=True, check=False)
    z64 = qp_solve(*(x.double() for x in theta32))
    return sol.z.double(), z64, sol.status


def _square_family(count: int, m_per_n: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` square-equality problems (p = n ∈ {4, 6, 8, 10}, cond(A) ∈ [45, 140])."""
    sizes = (4, 6, 8, 10)
    return [
        square_equality_qp(
            count // len(sizes), n, m_per_n * n, cond=(45.0, 140.0), generator=seeded(seed + n)
        )
        for n in sizes
    ]


def _check_square_family(family: list[tuple[torch.Tensor, ...]]) -> None:
    failures = 0
    for theta in family:
        z32, z64, status = _solve_both(theta)
        failures += int((~status.converged).sum())
        # Forward error of a backward-stable solve: cond(A)·eps·‖z‖, times a modest constant.
        cond = torch.linalg.cond(theta[4])[:, None]
        bound = 10 * theta[0].shape[-1] * cond * EPS32 * (1 + z64.abs().amax(-1, keepdim=True))
        assert bool(((z32 - z64).abs() <= bound).all())
    assert failures == 0


class TestSquareEqualities:
    @pytest.mark.parametrize("m_per_n", [0, 1], ids=["equalities", "with-inequalities"])
    def test_cond_45_to_140_zero_of_200_fail(self, m_per_n: int) -> None:
        _check_square_family(_square_family(200, m_per_n, seed=30 + m_per_n))


class TestRankOfA:
    @pytest.mark.parametrize(("p", "n", "m"), [(3, 8, 6), (8, 8, 0), (8, 8, 8), (2, 4, 0)])
    def test_cond_1200_is_accepted_and_solved(self, p: int, n: int, m: int) -> None:
        # A with cond(A) = 1.2e3 exactly; its Gram matrix A Q⁻¹ Aᵀ has cond ≥ 1.4e6.
        P = known_qp(25, n, m, p, generator=seeded(40 + n + p))
        A = conditioned_matrix(25, p, n, 1.2e3, generator=seeded(41 + n + p))
        b = (A @ P.z[..., None])[..., 0]
        theta = (P.Q, P.q, P.G, P.h, A, b)
        z32, z64, status = _solve_both(theta)
        assert bool(status.converged.all())
        bound = 10 * n * 1.2e3 * EPS32 * (1 + z64.abs().amax(-1, keepdim=True))
        assert bool(((z32 - z64).abs() <= bound).all())

    @pytest.mark.parametrize("dtype", [F32, F64])
    def test_relative_tolerance_on_singular_values(self, dtype: torch.dtype) -> None:
        # σ_min/σ_max = 1e-9: below max(p, n)·eps in float32, above it in float64.
        A = conditioned_matrix(1, 2, 4, 1e9, generator=seeded(42))[0].to(dtype)
        Q, q = torch.eye(4, dtype=dtype), torch.zeros(4, dtype=dtype)
        b = (A @ torch.ones(4, dtype=dtype)).detach()
        if dtype == F32:
            with pytest.raises(ValueError, match="full row rank"):
                qp_solve(Q, q, A=A, b=b)
        else:
            z = qp_solve(Q, q, A=A, b=b)
            assert (A @ z - b).abs().max() <= 1e-6 * (1 + b.abs().max())

    @pytest.mark.parametrize("scale", [1e-6, 1e4])
    def test_scale_of_A_does_not_matter(self, scale: float) -> None:
        # The rank tolerance is relative to σ_max(A): a scaled A keeps full row rank (the
        # Gram matrix's pivots scale by scale² and leave float32's range of safe values).
        P = known_qp(4, 6, 5, 2, dtype=F32, generator=seeded(43))
        sol = qp_solve(P.Q, P.q, P.G, P.h, scale * P.A, scale * P.b, full=True)
        assert bool(sol.status.converged.all())
