"""sparsemax: projection optimality vs brute force, Jacobian vs closed form and IFT, gradcheck.

Also every floating dtype at magnitudes up to finfo.max / 4 against a float64 bisection
reference (issue 10, section 4: the support size must be >= 1 for every finite input).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structift.implicit import Dense, custom_root
from structift.layers import Sparsemax, sparsemax
from tests.seeding import examples, seeded

DT = torch.float64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def test_empty_batch() -> None:
    theta = torch.zeros(0, 4, dtype=DT, requires_grad=True)
    p = sparsemax(theta)
    assert p.shape == (0, 4)
    (g,) = torch.autograd.grad(p.sum(), theta)
    assert g.shape == (0, 4)


# ------------------------------------------------------------------------------------------
# large magnitudes, every dtype


def bisection_sparsemax(theta: torch.Tensor) -> torch.Tensor:
    """float64 reference on the (already rounded) 1-D input: bisection for τ, then closed form.

    Independent of the sort: τ is the root of f(τ) = Σ max(z − τ, 0) − 1 on [−1, 0] for
    z = θ − max θ (f(−1) >= 0 > f(0) = −1), refined by the exact sum over its support.
    """
    x = theta.double()
    z = x - x.max()
    lo, hi = -1.0, 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(torch.clamp(z - mid, min=0).sum()) > 1:
            lo = mid
        else:
            hi = mid
    S = z > lo
    tau = (math.fsum(z[S].tolist()) - 1) / int(S.sum())
    return torch.clamp(z - tau, min=0)


def working_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the precision sparsemax computes in (float32 for the half types)."""
    return torch.finfo(torch.float32 if torch.finfo(dtype).bits < 32 else dtype).eps


@pytest.mark.parametrize(
    ("dtype", "big"),
    [
        (torch.float32, 2e7),  # the reproducers of issue 10, section 4
        (torch.bfloat16, 256.0),
        (torch.float16, 4096.0),
        (torch.float64, 1e17),
    ],
    ids=["float32-2e7", "bfloat16-256", "float16-4096", "float64-1e17"],
)
def test_large_magnitude_reproducers(dtype: torch.dtype, big: float) -> None:
    theta = torch.tensor([big, 0.0], dtype=dtype, requires_grad=True)
    p = sparsemax(theta)
    torch.testing.assert_close(p, torch.tensor([1.0, 0.0], dtype=dtype), rtol=0, atol=0)
    (g,) = torch.autograd.grad(p[0], theta)
    assert (g == 0).all()  # a support of one: p is locally constant
    top = torch.finfo(dtype).max / 4
    for vals, expected in (
        ([top, -top], [1.0, 0.0]),
        ([-top, top, float("-inf")], [0.0, 1.0, 0.0]),
        ([top, top], [0.5, 0.5]),
        ([-top, -top, -top, -top], [0.25] * 4),
    ):
        out = sparsemax(torch.tensor(vals, dtype=dtype))
        torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), rtol=0, atol=0)


@st.composite
def any_magnitude(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """(θ [n], seed): entries near a common base (a real sparse support), spread over the
    whole magnitude, at ±finfo.max/4, or -inf, rounded to a random dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    top = torch.finfo(dtype).max / 4
    scale = min(2.0 ** draw(st.integers(-3, int(math.log2(top)))), top)
    base = draw(st.floats(-1, 1)) * scale
    n = draw(st.integers(1, 6))
    vals = []
    for _ in range(n):
        kind = draw(st.sampled_from(["near", "near", "far", "extreme", "-inf"]))
        if kind == "near":
            vals.append(base + draw(st.floats(-2, 2)))
        elif kind == "far":
            vals.append(draw(st.floats(-1, 1)) * scale)
        elif kind == "extreme":
            vals.append(draw(st.sampled_from([-top, top])))
        else:
            vals.append(float("-inf"))
    if all(v == float("-inf") for v in vals):
        vals[0] = base
    x = torch.tensor(vals, dtype=torch.float64).clamp(max=top)  # -inf stays
    x = torch.where(torch.isneginf(x), x, x.clamp(min=-top))
    return x.to(dtype), draw(st.integers(0, 2**16))


@settings(max_examples=examples(200))
@given(case=any_magnitude())
def test_every_dtype_at_any_magnitude(case: tuple[torch.Tensor, int]) -> None:
    """p >= 0, Σ p = 1 and p = the float64 projection of the rounded input, to the dtype's
    accuracy; gradients finite and 0 at -inf entries. The error bound: z = θ − max θ is exact
    on the support (|z| < 1, Sterbenz), τ sums at most n terms of size <= 1 in the working
    precision, and the half types round the result once (at most eps / 2 on values <= 1)."""
    theta, seed = case
    dtype, n = theta.dtype, theta.shape[0]
    atol = (n + 2) * working_eps(dtype) + torch.finfo(dtype).eps
    theta = theta.clone().requires_grad_(True)
    p = sparsemax(theta)
    assert p.dtype == dtype and (p >= 0).all()
    assert (p[torch.isneginf(theta)] == 0).all()
    assert abs(float(p.detach().double().sum()) - 1) <= n * atol
    ref = bisection_sparsemax(theta.detach())
    torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=atol)
    v = torch.randn(n, generator=seeded(seed), dtype=torch.float64).to(dtype)
    (g,) = torch.autograd.grad((p * v).sum(), theta)
    assert g.dtype == dtype and torch.isfinite(g).all()
    assert (g[torch.isneginf(theta)] == 0).all()


def test_nonfinite_cotangent_off_the_support_does_not_leak() -> None:
    """Off the support p is locally constant: its cotangent is selected away, not multiplied
    by 0 (which would turn a NaN or inf there into NaN everywhere)."""
    theta = torch.tensor([3.0, 0.0, float("-inf"), 2.5], dtype=DT, requires_grad=True)
    p = sparsemax(theta)
    assert (p > 0).tolist() == [True, False, False, True]
    v = torch.tensor([1.0, float("nan"), float("inf"), -1.0], dtype=DT)
    (g,) = torch.autograd.grad(p, theta, v)
    torch.testing.assert_close(g, torch.tensor([1.0, 0.0, 0.0, -1.0], dtype=DT))
