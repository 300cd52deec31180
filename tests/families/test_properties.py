"""Generic property tests over every family (the case registry), checked against brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributions import kl_divergence
from torch.testing import assert_close

from tests.conftest import DEVICES
from tests.families.cases import CASES, CHAIN_CASES, Case

TOL = {"rtol": 1e-9, "atol": 1e-9}

cases = pytest.mark.parametrize("case", CASES, ids=repr)
chain_cases = pytest.mark.parametrize("case", CHAIN_CASES, ids=repr)
devices = pytest.mark.parametrize("device", DEVICES)


def _cpu(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu()


def _grad(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Autograd gradient, zeros for inputs the output does not depend on (e.g. T = 1)."""
    grads = torch.autograd.grad(output, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _support_values(enum, dist, b: int) -> torch.Tensor:
    """Broadcast element b's structures over the batch: ``[N, *batch, *event]``."""
    shape = (enum.structures.shape[0], *dist.batch_shape, *dist.event_shape)
    index = (slice(None), *([None] * len(dist.batch_shape)))
    return enum.structures[index].expand(shape).to(dist._natural_params[0].device)


@cases
@devices
@given(data=st.data())
def test_log_partition_marginals_entropy_match_brute_force(case: Case, device, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params, device)
    A, mu, H = dist.log_partition, dist._mean_params, dist.entropy()
    for b, enum in enumerate(case.brute(params)):
        assert_close(_cpu(A[b]), enum.log_partition, **TOL)
        for mine, ref in zip(mu, enum.marginals):
            assert_close(_cpu(mine[b]), ref, **TOL)
        assert_close(_cpu(H[b]), enum.entropy, **TOL)
        assert float(H[b]) >= -1e-9, "entropy must be non-negative"


@cases
@devices
@given(data=st.data())
def test_log_prob_and_statistics_match_enumeration(case: Case, device, data) -> None:
    params = data.draw(case.params())
    for b, enum in enumerate(case.brute(params)):
        dist = case.build(case.select(params, b), device)  # element b alone: its structures
        values = _support_values(enum, dist, 0)
        log_prob = _cpu(dist.log_prob(values))[:, 0]
        assert_close(log_prob, enum.log_probs, **TOL)
        assert_close(torch.logsumexp(log_prob, 0), torch.zeros((), dtype=torch.float64), **TOL)
        stats = dist.sufficient_statistics(values)
        stats = (stats,) if isinstance(stats, torch.Tensor) else tuple(stats)
        for mine, ref in zip(stats, enum.features):
            assert_close(_cpu(mine)[:, 0], ref, **TOL)


@cases
@devices
@given(data=st.data())
def test_argmax_score_is_max_over_enumeration(case: Case, device, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params, device)
    best = dist.argmax
    assert best.shape == dist.batch_shape + dist.event_shape
    score = _cpu(dist.score(best))
    for b, enum in enumerate(case.brute(params)):
        assert_close(score[b], enum.max_score, **TOL)


@cases
@devices
@given(data=st.data())
def test_kl_and_cross_entropy_match_brute_force(case: Case, device, data) -> None:
    params_p = data.draw(case.params())
    params_q = data.draw(case.like(params_p))
    p, q = case.build(params_p, device), case.build(params_q, device)
    kl, kl_pp = kl_divergence(p, q), kl_divergence(p, p)
    cross = p.cross_entropy(q)
    for b, (ep, eq) in enumerate(zip(case.brute(params_p), case.brute(params_q))):
        assert_close(_cpu(kl[b]), ep.kl(eq), **TOL)
        assert float(kl[b]) >= -1e-9, "KL must be non-negative"
        keep = ep.probs > 0
        ref_cross = -(ep.probs[keep] * eq.log_probs[keep]).sum()
        assert_close(_cpu(cross[b]), ref_cross, **TOL)
    assert_close(_cpu(kl_pp), torch.zeros_like(_cpu(kl_pp)), rtol=0, atol=1e-12)


@cases
@devices
@given(data=st.data())
def test_marginals_sum_to_one(case: Case, device, data) -> None:
    dist = case.build(data.draw(case.params()), device)
    if case.mass is None:
        mu = dist.marginals
        assert_close(mu.sum(-1), torch.ones_like(mu.sum(-1)), **TOL)
        return
    for got, expected in case.mass(dist):
        assert_close(got, expected, **TOL)


@cases
@devices
@given(data=st.data())
def test_marginals_equal_autograd_gradient(case: Case, device, data) -> None:
    params = data.draw(case.params())
    params = {
        k: v.requires_grad_() if v.is_floating_point() else v
        for k, v in ((k, v.clone().to(device)) for k, v in params.items())
    }
    dist = case.make(params)
    theta = dist._natural_params
    grads = torch.autograd.grad(dist._log_normalizer(*theta).sum(), theta, allow_unused=True)
    for g, m in zip(grads, dist._mean_params):
        assert_close(torch.zeros_like(m) if g is None else g, m, **TOL)


@cases
@given(data=st.data())
def test_parameter_gradients_match_brute_force(case: Case, data) -> None:
    """d A / d (user parameters), finite potentials, against autograd through enumeration."""
    params = data.draw(case.params(neg_inf=False))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items() if v.is_floating_point()}
    full = {**params, **leaves}
    mine = _grad(case.make(full).log_partition.sum(), list(leaves.values()))
    ref_total = sum(e.log_partition for e in case.brute(full))
    ref = _grad(ref_total, list(leaves.values()))
    for a, r in zip(mine, ref):
        assert_close(a, r, **TOL)


@cases
@given(data=st.data())
def test_kl_gradient_reaches_both_arguments(case: Case, data) -> None:
    """d KL(p‖q) / d θ_p and / d θ_q against autograd through the enumerated KL.

    Torch's generic exponential-family KL detaches p; this must not.
    """
    params_p = data.draw(case.params(neg_inf=False))
    params_q = data.draw(case.like(params_p, neg_inf=False))
    leaves_p = {k: v.clone().requires_grad_() for k, v in params_p.items() if v.is_floating_point()}
    leaves_q = {k: v.clone().requires_grad_() for k, v in params_q.items() if v.is_floating_point()}
    full_p, full_q = {**params_p, **leaves_p}, {**params_q, **leaves_q}
    inputs = [*leaves_p.values(), *leaves_q.values()]
    kl = kl_divergence(case.make(full_p), case.make(full_q)).sum()
    mine = _grad(kl, inputs)
    ref_kl = sum(ep.kl(eq) for ep, eq in zip(case.brute(full_p), case.brute(full_q)))
    ref = _grad(ref_kl, inputs)
    for a, r in zip(mine, ref):
        assert_close(a, r, **TOL)


@chain_cases
@devices
@given(data=st.data())
def test_padding_beyond_lengths_changes_nothing(case: Case, device, data) -> None:
    assert case.pad is not None
    params = data.draw(case.params())
    padded = case.pad(params, data)
    d1, d2 = case.build(params, device), case.build(padded, device)
    assert_close(d1.log_partition, d2.log_partition, **TOL)
    for a, b in zip(d1._mean_params, d2._mean_params):
        assert_close(a, b, **TOL)
    assert_close(d1.entropy(), d2.entropy(), **TOL)
    assert_close(d1.score(d1.argmax), d2.score(d2.argmax), **TOL)


@cases
@devices
@given(data=st.data())
def test_batch_equals_stacked_singles(case: Case, device, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params, device)
    B = dist.batch_shape[0]
    singles = [case.build(case.select(params, b), device) for b in range(B)]
    assert_close(dist.log_partition, torch.cat([s.log_partition for s in singles]), **TOL)
    assert_close(dist.entropy(), torch.cat([s.entropy() for s in singles]), **TOL)
    for i, mu in enumerate(dist._mean_params):
        assert_close(mu, torch.cat([s._mean_params[i] for s in singles]), **TOL)
    stacked = torch.cat([s.score(s.argmax) for s in singles])
    assert_close(dist.score(dist.argmax), stacked, **TOL)


@cases
@devices
@given(data=st.data(), c=st.floats(-50.0, 50.0))
def test_shifting_one_position_shifts_log_partition_only(case: Case, device, data, c) -> None:
    params = data.draw(case.params())
    b = data.draw(st.integers(0, case.build(params).batch_shape[0] - 1))
    shifted, delta = case.shift(params, b, c)
    d1, d2 = case.build(params, device), case.build(shifted, device)
    assert_close(d2.log_partition, d1.log_partition + delta.to(device), rtol=1e-9, atol=1e-8)
    for m1, m2 in zip(d1._mean_params, d2._mean_params):
        assert_close(m1, m2, rtol=1e-7, atol=1e-8)


@cases
def test_torch_generic_entropy_agrees_through_the_hooks(case: Case) -> None:
    """torch's ExponentialFamily.entropy (via our _natural_params/_log_normalizer) agrees."""
    params = {
        k: v.nan_to_num(neginf=-2.0) if v.is_floating_point() else v
        for k, v in case.fixed().items()
    }
    dist = case.make(params)
    generic = torch.distributions.ExponentialFamily.entropy(dist)
    assert_close(generic.detach(), dist.entropy().detach(), **TOL)
