"""Special cases and cross-checks of the QP layer.

- Consistency triangle for sparsemax: sparsemax(θ) = qp_solve(I, −θ, −I, 0, 1ᵀ, 1) = the
  closed form (sorting threshold, `structift.layers.sparsemax`) = the variational form
  argmax_{p ∈ Δ} ⟨θ, p⟩ − ½‖p‖² solved by enumerating supports; Jacobians included.
- The QP backward agrees with `structift.implicit.custom_root` on the KKT residual.
"""

from __future__ import annotations

import itertools

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from structift.implicit import custom_root
from structift.layers import qp_solve, sparsemax
from tests.layers.qp_problems import known_qp
from tests.seeding import seeded

F64 = torch.float64


def _sparsemax_qp(theta: torch.Tensor) -> torch.Tensor:
    n = theta.shape[-1]
    eye = torch.eye(n, dtype=theta.dtype)
    ones = torch.ones(1, n, dtype=theta.dtype)
    return qp_solve(eye, -theta, -eye, torch.zeros(n, dtype=theta.dtype), ones, ones[0, :1])


def _sparsemax_variational(theta: torch.Tensor) -> torch.Tensor:
    """Maximize ⟨θ, p⟩ − ½‖p‖² over the simplex by trying every support (brute force)."""
    n = theta.shape[-1]
    best, best_val = None, -float("inf")
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            idx = list(S)
            tau = (theta[idx].sum() - 1) / k
            p = torch.zeros_like(theta)
            p[idx] = theta[idx] - tau
            if bool((p[idx] >= 0).all()):
                val = float(theta @ p - 0.5 * p @ p)
                if val > best_val:
                    best, best_val = p, val
    assert best is not None
    return best


def _sparsemax_jacobian(p: torch.Tensor) -> torch.Tensor:
    """Closed-form Jacobian diag(s) − s sᵀ / |S| with s the support indicator."""
    s = (p > 0).to(p.dtype)
    return torch.diag(s) - torch.outer(s, s) / s.sum()


class TestSparsemaxTriangle:
    @given(st.integers(2, 5), st.integers(0, 2**16))
    def test_values_agree(self, n: int, seed: int) -> None:
        theta = 2 * torch.randn(n, generator=seeded(seed), dtype=F64)
        p_qp = _sparsemax_qp(theta)
        torch.testing.assert_close(p_qp, sparsemax(theta), atol=1e-8, rtol=0)
        torch.testing.assert_close(p_qp, _sparsemax_variational(theta), atol=1e-8, rtol=0)

    @given(st.integers(2, 6), st.integers(0, 2**16))
    def test_jacobians_agree(self, n: int, seed: int) -> None:
        theta = 2 * torch.randn(n, generator=seeded(seed), dtype=F64)
        p = sparsemax(theta)
        tau = (theta - p)[p > 0][0]
        # The Jacobian jumps where some θ_i crosses the threshold τ; stay clear of that.
        assume(bool(((theta - tau).abs() > 1e-3).all()))
        J_qp = torch.autograd.functional.jacobian(_sparsemax_qp, theta)
        J_sm = torch.autograd.functional.jacobian(sparsemax, theta)
        J_cf = _sparsemax_jacobian(sparsemax(theta))
        torch.testing.assert_close(J_qp, J_cf, atol=1e-6, rtol=0)
        torch.testing.assert_close(J_sm, J_cf, atol=1e-12, rtol=0)

    def test_batched(self) -> None:
        theta = torch.randn(16, 5, generator=seeded(0), dtype=F64)
        torch.testing.assert_close(_sparsemax_qp(theta), sparsemax(theta), atol=1e-8, rtol=0)


def _kkt_residual(
    x: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(z, λ, ν; θ) = (Qz + q + Gᵀλ + Aᵀν, λ ∘ (Gz − h), Az − b) with Q's symmetric part."""
    z, lam, nu = x
    Q, q, G, h, A, b = theta
    Qs = 0.5 * (Q + Q.mT)

    def mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (M @ v[..., None])[..., 0]

    return (
        mv(Qs, z) + q + mv(G.mT, lam) + mv(A.mT, nu),
        lam * (mv(G, z) - h),
        mv(A, z) - b,
    )


def test_custom_root_on_kkt_residual_gives_same_gradients() -> None:
    P = known_qp(3, 6, 9, 2, generator=seeded(5))

    @custom_root(_kkt_residual, batch_ndim=1)
    def solve(*theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sol = qp_solve(*theta, full=True)
        return sol.z, sol.lam, sol.nu

    g = seeded(6)
    w = [torch.randn(3, k, generator=g, dtype=F64) for k in (6, 9, 2)]
    ours = [x.clone().requires_grad_() for x in P.theta]
    theirs = [x.clone().requires_grad_() for x in P.theta]
    sol = qp_solve(*ours, full=True)
    out = solve(*theirs)
    loss = sum((o * wi).sum() for o, wi in zip((sol.z, sol.lam, sol.nu), w))
    loss_ref = sum((o * wi).sum() for o, wi in zip(out, w))
    for a, c in zip(torch.autograd.grad(loss, ours), torch.autograd.grad(loss_ref, theirs)):
        torch.testing.assert_close(a, c, atol=1e-7, rtol=1e-6)
