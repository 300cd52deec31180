"""regularized_argmax: IFT gradients against autograd through A(θ), for every family."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structift as sf
from structift.implicit import CG, MINRES, ConvergenceError, Dense, Identity, Neumann
from structift.variational import (
    Iterative,
    NormalEquations,
    Structured,
    check_ift,
    kkt_residual,
    regularized_argmax,
)
from tests.seeding import examples, seeded, shift
from tests.variational.cases import CASE_IDS, CASES, Case, temperatures

LINEAR_SOLVERS = {
    "structured": "structured",
    "dense": Dense(),
    "minres": MINRES(rtol=1e-13, max_iter=20_000),
}


def _assert_close(result, rtol: float) -> None:
    # Relative to the reference's size; when the reference vanishes (a distribution with one
    # structure has zero covariance) relative to the O(1) size of the standard-normal cotangents.
    assert result.max_abs_error <= rtol * max(result.reference_scale, 1.0), result


def _gen() -> torch.Generator:
    return seeded(0)


# ---- IFT == autograd through A(θ), float64 --------------------------------------------------


@pytest.mark.parametrize("linear", list(LINEAR_SOLVERS), ids=list(LINEAR_SOLVERS))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=examples(12))
@given(data=st.data(), tau=temperatures)
def test_ift_matches_autograd_float64(case: Case, linear: str, data, tau: float) -> None:
    dist = case.build(data.draw(case.params))
    result = check_ift(
        dist, tau, linear_solver=LINEAR_SOLVERS[linear], num_cotangents=2, generator=_gen()
    )
    _assert_close(result, 1e-10)
    assert result.forward_residual <= 1e-9


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=examples(10))
@given(data=st.data(), tau=temperatures)
def test_iterative_forward_gives_the_same_gradient(case: Case, data, tau: float) -> None:
    dist = case.build(data.draw(case.params))
    result = check_ift(dist, tau, solver=Iterative(tol=1e-14), num_cotangents=2, generator=_gen())
    _assert_close(result, 1e-9)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=examples(10))
@given(data=st.data(), tau=temperatures)
def test_ift_matches_autograd_float32(case: Case, data, tau: float) -> None:
    dist = case.build(data.draw(case.params), torch.float32)
    result = check_ift(dist, tau, num_cotangents=2, generator=_gen())
    _assert_close(result, 1e-4)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@settings(max_examples=examples(10))
@given(data=st.data())
def test_unit_temperature_returns_the_marginals(case: Case, data) -> None:
    dist = case.build(data.draw(case.params))
    mu = regularized_argmax(dist)
    ref = dist.marginals
    for a, b in zip(
        [mu] if isinstance(mu, torch.Tensor) else mu,
        [ref] if isinstance(ref, torch.Tensor) else ref,
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert float(kkt_residual(dist, mu).norm.max()) <= 1e-9


# ---- structural properties of the gradient ---------------------------------------------------


def _crf_vjp(unary, binary, lengths, g_unary, g_binary, tau=1.0, **kw):
    u = unary.clone().requires_grad_(True)
    w = binary.clone().requires_grad_(True)
    mu = regularized_argmax(sf.LinearChainCRF(u, w, lengths), tau, **kw)
    loss = (mu.unary * g_unary).sum() + (mu.binary * g_binary).sum()
    return mu, torch.autograd.grad(loss, (u, w))


def test_padding_values_do_not_matter() -> None:
    B, T, Z = 2, 5, 3
    unary = torch.randn(B, T, Z, dtype=torch.float64)
    binary = torch.randn(B, T - 1, Z, Z, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    g_u, g_b = torch.randn_like(unary), torch.randn_like(binary)
    mu1, (gu1, gb1) = _crf_vjp(unary, binary, lengths, g_u, g_b, 0.5)
    unary2, binary2 = unary.clone(), binary.clone()
    unary2[1, 3:] = torch.randn(2, Z, dtype=torch.float64) * 10
    binary2[1, 2:] = float("-inf")
    mu2, (gu2, gb2) = _crf_vjp(unary2, binary2, lengths, g_u, g_b, 0.5)
    for a, b in zip((*mu1, gu1, gb1), (*mu2, gu2, gb2)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert float(gu1[1, 3:].abs().max()) == 0.0 and float(gb1[1, 2:].abs().max()) == 0.0


def test_batch_equals_stacked_singles() -> None:
    B, T, Z = 3, 4, 3
    unary = torch.randn(B, T, Z, dtype=torch.float64)
    binary = torch.randn(B, T - 1, Z, Z, dtype=torch.float64)
    lengths = torch.tensor([4, 2, 1])
    g_u, g_b = torch.randn_like(unary), torch.randn_like(binary)
    _, (gu, gb) = _crf_vjp(unary, binary, lengths, g_u, g_b, 2.0)
    for b in range(B):
        s = slice(b, b + 1)
        _, (gu_b, gb_b) = _crf_vjp(unary[s], binary[s], lengths[s], g_u[s], g_b[s], 2.0)
        torch.testing.assert_close(gu[s], gu_b, rtol=0, atol=1e-13)
        torch.testing.assert_close(gb[s], gb_b, rtol=0, atol=1e-13)


def test_shift_invariance_of_the_gradient() -> None:
    # μ* is unchanged by adding a constant to every state at one position, so the gradient
    # with respect to the unary potentials sums to zero over states at each position.
    B, T, Z = 2, 4, 3
    unary = torch.randn(B, T, Z, dtype=torch.float64)
    binary = torch.randn(B, T - 1, Z, Z, dtype=torch.float64)
    lengths = torch.tensor([4, 3])
    g_u, g_b = torch.randn_like(unary), torch.randn_like(binary)
    mu, (gu, _) = _crf_vjp(unary, binary, lengths, g_u, g_b, 0.7)
    shifted, _ = _crf_vjp(
        unary + torch.randn(B, T, 1, dtype=torch.float64), binary, lengths, g_u, g_b, 0.7
    )
    torch.testing.assert_close(mu.unary, shifted.unary, rtol=0, atol=1e-13)
    torch.testing.assert_close(
        gu.sum(-1), torch.zeros(B, T, dtype=torch.float64), rtol=0, atol=1e-13
    )


def test_gradcheck_chain_and_categorical() -> None:
    torch.manual_seed(shift(1))
    unary = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    binary = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    binary[0, 0, 1, 0] = float("-inf")
    binary.requires_grad_(True)
    lengths = torch.tensor([3, 2])

    def chain_fn(u, w):
        return tuple(regularized_argmax(sf.LinearChainCRF(u, w, lengths), 0.8))

    assert torch.autograd.gradcheck(chain_fn, (unary, binary))

    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: regularized_argmax(sf.Categorical(x), 1.5, linear_solver="dense"), (logits,)
    )


def test_gradgradcheck_with_a_dense_solve() -> None:
    unary = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    binary = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(u, w):
        return tuple(regularized_argmax(sf.LinearChainCRF(u, w), 1.0, linear_solver="dense"))

    assert torch.autograd.gradgradcheck(fn, (unary, binary))


# ---- forward accuracy and the gradient -------------------------------------------------------


def test_gradient_error_shrinks_with_the_forward_tolerance() -> None:
    torch.manual_seed(shift(0))
    B, T, Z = 2, 12, 4
    crf = sf.LinearChainCRF(
        torch.randn(B, T, Z, dtype=torch.float64) * 2,
        torch.randn(B, T - 1, Z, Z, dtype=torch.float64) * 2,
        torch.tensor([12, 9]),
    )
    errors = []
    for tol in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10):
        gen = seeded(0)
        res = check_ift(
            crf,
            1.0,
            solver=Iterative(tol=tol, damping=0.5),
            linear_solver=Structured(check=False),
            generator=gen,
        )
        errors.append(res.max_rel_error)
    # A loose forward gives a loose gradient; tightening it by 1e8 shrinks the error by >= 1e5.
    assert errors[-1] < 1e-9 < errors[0]
    assert errors[-1] <= 1e-5 * errors[0]
    assert all(b <= 3 * a for a, b in itertools.pairwise(errors))


def test_structured_solve_refuses_an_inexact_forward() -> None:
    crf = sf.LinearChainCRF(
        torch.randn(1, 8, 3, dtype=torch.float64), torch.randn(1, 7, 3, 3, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="tighten"):
        _crf_vjp(
            crf.unary,
            crf.binary,
            crf.lengths,
            torch.ones(1, 8, 3),
            torch.ones(1, 7, 3, 3),
            solver=Iterative(max_iter=3),
        )


def test_jacobian_free_approximation_is_detected() -> None:
    # The cross-check must be able to fail: Identity (∂F/∂z ≈ I) is not the IFT.
    crf = sf.LinearChainCRF(
        torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    )
    assert check_ift(crf, 1.0, linear_solver=Identity()).max_rel_error > 1e-2


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(tau: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        regularized_argmax(sf.Categorical(torch.zeros(3)), tau)


def test_bad_solver_names_and_types() -> None:
    cat = sf.Categorical(torch.zeros(3))
    with pytest.raises(ValueError, match="solver"):
        regularized_argmax(cat, solver="newton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="linear_solver"):
        regularized_argmax(cat, linear_solver="cholesky")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dist"):
        regularized_argmax(torch.distributions.Normal(0.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping"):
        regularized_argmax(cat, solver=Iterative(damping=0.0))


def test_neumann_diverges_on_the_kkt_system_and_cg_on_normal_equations_converges() -> None:
    crf = sf.LinearChainCRF(
        torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    )
    with pytest.raises(ConvergenceError, match="diverges"):
        check_ift(crf, 1.0, linear_solver=Neumann(max_iter=50, alpha=0.5))
    cg = NormalEquations(CG(rtol=1e-13, max_iter=5000))
    _assert_close(check_ift(crf, 1.0, linear_solver=cg, generator=_gen()), 1e-10)


def test_categorical_is_the_length_one_chain_of_the_simplex_module() -> None:
    # The Categorical goes through the chain KKT system with T = 1; its Jacobian must be the
    # simplex module's Schur-complement Jacobian (the seed's §4 worked example).
    from structift.variational import simplex

    logits = torch.randn(3, 5, dtype=torch.float64)
    logits[0, 2] = float("-inf")
    x = logits.clone().requires_grad_(True)
    p = regularized_argmax(sf.Categorical(x), 0.7)
    rows = [torch.autograd.grad(p[:, i].sum(), x, retain_graph=True)[0] for i in range(5)]
    jac = torch.stack(rows, 1)  # shape: (3, 5, 5), [b, i, j] = dp_i / dθ_j
    torch.testing.assert_close(jac, simplex.schur_jacobian(p.detach(), 0.7), rtol=0, atol=1e-14)
