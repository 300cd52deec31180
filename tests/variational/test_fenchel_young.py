"""The SparseMAP Fenchel–Young loss (issue 13, §5): value, gradient μ* − φ(y), special cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import structift as sf
from structift.layers import qp_solve, sparsemax
from structift.variational import sparsemap, sparsemap_loss
from tests.reference import brute_force
from tests.seeding import examples, seeded

DT = torch.float64


def _crf(B: int, T: int, Z: int, seed: int, scale: float = 1.0):
    g = seeded(seed)
    unary = (scale * torch.randn(B, T, Z, generator=g, dtype=DT)).requires_grad_()
    binary = (scale * torch.randn(Z, Z, generator=g, dtype=DT)).requires_grad_()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    tags = torch.randint(0, Z, (B, T), generator=g)
    return unary, binary, lengths, tags


def _build(unary, binary, lengths):
    B, T, Z = unary.shape
    return sf.LinearChainCRF(unary, binary.expand(B, T - 1, Z, Z), lengths)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_categorical_is_the_sparsemax_loss(tau: float) -> None:
    g = seeded(0)
    logits = torch.randn(6, 5, dtype=DT, generator=g).requires_grad_()
    y = torch.randint(0, 5, (6,), generator=g)
    loss = sparsemap_loss(sf.Categorical(logits), y, tau)
    # Closed form (Martins & Astudillo 2016, eq. 18, at temperature τ): with p = sparsemax(θ/τ),
    # L = ⟨θ, p⟩ − (τ/2)‖p‖² − θ_y + τ/2.
    p = sparsemax(logits / tau, dim=-1)
    ref = (
        (logits * p).sum(-1)
        - 0.5 * tau * p.square().sum(-1)
        - logits.gather(-1, y[:, None])[:, 0]
        + 0.5 * tau
    )
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    torch.testing.assert_close(grad, p.detach() - torch.nn.functional.one_hot(y, 5).to(DT))


@settings(max_examples=examples(12), deadline=None)
@given(data=hst.data())
def test_chain_gradient_is_mu_star_minus_phi_and_the_loss_is_non_negative(data) -> None:
    seed = data.draw(hst.integers(0, 2**16))
    tau = data.draw(hst.sampled_from([0.5, 1.0, 2.0]))
    unary, binary, lengths, tags = _crf(3, 5, 3, seed, scale=data.draw(hst.sampled_from([1, 4])))
    crf = _build(unary, binary, lengths)
    loss = sparsemap_loss(crf, tags, tau)
    assert (loss >= 0).all()
    gu, gb = torch.autograd.grad(loss.sum(), (unary, binary))
    mu = sparsemap(crf, tau).marginals
    phi = crf.sufficient_statistics(tags)
    torch.testing.assert_close(gu, (mu.unary - phi.unary).detach(), atol=1e-8, rtol=0)
    torch.testing.assert_close(gb, (mu.binary - phi.binary).sum((0, 1)).detach(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_chain_value_is_the_enumerated_qp_value(tau: float) -> None:
    unary, binary, lengths, tags = _crf(2, 3, 2, seed=7)
    crf = _build(unary, binary, lengths)
    loss = sparsemap_loss(crf, tags, tau, tol=1e-12).detach()
    for b in range(2):
        L = int(lengths[b])
        e = brute_force.chain(unary[b].detach(), binary.detach().expand(2, 2, 2), L)
        phi_u = e.features[0].flatten(1)
        N = e.scores.shape[0]
        alpha = qp_solve(
            tau * phi_u @ phi_u.T, -e.scores, -torch.eye(N, dtype=DT), torch.zeros(N, dtype=DT),
            torch.ones(1, N, dtype=DT), torch.ones(1, dtype=DT), ridge=1e-10,
        )  # fmt: skip
        mu_u = alpha @ phi_u
        conjugate = alpha @ e.scores - 0.5 * tau * mu_u @ mu_u  # Ω*(θ), the QP's optimal value
        g = tags[b].clone()
        g[L:] = 0
        row = (e.structures == g).all(-1).nonzero()[0, 0]
        gold = e.scores[row] - 0.5 * tau * phi_u[row] @ phi_u[row]
        assert abs(float(loss[b]) - float(conjugate - gold)) < 1e-7


def test_loss_vanishes_exactly_when_the_gold_structure_wins_by_a_margin() -> None:
    g = seeded(3)
    tags = torch.randint(0, 4, (2, 6), generator=g)
    unary = 10.0 * torch.nn.functional.one_hot(tags, 4).to(DT)
    crf = sf.LinearChainCRF(unary, torch.zeros(2, 5, 4, 4, dtype=DT))
    assert torch.equal(sparsemap_loss(crf, tags), torch.zeros(2, dtype=DT))
    # margin 0.5 < τ = 1: sparsemax of each position keeps a second tag
    weak = sf.LinearChainCRF(0.05 * unary, torch.zeros(2, 5, 4, 4, dtype=DT))
    assert (sparsemap_loss(weak, tags) > 0).all()


def test_gradcheck_at_a_generic_point() -> None:
    unary, binary, lengths, tags = _crf(2, 4, 3, seed=11)

    def f(u, b):
        return sparsemap_loss(_build(u, b, lengths), tags, 1.0, tol=1e-12)

    assert torch.autograd.gradcheck(f, (unary, binary), atol=1e-6)


def test_bad_gold_structures_are_clear_errors() -> None:
    unary, binary, lengths, tags = _crf(2, 4, 3, seed=5)
    crf = _build(unary, binary, lengths)
    with pytest.raises(ValueError, match="tags must lie in"):
        sparsemap_loss(crf, torch.full((2, 4), 7))
    forbidden = unary.detach().clone()
    forbidden[0, 0, tags[0, 0]] = float("-inf")
    with pytest.raises(ValueError, match="gold structure at batch index"):
        sparsemap_loss(_build(forbidden, binary.detach(), lengths), tags)
