"""sparsemax: projection optimality vs brute force, Jacobian vs closed form and IFT, gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.implicit import Dense, custom_root
from structift.layers import Sparsemax, sparsemax

DT = torch.float64


def brute_force_sparsemax(theta: torch.Tensor) -> torch.Tensor:
    """Enumerate every support S; keep the feasible candidate closest to θ. 1-D, float64."""
    n = theta.shape[0]
    best, best_dist = None, float("inf")
    for r in range(1, n + 1):
        for S in itertools.combinations(range(n), r):
            idx = torch.tensor(S)
            if not torch.isfinite(theta[idx]).all():
                continue
            tau = (theta[idx].sum() - 1) / r
            p = torch.zeros(n, dtype=DT)
            p[idx] = theta[idx] - tau
            if (p[idx] < 0).any():
                continue
            fin = torch.isfinite(theta)  # -inf entries add the same +inf to every candidate
            dist = float(((p[fin] - theta[fin]) ** 2).sum())
            if dist < best_dist:
                best, best_dist = p, dist
    assert best is not None
    return best


@st.composite
def scores(draw: st.DrawFn) -> torch.Tensor:
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    vals = draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=B * n, max_size=B * n))
    theta = torch.tensor(vals, dtype=DT).reshape(B, n)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * n, max_size=B * n))).reshape(B, n)
    mask[:, 0] = False  # keep one finite entry per row
    return theta.masked_fill(mask, float("-inf"))


@given(theta=scores())
def test_matches_brute_force_projection(theta: torch.Tensor) -> None:
    p = sparsemax(theta)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(theta.shape[0], dtype=DT))
    assert (p[torch.isneginf(theta)] == 0).all()
    for b in range(theta.shape[0]):
        torch.testing.assert_close(p[b], brute_force_sparsemax(theta[b]), rtol=1e-10, atol=1e-12)


@given(theta=scores(), shift=st.floats(-5, 5))
def test_shift_invariance(theta: torch.Tensor, shift: float) -> None:
    torch.testing.assert_close(sparsemax(theta + shift), sparsemax(theta), rtol=1e-9, atol=1e-9)


def closed_form_jacobian(p: torch.Tensor) -> torch.Tensor:
    s = (p > 0).to(p.dtype)
    return torch.diag(s) - torch.outer(s, s) / s.sum()


def test_jacobian_matches_closed_form_and_ift() -> None:
    theta = torch.randn(7, dtype=DT) * 0.5
    theta[3] = float("-inf")
    p = sparsemax(theta)
    finite = torch.isfinite(theta)
    J = torch.autograd.functional.jacobian(lambda t: sparsemax(t), theta.clone())
    torch.testing.assert_close(J, closed_form_jacobian(p))
    assert 1 < int((p > 0).sum()) < 7  # a genuinely sparse case

    # The same Jacobian from custom_root on the KKT system restricted to the support.
    S = (p > 0).nonzero().squeeze(-1)

    def kkt(z: tuple[torch.Tensor, torch.Tensor], theta_s: torch.Tensor) -> tuple:
        p_s, tau = z
        return (p_s - theta_s + tau, p_s.sum(-1, keepdim=True) - 1)

    def solve(theta_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = sparsemax(theta_s)
        return q, (theta_s[:1] - q[:1])

    theta_s = theta[S].clone().requires_grad_(True)
    ift = custom_root(kkt, Dense())(solve)
    J_s = torch.autograd.functional.jacobian(lambda t: ift(t)[0], theta_s)
    torch.testing.assert_close(J_s, J[S][:, S])
    assert finite.sum() == 6


def test_gradcheck_gradgradcheck_and_dim() -> None:
    theta = torch.randn(2, 5, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: sparsemax(t, dim=1), (theta,))
    assert torch.autograd.gradgradcheck(lambda t: sparsemax(t, dim=1), (theta,))
    by_dim = sparsemax(theta, dim=1)
    moved = sparsemax(theta.transpose(1, 2), dim=-1).transpose(1, 2)
    torch.testing.assert_close(by_dim, moved)
    torch.testing.assert_close(Sparsemax(dim=1)(theta), by_dim)


def test_gradient_zero_on_masked_entries_and_batched_equals_singles() -> None:
    theta = torch.randn(4, 6, dtype=DT)
    theta[1, 2:] = float("-inf")
    theta.requires_grad_(True)
    w = torch.randn(4, 6, dtype=DT)
    (g,) = torch.autograd.grad((w * sparsemax(theta)).sum(), theta)
    assert torch.isfinite(g).all() and (g[1, 2:] == 0).all()
    for b in range(4):
        tb = theta[b].detach().clone().requires_grad_(True)
        (gb,) = torch.autograd.grad((w[b] * sparsemax(tb)).sum(), tb)
        torch.testing.assert_close(g[b], gb)


def test_float32_and_device(device: torch.device) -> None:
    theta = torch.randn(16, 50, device=device)
    p = sparsemax(theta)
    torch.testing.assert_close(p.sum(-1), torch.ones(16, device=device))
    ref = torch.stack([brute_force_sparsemax(t) for t in theta[:2, :8].double().cpu()])
    torch.testing.assert_close(sparsemax(theta[:2, :8]).double().cpu(), ref, rtol=1e-5, atol=1e-6)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="floating"):
        sparsemax(torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        sparsemax(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="finite entry"):
        sparsemax(torch.full((2, 3), float("-inf")))
    with pytest.raises(ValueError, match="scalar"):
        sparsemax(torch.tensor(1.0))
