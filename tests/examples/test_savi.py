"""examples/savi.py: semi-amortized VI, unrolled vs IFT (custom_root), and its estimators.

Grouped by claim: the IFT gradient is the unrolled one at convergence (and the dense
−H⁻¹ formula); its graph memory does not depend on K; the inference network gets nothing
through λ* (∂λ*/∂λ₀ = 0) but does through a short unrolled refinement; the
importance-sampled log-likelihood matches the linear-Gaussian closed form; the script runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from structift.implicit import CG, ConvergenceError
from tests.seeding import seeded

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from savi.measure import Problem, gradients, graph_bytes  # noqa: E402
from savi.model import (  # noqa: E402
    Encoder,
    GaussianVAE,
    Posterior,
    active_units,
    init_decoder,
    is_log_likelihood,
)
from savi.refine import (  # noqa: E402
    Inner,
    Recorded,
    SolveLog,
    elbo_grad,
    refine_ift,
    refine_unrolled,
    stationarity,
)
from savi.train import Config, Models, loss  # noqa: E402

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
INNER = Inner()
RTOL = 1e-10  # the float64 tolerance of savi.refine.linear_solver


def small_problem(seed: int, d: int = 3, D: int = 6, B: int = 4, S: int = 3) -> Problem:
    """A tiny inner problem in float64: tanh decoder d -> 8 -> D, random digits-like x."""
    g = seeded(seed)
    params = tuple(p.requires_grad_(True) for p in init_decoder([d, 8, D], g, F64))
    x = torch.rand(B, D, generator=g, dtype=F64)
    eps = torch.randn(B, S, d, generator=g, dtype=F64)
    eps_iw = torch.randn(B, 8, d, generator=g, dtype=F64)
    m0 = 0.5 * torch.randn(B, d, generator=g, dtype=F64)
    s0 = -0.5 + 0.2 * torch.randn(B, d, generator=g, dtype=F64)
    lam0 = Posterior(m0.requires_grad_(True), s0.requires_grad_(True))
    return Problem(GaussianVAE(0.1), params, x, eps, eps_iw, lam0)


def hessian(p: Problem, lam: Posterior) -> torch.Tensor:
    """Dense −∇²_λ ELBO per example, ``[B, 2d, 2d]`` (λ flattened as (m, s))."""
    d = lam.mean.shape[-1]
    v = torch.cat([lam.mean, lam.log_std], -1).detach().requires_grad_(True)
    params = tuple(t.detach() for t in p.params)
    g = elbo_grad(p.vae, Posterior(v[:, :d], v[:, d:]), params, p.x, p.eps, True)
    F = -torch.cat([g.mean, g.log_std], -1)
    rows = [torch.autograd.grad(F[:, j].sum(), v, retain_graph=True)[0] for j in range(2 * d)]
    return torch.stack(rows, 1)


def theta_jacobian_norm(p: Problem, lam: Posterior) -> float:
    """Spectral norm of ∂F/∂θ at λ (F = −∇_λ ELBO), from one vector-Jacobian product per row."""
    g = elbo_grad(p.vae, lam.detach(), p.params, p.x, p.eps, True)
    F = -torch.cat([g.mean, g.log_std], -1).flatten()
    rows = [
        torch.cat([t.flatten() for t in torch.autograd.grad(F[i], p.params, retain_graph=True)])
        for i in range(F.numel())
    ]
    return float(torch.linalg.matrix_norm(torch.stack(rows), ord=2))


def dense_ift_gradient(p: Problem, outer: str, lam: Posterior) -> torch.Tensor:
    """dθ of outer(λ*(θ), θ) by the dense IFT: ∂_θ outer + ∂_θ ⟨∇_λ ELBO, H⁻¹ ∇_λ outer⟩."""
    lam = Posterior(*(t.detach().requires_grad_(True) for t in lam))
    value = p.outer(outer, lam)
    *partial, gm, gs = torch.autograd.grad(value, (*p.params, *lam))
    u = torch.linalg.solve(hessian(p, lam), torch.cat([gm, gs], -1))  # shape: (B, 2d)
    d = lam.mean.shape[-1]
    g = elbo_grad(p.vae, lam, p.params, p.x, p.eps, True)
    inner = (g.mean * u[:, :d]).sum() + (g.log_std * u[:, d:]).sum()
    implicit = torch.autograd.grad(inner, p.params)
    return torch.cat([(a + b).flatten() for a, b in zip(partial, implicit)])


class TestIFTGradient:
    @pytest.mark.parametrize("outer", ["elbo", "iw"])
    def test_matches_unrolled_and_dense_at_large_K(self, outer: str) -> None:
        p = small_problem(0)
        K = 400  # heavy ball contracts by ≈ √β ≈ 0.9 per step: 0.9^400 ≈ 1e-18
        lam = refine_unrolled(p.vae, p.params, p.x, p.eps, p.lam0, K, INNER, False)
        res = float(stationarity(p.vae, lam, tuple(t.detach() for t in p.params), p.x, p.eps).max())
        assert res < 1e-12
        ev = torch.linalg.eigvalsh(hessian(p, lam))
        assert (ev[:, 0] > 0).all()  # a strict maximum: CG applies
        kappa = float((ev[:, -1] / ev[:, 0]).max())
        log = SolveLog.empty()
        gu, lu = gradients(p, "unrolled", outer, K, INNER, log)
        gi, li = gradients(p, "ift", outer, K, INNER, log, solver="cg")
        # IFT error: the linear solve (κ·rtol) and the distance to λ* (κ·res/λ_max);
        # unrolled error: rounding over K steps (K·eps·κ). A factor 10 for the constants.
        tol = 10 * kappa * (RTOL + res / float(ev[:, -1].min()) + K * EPS64)
        assert float((gu - gi).norm() / gi.norm()) <= tol
        dense = dense_ift_gradient(p, outer, lam)
        assert float((gi - dense).norm() / dense.norm()) <= tol
        assert log.residual[-1] <= RTOL * log.rhs[-1]  # the reported residual of the solve
        assert torch.count_nonzero(li) == 0  # ∂λ*/∂λ₀ = 0, exactly
        assert float(lu.norm()) <= tol * float(gi.norm())  # unrolled: decayed to ~0

    def test_envelope_elbo_gradient_is_the_partial_derivative(self) -> None:
        # Outer = inner: the cotangent on λ* is ∇_λ ELBO(λ_K) = −F(λ_K) =: −r, so the implicit
        # term (∂F/∂θ)ᵀ H⁻¹ r is bounded by ‖∂F/∂θ‖ ‖r‖ / λ_min(H): zero at an exact optimum.
        p = small_problem(1)
        K = 400
        lam = refine_unrolled(p.vae, p.params, p.x, p.eps, p.lam0, K, INNER, False)
        gi, _ = gradients(p, "ift", "elbo", K, INNER, SolveLog.empty(), solver="cg")
        partial = torch.cat(
            [t.flatten() for t in torch.autograd.grad(p.outer("elbo", lam), p.params)]
        )
        params = tuple(t.detach() for t in p.params)
        r = stationarity(p.vae, lam, params, p.x, p.eps)
        lmin = float(torch.linalg.eigvalsh(hessian(p, lam))[:, 0].min())
        bound = theta_jacobian_norm(p, lam) * float(r.norm()) / lmin
        assert float((gi - partial).norm()) <= 10 * bound + 100 * EPS64 * float(partial.norm())
        # and the term is not identically zero away from the optimum (K = 3): it is the IFT's.
        g3, _ = gradients(p, "ift", "elbo", 3, INNER, SolveLog.empty(), solver="minres")
        lam3 = refine_unrolled(p.vae, p.params, p.x, p.eps, p.lam0, 3, INNER, False)
        p3 = torch.cat([t.flatten() for t in torch.autograd.grad(p.outer("elbo", lam3), p.params)])
        assert float((g3 - p3).norm()) > 1e3 * float((gi - partial).norm())

    def test_nonconvergence_raises(self) -> None:
        p = small_problem(2)
        solver = Recorded(CG(rtol=1e-14, max_iter=1), SolveLog.empty())
        lam = refine_ift(p.vae, p.params, p.x, p.eps, p.lam0, 200, INNER, solver)
        with pytest.raises(ConvergenceError):
            torch.autograd.grad(p.outer("iw", lam), p.params)


class TestInferenceNetworkGradient:
    def test_zero_through_lam_star(self) -> None:
        p = small_problem(3)
        enc = Encoder(p.x.shape[1], p.lam0.mean.shape[1], 5).double()
        lam0 = enc(p.x)
        solver = Recorded(CG(), SolveLog.empty())
        lam = refine_ift(p.vae, p.params, p.x, p.eps, lam0, 300, INNER, solver)
        grads = torch.autograd.grad(p.outer("iw", lam), list(enc.parameters()), allow_unused=True)
        assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)

    def test_nonzero_through_one_unrolled_step(self) -> None:
        # λ₁ = λ₀ + ρ tanh(α ∇ELBO(λ₀)/ρ): ∂λ₁/∂λ₀ = I − α D H(λ₀) with 0 < D <= 1, whose
        # singular values are >= 1 − α λ_max(H(λ₀)); so ‖dλ₀‖ >= (1 − α λ_max) ‖∇_λ₁ outer‖.
        p = small_problem(4)
        lam1 = refine_unrolled(p.vae, p.params, p.x, p.eps, p.lam0, 1, INNER)
        lam1_leaf = Posterior(*(t.detach().requires_grad_(True) for t in lam1))
        v = torch.autograd.grad(p.outer("iw", lam1_leaf), tuple(lam1_leaf))
        _, dlam0 = gradients(p, "unrolled", "iw", 1, INNER, SolveLog.empty())
        lmax = float(torch.linalg.eigvalsh(hessian(p, p.lam0))[:, -1].max())
        assert INNER.lr * lmax < 1
        bound = (1 - INNER.lr * lmax) * float(torch.cat([t.flatten() for t in v]).norm())
        assert float(dlam0.norm()) >= bound * (1 - 1e-12) > 0

    def test_ift_trainer_trains_the_encoder_on_elbo_at_lam0(self) -> None:
        cfg = Config(latent=3, hidden=8, samples=2, ift_steps=30, seed=seeded(5).initial_seed())
        m = Models.build(cfg, 6)
        x = torch.rand(5, 6, generator=seeded(6))
        eps = torch.randn(5, 2, 3, generator=seeded(7))
        enc = list(m.encoder.parameters())
        got = torch.autograd.grad(loss("ift", m, x, eps, cfg, SolveLog.empty()), enc)
        frozen = tuple(t.detach() for t in m.decoder.params)
        want = torch.autograd.grad(-m.vae.elbo(m.encoder(x), frozen, x, eps).mean(), enc)
        eps32 = torch.finfo(torch.float32).eps
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=4 * eps32, atol=4 * eps32 * float(b.abs().max()))


class TestMemory:
    def test_graph_flat_in_K_for_ift_linear_for_unrolled(self) -> None:
        p = small_problem(8)
        Ks = (5, 10, 20)
        ift = [graph_bytes(p, "ift", K, INNER) for K in Ks]
        unrolled = [graph_bytes(p, "unrolled", K, INNER)[0] for K in Ks]
        assert ift[0] == ift[1] == ift[2]  # (held after forward, peak saved in backward)
        per_step = (unrolled[1] - unrolled[0]) / 5
        assert per_step > 0
        assert unrolled[2] - unrolled[1] == pytest.approx(10 * per_step, rel=0.05)
        assert unrolled[2] > sum(ift[2])


class TestEstimators:
    @staticmethod
    def linear_gaussian(seed: int, orthogonal: bool):
        """x ~ N(b, WWᵀ + γI): a one-layer decoder, its marginal and exact posterior."""
        g = seeded(seed)
        d, D, B, gamma = 2, 5, 3, 0.3
        W = torch.randn(D, d, generator=g, dtype=F64)
        if orthogonal:  # WᵀW diagonal: the exact posterior is a diagonal Gaussian
            W = torch.linalg.qr(W).Q * torch.tensor([1.5, 0.7], dtype=F64)
        b = torch.randn(D, generator=g, dtype=F64)
        x = torch.randn(B, D, generator=g, dtype=F64)
        marginal = torch.distributions.MultivariateNormal(
            b, W @ W.T + gamma * torch.eye(D, dtype=F64)
        )
        precision = torch.eye(d, dtype=F64) + W.T @ W / gamma
        cov = torch.linalg.inv(precision)
        mean = (x - b) @ W @ cov / gamma  # shape: (B, d)
        return GaussianVAE(gamma), (W, b), x, marginal.log_prob(x), mean, cov

    def test_is_exact_with_the_exact_posterior(self) -> None:
        vae, params, x, log_px, mean, cov = self.linear_gaussian(9, orthogonal=True)
        lam = Posterior(mean, 0.5 * torch.log(torch.diagonal(cov)).expand_as(mean))
        est, se = is_log_likelihood(vae, lam, params, x, 64, seeded(10))
        # Every weight equals p(x): only rounding in log w (a few terms of size |log p|).
        torch.testing.assert_close(
            est, log_px, rtol=0, atol=100 * EPS64 * float(log_px.abs().max())
        )
        assert float(se.max()) < 1e-10

    def test_is_consistent_with_a_wider_proposal(self) -> None:
        vae, params, x, log_px, mean, cov = self.linear_gaussian(11, orthogonal=False)
        # diag(1.5 Σ_jj) ≻ Σ/2 for d = 2 (Cauchy–Schwarz), so the weights have finite variance.
        log_std = 0.5 * torch.log(1.5 * torch.diagonal(cov)).expand_as(mean)
        est, se = is_log_likelihood(vae, Posterior(mean, log_std), params, x, 20000, seeded(12))
        assert ((est - log_px).abs() <= 6 * se).all()
        elbo = vae.elbo(
            Posterior(mean, log_std),
            params,
            x,
            torch.randn(3, 4000, 2, generator=seeded(13), dtype=F64),
        )
        assert (elbo <= log_px + 6 * se).all()  # the ELBO is a lower bound

    def test_active_units(self) -> None:
        g = seeded(14)
        means = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 0.5, 0.01, 0.0])
        assert active_units(means) == 2  # variances ≈ 1, 0.25, 1e-4, 0 against 0.01


def test_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "savi"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "savi.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"vae", "savi", "ift"}
    for r in summary["results"].values():
        assert math.isfinite(r["is_ll"]) and 0 <= r["au0"] <= 16
    ift = [(r["graph_fwd"], r["graph_bwd"]) for r in summary["cost"] if r["method"] == "ift"]
    assert len(set(ift)) == 1  # flat in K
    assert all(r["lam0_ift"] == 0 for r in summary["agreement"])
    for name in ("savi_cost.png", "savi_agreement.png", "savi_gap.png"):
        assert (out / name).stat().st_size > 1000
    assert "IS log p(x)" in (out / "results.md").read_text()
