"""The chain KKT system: residual, duals, covariance recursions and the structured solve."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structift.implicit import JacobianOperator
from structift.structures.chain import Chain
from structift.structures.chain.kkt import chain_kkt_matvec, chain_support
from structift.variational import (
    ChainKKTPoint,
    StructuredChainSolve,
    chain_covariance_vector_product,
    chain_duals,
    chain_kkt_residual,
)
from tests.reference import brute_force
from tests.seeding import examples, seeded
from tests.strategies import chain_params
from tests.variational.cases import temperatures


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _expand(p):
    unary = p["unary"]
    B, T, Z = unary.shape
    return unary, p["binary"].expand(B, T - 1, Z, Z).clone(), p["lengths"]


def _exact(unary, binary, lengths, tau):
    """Marginals at θ/τ and the enumerations, by brute force."""
    ms, Ms, enums = [], [], []
    for b in range(unary.shape[0]):
        e = brute_force.chain(unary[b] / tau, binary[b] / tau, int(lengths[b]))
        m, M = e.marginals
        ms.append(m)
        Ms.append(M)
        enums.append(e)
    return torch.stack(ms), torch.stack(Ms), enums


@settings(max_examples=examples(20))
@given(p=chain_params(), tau=temperatures)
def test_covariance_product_matches_enumeration(p, tau: float) -> None:
    unary, binary, lengths = _expand(p)
    m, M, enums = _exact(unary, binary, lengths, tau)
    gen = seeded(0)
    v_u = torch.randn(unary.shape, dtype=torch.float64, generator=gen)
    v_b = torch.randn(binary.shape, dtype=torch.float64, generator=gen)
    cu, cb = chain_covariance_vector_product(m, M, lengths, v_u, v_b)
    for b, e in enumerate(enums):
        # Cov[φ, ⟨v, φ⟩] = Σ_x p(x) φ(x) (⟨v, φ(x)⟩ − ⟨v, μ⟩), straight from the definition.
        fu, fb = e.features
        score = (fu * v_u[b]).sum((1, 2)) + (fb * v_b[b]).sum((1, 2, 3))
        centered = e.probs * (score - (e.probs * score).sum())
        torch.testing.assert_close(
            cu[b], torch.einsum("n,n...->...", centered, fu), atol=1e-12, rtol=1e-10
        )
        torch.testing.assert_close(
            cb[b], torch.einsum("n,n...->...", centered, fb), atol=1e-12, rtol=1e-10
        )


@settings(max_examples=examples(20))
@given(p=chain_params(), tau=temperatures)
def test_residual_vanishes_at_the_solution_only(p, tau: float) -> None:
    unary, binary, lengths = _expand(p)
    m, M, _ = _exact(unary, binary, lengths, tau)
    z = chain_duals(m, M, unary, binary, lengths, tau)
    F = chain_kkt_residual(z, unary, binary, lengths, tau)
    for f in F:
        assert _amax(f) <= 1e-10
    # Moving mass between two supported states of one node breaks stationarity or feasibility.
    S = chain_support(m, M, lengths)
    b, t = 0, int(lengths[0]) - 1
    states = S.node[b, t].nonzero().flatten()
    if len(states) >= 2:
        m2 = m.clone()
        delta = 0.1 * torch.minimum(m[b, t, states[0]], m[b, t, states[1]])
        m2[b, t, states[0]] += delta
        m2[b, t, states[1]] -= delta
        z2 = chain_duals(m2, M, unary, binary, lengths, tau)
        F2 = chain_kkt_residual(z2, unary, binary, lengths, tau, support=S)
        assert max(_amax(f) for f in F2) >= 0.5 * float(delta)


def _flat_residual(z, unary, binary, lengths, tau, S):
    sizes = [x[0].numel() for x in z]
    shapes = [x.shape[1:] for x in z]

    def F(flat):
        parts = torch.split(flat, sizes, dim=-1)
        point = ChainKKTPoint(*(q.reshape(flat.shape[0], *s) for q, s in zip(parts, shapes)))
        out = chain_kkt_residual(point, unary, binary, lengths, tau, support=S)
        return torch.cat([o.reshape(flat.shape[0], -1) for o in out], -1)

    return F, torch.cat([x.reshape(x.shape[0], -1) for x in z], -1)


def _materialize(z, lengths, tau, S):
    sizes = [x[0].numel() for x in z]
    shapes = [x.shape[1:] for x in z]
    B, N = z.mu_unary.shape[0], sum(sizes)
    cols = []
    for j in range(N):
        e = torch.zeros(B, N, dtype=torch.float64)
        e[:, j] = 1.0
        parts = torch.split(e, sizes, dim=-1)
        d = ChainKKTPoint(*(q.reshape(B, *s) for q, s in zip(parts, shapes)))
        out = chain_kkt_matvec(z, d, lengths, tau, S)
        cols.append(torch.cat([o.reshape(B, -1) for o in out], -1))
    return torch.stack(cols, -1)


@settings(max_examples=examples(15))
@given(p=chain_params(), tau=temperatures, seed=st.integers(0, 2**16))
def test_kkt_matrix_is_symmetric_nonsingular_and_solved_exactly(p, tau: float, seed: int) -> None:
    unary, binary, lengths = _expand(p)
    m, M, _ = _exact(unary, binary, lengths, tau)
    z = chain_duals(m, M, unary, binary, lengths, tau)
    S = chain_support(m, M, lengths)
    F, flat = _flat_residual(z, unary, binary, lengths, tau, S)
    op = JacobianOperator(F, flat).T  # K is symmetric; .T multiplies by reverse mode
    K = _materialize(z, lengths, tau, S)  # shape: (B, N, N)
    torch.testing.assert_close(K, K.mT, rtol=0, atol=0)
    # The explicit product agrees with autograd through the residual.
    probe = torch.randn(flat.shape, dtype=torch.float64, generator=seeded(seed))
    torch.testing.assert_close(op.mv(probe), (K @ probe[..., None])[..., 0], rtol=1e-12, atol=1e-12)
    # Raw K has entries τ/μ (condition number up to 1e200 when potentials are peaked); the
    # symmetric diagonal scaling used for generic solvers makes it well conditioned.
    system = Chain.build(unary, lengths).regularized(tau).at((m, M), (unary, binary))
    d = torch.cat([x.reshape(x.shape[0], -1) for x in system.scales()], -1)
    K_scaled = d[:, :, None] * K * d[:, None, :]
    sv = torch.linalg.svdvals(K_scaled)
    assert bool((sv.amax(-1) / sv.amin(-1) < 1e3).all()), sv
    # Structured solve vs dense solve (of the scaled system) for a zero-dual right-hand side.
    gen = seeded(seed)
    n_mu = m[0].numel() + M[0].numel()
    rhs = torch.zeros_like(flat)
    rhs[:, :n_mu] = torch.randn(flat.shape[0], n_mu, dtype=torch.float64, generator=gen)
    x = system.structured_solver(check=True, rtol=None).solve(op, rhs).solution
    ref = d * torch.linalg.solve(K_scaled, d * rhs)
    torch.testing.assert_close(x, ref, atol=1e-9, rtol=1e-9)


def test_structured_solve_rejects_a_dual_right_hand_side() -> None:
    unary = torch.randn(1, 3, 2, dtype=torch.float64)
    binary = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    lengths = torch.tensor([3])
    m, M, _ = _exact(unary, binary, lengths, 1.0)
    z = chain_duals(m, M, unary, binary, lengths)
    S = chain_support(m, M, lengths)
    F, flat = _flat_residual(z, unary, binary, lengths, 1.0, S)
    rhs = torch.zeros_like(flat)
    rhs[:, -1] = 1.0  # the normalization row
    with pytest.raises(ValueError, match="dual block"):
        solver = StructuredChainSolve(z, Chain.build(unary, lengths), 1.0, S)
        solver.solve(JacobianOperator(F, flat).T, rhs)
