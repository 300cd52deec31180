"""Forward solvers that do not use forward-backward: message passing and mirror descent."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings

import structift as sf
from structift.variational import Iterative, chain_message_passing, kkt_residual
from structift.variational.simplex import mirror_descent, simplex_mirror_descent
from tests.seeding import examples, seeded
from tests.strategies import categorical_params, chain_params
from tests.variational.cases import temperatures


@settings(max_examples=examples(20))
@given(p=chain_params(), tau=temperatures)
def test_message_passing_reaches_the_exact_marginals(p, tau: float) -> None:
    crf = sf.LinearChainCRF(p["unary"], p["binary"], p["lengths"])
    exact = sf.LinearChainCRF(crf.unary / tau, crf.binary / tau, crf.lengths).marginals
    res = chain_message_passing(crf.unary, crf.binary, crf.lengths, tau, tol=1e-14)
    torch.testing.assert_close(res.mu_unary, exact.unary, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.mu_binary, exact.binary, rtol=0, atol=1e-10)
    norm = kkt_residual(crf, (res.mu_unary, res.mu_binary), tau).norm
    assert float(norm.max()) <= 1e-8


def test_undamped_flooding_is_exact_after_length_minus_one_sweeps() -> None:
    T = 6
    crf = sf.LinearChainCRF(
        torch.randn(2, T, 3, dtype=torch.float64), torch.randn(2, T - 1, 3, 3, dtype=torch.float64)
    )
    res = chain_message_passing(
        crf.unary, crf.binary, crf.lengths, damping=1.0, max_iter=T - 1, tol=0.0
    )
    torch.testing.assert_close(res.mu_binary, crf.marginals.binary, rtol=0, atol=1e-13)
    early = chain_message_passing(
        crf.unary, crf.binary, crf.lengths, damping=1.0, max_iter=T - 3, tol=0.0
    )
    assert float((early.mu_binary - crf.marginals.binary).abs().max()) > 1e-6


def test_damped_error_decays_at_the_linearized_rate() -> None:
    """Damped flooding m <- (1-ρ) m + ρ F(m) near its fixed point.

    F's Jacobian N is nilpotent (undamped flooding on a chain is exact after T - 1 sweeps), so
    the error after k sweeps is O(||((1-ρ) I + ρ N)^k||) = O(P[Binomial(k, ρ) < T - 1]): the
    ratio of errors between sweep counts follows the ratio of those tails (a factor 10 covers
    the constants and the nonlinearity).
    """
    T, rho = 8, 0.5
    crf = sf.LinearChainCRF(
        torch.randn(1, T, 3, dtype=torch.float64), torch.randn(1, T - 1, 3, 3, dtype=torch.float64)
    )

    def tail(k: int) -> float:
        return sum(math.comb(k, j) * rho**j * (1 - rho) ** (k - j) for j in range(T - 1))

    errs = []
    for k in (10, 20, 40):
        res = chain_message_passing(
            crf.unary, crf.binary, crf.lengths, damping=rho, max_iter=k, tol=0.0
        )
        errs.append(float((res.mu_binary - crf.marginals.binary).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[1] <= 10 * errs[0] * tail(20) / tail(10)
    assert errs[2] <= 10 * errs[1] * tail(40) / tail(20)


@settings(max_examples=examples(20))
@given(p=categorical_params(), tau=temperatures)
def test_mirror_descent_reaches_softmax(p, tau: float) -> None:
    mu = mirror_descent(p["logits"], tau, max_iter=10_000, tol=1e-14)
    torch.testing.assert_close(mu, torch.softmax(p["logits"] / tau, -1), rtol=0, atol=1e-12)


def test_the_old_simplex_solver_is_the_one_simplex_solver_with_a_warning() -> None:
    logits = torch.randn(2, 4, dtype=torch.float64, generator=seeded(3))
    with pytest.warns(DeprecationWarning, match="simplex_mirror_descent is deprecated"):
        old = simplex_mirror_descent(logits, 0.5, tol=1e-14)
    torch.testing.assert_close(old.mu, mirror_descent(logits, 0.5, max_iter=10_000, tol=1e-14))
    with pytest.warns(DeprecationWarning, match="'steps' is deprecated, use 'max_iter'"):
        mirror_descent(logits, 0.5, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mirror_descent(logits, 0.5, max_iter=3)


def test_bad_damping() -> None:
    with pytest.raises(ValueError, match="damping"):
        mirror_descent(torch.zeros(1, 3), damping=2.5)
    with pytest.raises(ValueError, match="damping"):
        Iterative(damping=1.5)
    with pytest.raises(ValueError, match="damping"):
        chain_message_passing(
            torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([2]), damping=0.0
        )
