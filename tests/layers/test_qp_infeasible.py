"""Infeasible QPs raise `InfeasibleQPError` with a verified Farkas certificate; feasible never.

A certificate (λ ≥ 0, ν) of {z : Gz ≤ h, Az = b} = ∅ has Gᵀλ + Aᵀν = 0 and hᵀλ + bᵀν < 0.
Every test re-checks it here from the problem data it passed in (not from the copy the error
stores), besides calling ``certificate.check()``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structift.layers import FarkasCertificate, InfeasibleQPError, QPConvergenceError, qp_solve
from tests.layers.qp_problems import farkas_qp, known_qp
from tests.seeding import examples, seeded

F64, F32 = torch.float64, torch.float32
DTYPES = [pytest.param(F64, id="float64"), pytest.param(F32, id="float32")]


def _flat_data(theta: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return G, h, A, b [K, ...] (float64) of the problems at the batch indices [K, d]."""
    _, q, G, h, A, b = theta
    batch = q.shape[:-1]
    out = []
    for x, core in ((G, 2), (h, 1), (A, 2), (b, 1)):
        x = x.expand(*batch, *x.shape[x.dim() - core :])
        out.append(torch.stack([x[tuple(i)] for i in index.tolist()]).double())
    return tuple(out)


def assert_certifies(cert: FarkasCertificate, theta: tuple[torch.Tensor, ...]) -> None:
    """Check the Farkas conditions of every certificate against the caller's data."""
    G, h, A, b = _flat_data(theta, cert.batch_index)
    lam, nu = cert.lam, cert.nu
    assert bool((lam >= 0).all())
    y = torch.cat([lam, nu], -1)
    M, c = torch.cat([G, A], -2), torch.cat([h, b], -1)
    r = (y.unsqueeze(-2) @ M).squeeze(-2)
    # Mᵀy vanishes far below the size of its terms (a float64 solve; exact to rounding when
    # the certificate comes from the exact projection), and hᵀλ + bᵀν is clearly negative.
    terms = (y.abs().unsqueeze(-2) @ M.abs()).squeeze(-2)
    assert bool((r.abs().sum(-1) <= 1e-9 * terms.sum(-1)).all())
    assert bool(((c * y).sum(-1) < 0).all())
    chk = cert.check()
    assert bool(chk.valid.all()), chk
    assert bool((chk.radius >= chk.required).all())


def _raises_infeasible(*theta: torch.Tensor) -> InfeasibleQPError:
    with pytest.raises(InfeasibleQPError) as info:
        qp_solve(*theta)
    return info.value


class TestReportedFamilies:
    """The two families of the report: 200 random q each, every one certified."""

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_z1_below_minus_one_and_above_one(self, dtype: torch.dtype) -> None:
        # {z₁ ≤ −1, −z₁ ≤ −1}: previously 151 of 200 random q were reported as not converged.
        n = 3
        q = 3 * torch.randn(200, n, generator=seeded(10), dtype=F64).to(dtype)
        G = torch.zeros(2, n, dtype=dtype)
        G[0, 0], G[1, 0] = 1.0, -1.0
        theta = (torch.eye(n, dtype=dtype), q, G, -torch.ones(2, dtype=dtype))
        err = _raises_infeasible(*theta)
        assert bool(err.status.infeasible.all())
        assert err.certificate.batch_index.reshape(-1).tolist() == list(range(200))
        full = (*theta, torch.zeros(0, n, dtype=dtype), torch.zeros(0, dtype=dtype))
        assert_certifies(err.certificate, full)
        # The exact certificate is λ ∝ (1, 1).
        lam = err.certificate.lam
        torch.testing.assert_close(lam[:, 0], lam[:, 1], atol=1e-12 * lam.abs().max(), rtol=0)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_nonnegative_summing_to_minus_one(self, dtype: torch.dtype) -> None:
        # {z ≥ 0, Σz = −1}: previously flagged only for q = 0 (and not always then).
        n = 4
        q = torch.randn(200, n, generator=seeded(11), dtype=F64).to(dtype)
        q[:20] = 0.0
        ones = torch.ones(1, n, dtype=dtype)
        theta = (
            torch.eye(n, dtype=dtype),
            q,
            -torch.eye(n, dtype=dtype),
            torch.zeros(n, dtype=dtype),
            ones,
            -ones[0, :1],
        )
        err = _raises_infeasible(*theta)
        assert bool(err.status.infeasible.all())
        assert_certifies(err.certificate, theta)
        assert "rows [0, 1, 2, 3] of (G, h) and rows [0] of (A, b)" in str(err)


SIZES = [(1, 2, 0), (2, 3, 0), (5, 8, 2), (10, 20, 3), (8, 4, 6), (3, 12, 2)]


class TestRandomFamilies:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize(("n", "m", "p"), SIZES)
    @pytest.mark.parametrize("gap", [1.0, 1e-3])
    def test_infeasible_by_construction_are_certified(
        self, dtype: torch.dtype, n: int, m: int, p: int, gap: float
    ) -> None:
        # Dyadic data: the construction is exactly infeasible in float32 as well.
        g = seeded(100 * n + m)
        theta = farkas_qp(40, n, m, p, gap=gap, generator=g, dtype=dtype, dyadic=True)
        err = _raises_infeasible(*theta)
        assert bool(err.status.infeasible.all())
        assert not bool(err.status.converged.any())
        assert_certifies(err.certificate, theta)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize(("n", "m", "p"), SIZES)
    def test_near_infeasible_feasible_problems_are_solved(
        self, dtype: torch.dtype, n: int, m: int, p: int
    ) -> None:
        # Slack 1e-3 relative on the rows of a would-be certificate: a thin feasible region.
        g = seeded(200 * n + m)
        theta = farkas_qp(40, n, m, p, gap=-1e-3, generator=g, dtype=dtype, dyadic=True)
        sol = qp_solve(*theta, full=True)
        assert not bool(sol.status.infeasible.any())
        G, h = theta[2].double(), theta[3].double()
        z = sol.z.double()
        slack = h - (G @ z[..., None])[..., 0]
        tol = 1e-5 if dtype == F32 else 1e-10  # 100·tol, the accepted primal residual
        assert bool((slack >= -tol * (1 + h.abs().amax(-1, keepdim=True))).all())

    @pytest.mark.parametrize("width", [1e-3, 1e-6, 1e-9])
    def test_tiny_feasible_interval(self, width: float) -> None:
        # 0 ≤ z₁ ≤ width, pushed out of it by q: feasible however thin, never "infeasible".
        n = 2
        q = 5 * torch.randn(50, n, generator=seeded(12), dtype=F64)
        G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=F64)
        h = torch.tensor([width, 0.0], dtype=F64)
        z = qp_solve(torch.eye(n, dtype=F64), q, G, h)
        # Q = I, so z is within the accepted scaled residual 100·tol = 1e-10 of the exact
        # solution (clamp(−q₁, 0, width), −q₂).
        exact = torch.stack([(-q[:, 0]).clamp(0.0, width), -q[:, 1]], -1)
        torch.testing.assert_close(z, exact, atol=1e-10 * (1 + q.abs().amax()), rtol=0)

    @settings(max_examples=examples(25))
    @given(
        st.integers(1, 8),
        st.integers(1, 10),
        st.integers(0, 3),
        st.floats(-6.0, 0.0),
        st.booleans(),
        st.integers(0, 2**16),
    )
    def test_infeasible_iff_constructed_so(
        self, n: int, m: int, p: int, log_gap: float, infeasible: bool, seed: int
    ) -> None:
        # Generic float64 data, relative violations from 1e-4 to 1 (slacks from 1e-6 to 1).
        # Much smaller violations need a certificate radius beyond what float64 rounding of
        # Gᵀλ + Aᵀν can prove (about gap/(k·eps) against 1e7 times the constraints' scale).
        p = min(p, n - 1)
        gap = 10.0 ** (log_gap * 2 / 3) if infeasible else -(10.0**log_gap)
        theta = farkas_qp(4, n, m, p, gap=gap, generator=seeded(seed))
        sol = qp_solve(*theta, full=True, check=False)
        assert sol.status.infeasible.tolist() == [infeasible] * 4
        assert sol.status.converged.tolist() == [not infeasible] * 4


class TestBatches:
    def test_mixed_batch_names_the_right_elements(self) -> None:
        g = seeded(13)
        bad = farkas_qp(12, 5, 8, 2, gap=0.5, generator=g)
        good = farkas_qp(12, 5, 8, 2, gap=-0.5, generator=g)
        mask = torch.zeros(12, dtype=torch.bool)
        mask[[1, 6, 7, 10]] = True
        theta = tuple(
            torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, y).reshape(3, 4, *x.shape[1:])
            for x, y in zip(bad, good)
        )
        err = _raises_infeasible(*theta)
        assert err.status.infeasible.reshape(-1).tolist() == mask.tolist()
        assert err.certificate.batch_index.tolist() == [[0, 1], [1, 2], [1, 3], [2, 2]]
        assert "batch elements [(0, 1), (1, 2), (1, 3), (2, 2)]" in str(err)
        assert_certifies(err.certificate, theta)
        # With check=False the feasible elements are solved as if alone.
        sol = qp_solve(*theta, full=True, check=False)
        assert sol.status.converged.reshape(-1).tolist() == (~mask).tolist()
        for k in (~mask).nonzero().reshape(-1).tolist():
            zk = qp_solve(*(x[k] for x in good))
            torch.testing.assert_close(sol.z.reshape(12, -1)[k], zk, atol=1e-9, rtol=0)

    def test_shared_constraints_with_some_infeasible_h(self) -> None:
        # G shared, h per element: z ≤ h₀ and −z ≤ h₁ is empty where h₀ + h₁ < 0.
        h = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [2.0, -1.0], [0.2, -0.3]], dtype=F64)
        theta = (
            torch.eye(1, dtype=F64),
            torch.zeros(4, 1, dtype=F64),
            torch.tensor([[1.0], [-1.0]], dtype=F64),
            h,
        )
        err = _raises_infeasible(*theta)
        assert err.status.infeasible.tolist() == [False, True, False, True]
        full = (*theta, torch.zeros(0, 1, dtype=F64), torch.zeros(0, dtype=F64))
        assert_certifies(err.certificate, full)

    def test_unbatched_problem(self) -> None:
        theta = tuple(x[0] for x in farkas_qp(1, 4, 6, 1, gap=1.0, generator=seeded(14)))
        err = _raises_infeasible(*theta)
        assert err.certificate.batch_index.shape == (1, 0)
        assert "the (unbatched) problem" in str(err)
        assert_certifies(err.certificate, theta)


class TestNeverOnFeasible:
    @pytest.mark.parametrize("max_iter", [1, 2, 3])
    def test_failed_feasible_solves_are_convergence_errors(self, max_iter: int) -> None:
        # The certificate search runs on every failed element; none of these may be flagged.
        P = known_qp(16, 6, 12, 2, generator=seeded(15))
        with pytest.raises(QPConvergenceError) as info:
            qp_solve(*P.theta, max_iter=max_iter)
        assert not bool(info.value.status.infeasible.any())
        assert "No Farkas certificate" in str(info.value)

    @settings(max_examples=examples(20))
    @given(st.integers(1, 8), st.integers(0, 12), st.integers(0, 3), st.integers(0, 2**16))
    def test_feasible_problems_cut_short_are_not_flagged(
        self, n: int, m: int, p: int, seed: int
    ) -> None:
        P = known_qp(3, n, m, min(p, n - 1), generator=seeded(seed))
        sol = qp_solve(*P.theta, max_iter=2, full=True, check=False)
        assert not bool(sol.status.infeasible.any())


class TestEqualities:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_inconsistent_equalities_are_certified(self, dtype: torch.dtype) -> None:
        # z₁ + z₂ = 0 and z₁ + z₂ = 1: A is rank deficient and b outside its range.
        Q, q = torch.eye(2, dtype=dtype), torch.zeros(3, 2, dtype=dtype)
        A = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=dtype)
        b = torch.tensor([0.0, 1.0], dtype=dtype)
        err = _raises_infeasible(Q, q, None, None, A, b)
        assert "A does not have full row rank" in str(err)
        assert bool(err.status.infeasible.all())
        empty = torch.zeros(0, 2, dtype=dtype)
        assert_certifies(err.certificate, (Q, q, empty, empty[:, 0], A, b))
        nu = err.certificate.nu
        torch.testing.assert_close(nu[:, 0], -nu[:, 1], atol=1e-12 * nu.abs().max(), rtol=0)

    def test_more_equalities_than_variables_inconsistent(self) -> None:
        A = torch.randn(3, 2, generator=seeded(16), dtype=F64)
        b = torch.randn(3, generator=seeded(17), dtype=F64)
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        err = _raises_infeasible(Q, q, None, None, A, b)
        empty = torch.zeros(0, 2, dtype=F64)
        assert_certifies(err.certificate, (Q, q, empty, empty[:, 0], A, b))

    def test_redundant_consistent_equalities_are_a_value_error(self) -> None:
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        A = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=F64)
        with pytest.raises(ValueError, match="redundant") as info:
            qp_solve(Q, q, A=A, b=torch.tensor([1.0, 2.0], dtype=F64))
        assert not isinstance(info.value, InfeasibleQPError)

    def test_rank_deficient_A_with_infeasible_inequalities(self) -> None:
        # The equalities are redundant but consistent; the inequalities contradict them.
        Q, q = torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)
        A = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=F64)
        b = torch.tensor([1.0, 2.0], dtype=F64)  # z₁ = 1
        G, h = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([0.0], dtype=F64)  # z₁ ≤ 0
        err = _raises_infeasible(Q, q, G, h, A, b)
        assert_certifies(err.certificate, (Q, q, G, h, A, b))


class TestCertificate:
    def test_check_rejects_a_tampered_certificate(self) -> None:
        err = _raises_infeasible(*farkas_qp(3, 4, 6, 1, gap=1.0, generator=seeded(18)))
        cert = err.certificate
        assert bool(cert.check().valid.all())
        # Raise h along λ until hᵀλ + bᵀν = +t: the same (λ, ν) then proves nothing.
        t = -((cert.h * cert.lam).sum(-1) + (cert.b * cert.nu).sum(-1))
        relaxed = cert._replace(h=cert.h + (2 * t / cert.lam.sum(-1))[:, None])
        assert not bool(relaxed.check().valid.any())
        # A vector off the null space of [G; A]ᵀ proves only a small radius.
        off = cert._replace(lam=cert.lam + 1e-3)
        chk = off.check()
        assert not bool(chk.valid.any())
        assert bool((chk.radius < chk.required).all())

    def test_message_says_what_to_do(self) -> None:
        err = _raises_infeasible(*farkas_qp(2, 3, 4, 0, gap=1.0, generator=seeded(19)))
        msg = str(err)
        for part in ("2 of 2 problems are infeasible", "certificate.check()", "Relax h or b"):
            assert part in msg
        assert isinstance(err, ValueError)
