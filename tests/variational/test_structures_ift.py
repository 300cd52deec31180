"""The variational view on segmentations and trees (issue 12, §3), against a dense vertex KKT.

For a structure with enumerated vertices φ(y) (rows of Φ), the entropy-regularized argmax over
its marginal polytope is, in the weights w of the vertices,

    max_{w ∈ Δ} ⟨Φθ, w⟩ + τ H(w),     μ* = Φᵀ w,

whose KKT system τ (log w + 1) + ν = Φθ, 1ᵀw = 1 is solved here densely: w = softmax(Φθ/τ), and
its Jacobian from the linear system [[τ diag(1/w), 1], [1ᵀ, 0]] [dw; dν] = [Φ dθ; 0]. This check
shares no code with the structures' dynamic programs or with structift.implicit; it is compared
with `regularized_argmax` (whose backward is the IFT on the conjugate KKT form) and with
autograd double backward through A(θ).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import structift as st
from structift.variational import regularized_argmax
from tests.reference import brute_force
from tests.seeding import examples, seeded

DT = torch.float64


def _semi_markov(g, lengths):
    N = int(max(lengths))
    scores = torch.randn(len(lengths), N - 1, 3, 2, 2, dtype=DT, generator=g)
    enum = [brute_force.semi_markov(scores[b], L) for b, L in enumerate(lengths)]
    return scores.requires_grad_(), (lambda s: st.SemiMarkovCRF(s, torch.tensor(lengths))), enum


def _trees(projective, multi_root):
    def make(g, lengths):
        N = int(max(lengths))
        arcs = torch.randn(len(lengths), N + 1, N + 1, dtype=DT, generator=g)
        enum = [
            brute_force.dependency_trees(arcs[b], n, projective, multi_root)
            for b, n in enumerate(lengths)
        ]

        def build(a):
            return st.DependencyCRF(
                a, torch.tensor(lengths), projective=projective, multi_root=multi_root
            )

        return arcs.requires_grad_(), build, enum

    return make


CASES = {
    "semi_markov": _semi_markov,
    "nonprojective": _trees(False, False),
    "nonprojective_multiroot": _trees(False, True),
    "projective": _trees(True, False),
    "projective_multiroot": _trees(True, True),
}


def _vertex_solution(enum, tau, theta_b, v_b):
    """μ* = Φᵀ w and the directional derivative Φᵀ dw along dθ = v, by the dense KKT solve."""
    phi = enum.features[0].flatten(1)  # shape: (M, D)
    c = phi @ theta_b.flatten()
    w = torch.softmax(c / tau, 0)
    M = w.shape[0]
    K = torch.zeros(M + 1, M + 1, dtype=DT)
    K[:M, :M] = torch.diag(tau / w)
    K[:M, M] = 1
    K[M, :M] = 1
    rhs = torch.cat([phi @ v_b.flatten(), torch.zeros(1, dtype=DT)])
    dw = torch.linalg.solve(K, rhs)[:M]
    return (phi.T @ w).reshape(theta_b.shape), (phi.T @ dw).reshape(theta_b.shape)


def _vertex_qp(enum, tau, theta_b):
    """SparseMAP by ``qp_solve`` over the enumerated vertices: ``(φ_kept [M, D], c [M], w [M])``.

    Vertices forbidden by −inf potentials are dropped; w are the simplex weights.
    """
    from structift.layers import qp_solve

    phi = enum.features[0].flatten(1)
    c = phi @ theta_b.flatten()
    keep = torch.isfinite(c)
    phi, c = phi[keep], c[keep]
    M = c.shape[0]
    w = qp_solve(
        tau * phi @ phi.T, -c, -torch.eye(M, dtype=DT), torch.zeros(M, dtype=DT),
        torch.ones(1, M, dtype=DT), torch.ones(1, dtype=DT), ridge=1e-10,
    )  # fmt: skip
    return phi, c, w


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=examples(6), deadline=None)
@given(data=hst.data())
def test_ift_equals_the_dense_vertex_kkt_and_double_backward(name, data) -> None:
    g = seeded(data.draw(hst.integers(0, 2**16)))
    tau = data.draw(hst.sampled_from([0.5, 1.0, 2.0]))
    lengths = data.draw(hst.lists(hst.integers(2, 4), min_size=1, max_size=3))
    theta, build, enum = CASES[name](g, lengths)
    v = torch.randn(theta.shape, dtype=DT, generator=g)
    mu = regularized_argmax(build(theta), tau)
    (jvp_ift,) = torch.autograd.grad(mu, theta, v)  # Jᵀv = Jv: the Jacobian is symmetric
    for b, e in enumerate(enum):
        mu_ref, jvp_ref = _vertex_solution(e, tau, theta[b].detach(), v[b])
        scale = 1 + float(mu_ref.abs().max())
        assert float((mu[b].detach() - mu_ref).abs().max()) <= 1e-10 * scale
        assert float((jvp_ift[b] - jvp_ref).abs().max()) <= 1e-10 * (1 + float(jvp_ref.abs().max()))
    # Autograd double backward through A(θ/τ): μ* = τ ∇θ A(θ/τ), so Jv = ∇θ ⟨τ ∇θ A(θ/τ), v⟩.
    theta2 = theta.detach().requires_grad_()
    (grad_a,) = torch.autograd.grad(
        build(theta2 / tau).log_partition.sum(), theta2, create_graph=True
    )
    (jvp_auto,) = torch.autograd.grad(tau * (grad_a * v).sum(), theta2)
    torch.testing.assert_close(jvp_ift, jvp_auto, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_sparsemap_equals_the_qp_over_enumerated_vertices(name, tau) -> None:
    """SparseMAP (active set, argmax oracle only) = qp_solve over the vertices (float64)."""
    from structift.variational import sparsemap

    g = seeded(17)
    theta, build, enum = CASES[name](g, [4, 3])
    result = sparsemap(build(theta), tau)
    mu = result.marginals
    assert bool(result.status.converged.all())
    for b, e in enumerate(enum):
        phi, _, w = _vertex_qp(e, tau, theta[b].detach())
        ref = (phi.T @ w).reshape(theta[b].shape)
        assert float((mu[b].detach() - ref).abs().max()) < 1e-6
        active = result.active_set.active[b]
        assert int(active.sum()) <= phi.shape[1] + 1  # Carathéodory
    # The IFT backward on the active set agrees with finite differences (a generic point).
    v = torch.randn(theta.shape, dtype=DT, generator=g)
    (grad,) = torch.autograd.grad((mu * v).sum(), theta)
    d = torch.randn(theta.shape, dtype=DT, generator=g)
    eps = 1e-6
    plus = sparsemap(build(theta.detach() + eps * d), tau).marginals
    minus = sparsemap(build(theta.detach() - eps * d), tau).marginals
    fd = float(((plus - minus) * v).sum()) / (2 * eps)
    assert abs(float((grad * d).sum()) - fd) < 1e-5 * (1 + abs(fd))


@pytest.mark.parametrize("name", list(CASES))
def test_sparsemap_loss_is_the_enumerated_fenchel_young_loss(name) -> None:
    """sparsemap_loss = Ω*(θ) − ⟨θ, φ(y)⟩ + Ω(φ(y)) with Ω*(θ) the QP over the vertices, ≥ 0,
    with gradient μ* − φ(y), for a random gold structure of every element."""
    from structift.variational import sparsemap, sparsemap_loss

    g = seeded(23)
    tau = 0.7
    theta, build, enum = CASES[name](g, [4, 3])
    rows = [int(torch.randint(0, e.structures.shape[0], (1,), generator=g)) for e in enum]
    gold = torch.stack([e.structures[r] for e, r in zip(enum, rows, strict=True)])
    dist = build(theta)
    loss = sparsemap_loss(dist, gold, tau, tol=1e-12)
    assert bool((loss >= 0).all())
    for b, e in enumerate(enum):
        phi = e.features[0].flatten(1)
        c = phi @ theta[b].detach().flatten()
        phi_k, c_k, w = _vertex_qp(e, tau, theta[b].detach())
        mu_u = w @ phi_k
        conjugate = w @ c_k - 0.5 * tau * mu_u @ mu_u
        r = rows[b]
        value = conjugate - c[r] + 0.5 * tau * phi[r] @ phi[r]
        assert abs(float(loss[b].detach()) - float(value)) < 1e-6
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    mu = sparsemap(build(theta.detach()), tau, tol=1e-12).marginals
    phi_gold = build(theta.detach()).sufficient_statistics(gold)
    torch.testing.assert_close(grad, mu - phi_gold, atol=1e-8, rtol=0)
