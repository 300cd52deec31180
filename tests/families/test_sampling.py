"""Sampling frequencies against exact probabilities from enumeration.

Each test draws S samples with a seeded generator and compares the empirical frequency of every
structure (not only the marginals) with its exact probability using Bernstein's inequality:
|p̂ − p| <= sqrt(2 p (1 − p) ln(2/δ) / S) + 2 ln(2/δ) / (3 S) holds with probability >= 1 − δ
per structure. With δ = 1e-7 / K for K structures (union bound over structures and batch
elements), a correct sampler fails a test with probability below 1e-7 for a random seed; the
seed is fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.families.cases import CASES, Case
from tests.reference import brute_force
from tests.seeding import seeded

cases = pytest.mark.parametrize("case", CASES, ids=repr)

FALSE_FAILURE_RATE = 1e-7
S = 20_000


def _assert_frequencies(codes: torch.Tensor, support: torch.Tensor, probs: torch.Tensor) -> None:
    """Check the counts of ``codes`` (``[S]``) at each ``support`` code against ``probs``."""
    assert bool(torch.isin(codes, support).all()), "sampled a structure outside the support"
    n = codes.shape[0]
    counts = (codes[:, None] == support[None, :]).sum(0).double()
    freq = counts / n
    log_term = math.log(2 * support.shape[0] / FALSE_FAILURE_RATE)
    bound = torch.sqrt(2 * probs * (1 - probs) * log_term / n) + 2 * log_term / (3 * n)
    worst = int(torch.argmax((freq - probs).abs() - bound))
    assert bool(((freq - probs).abs() <= bound).all()), (
        f"structure {worst}: frequency {float(freq[worst]):.5f} vs probability "
        f"{float(probs[worst]):.5f} (bound {float(bound[worst]):.5f})"
    )


def _encode(x: torch.Tensor, base: int) -> torch.Tensor:
    """One integer per structure: x[..., t] in base ``base`` (event dims last)."""
    if x.dim() == 0 or x.shape[-1:] == ():
        return x
    weights = base ** torch.arange(x.shape[-1], device=x.device)
    return (x * weights).sum(-1)


@cases
def test_sample_frequencies_match_enumeration(case: Case, device) -> None:
    params = case.fixed()
    dist = case.build(params, device)
    generator = seeded(0, device=device)
    samples = dist.sample((S,), generator=generator).cpu()
    assert samples.shape == (S, *dist.batch_shape, *dist.event_shape)
    assert samples.dtype == torch.long
    base = dist._natural_params[0].shape[-1]
    for b, enum in enumerate(case.brute(params)):
        column = samples[:, b]
        if case.is_chain:
            length = int(params["lengths"][b])
            assert bool((column[:, length:] == 0).all()), "padding positions must hold 0"
            codes, support = _encode(column, base), _encode(enum.structures, base)
        elif column.dim() > 1:  # structures with -1 entries (trees, segmentations)
            high = int(max(column.max(), enum.structures.max())) + 2
            codes, support = _encode(column + 1, high), _encode(enum.structures + 1, high)
        else:
            codes, support = column, enum.structures
        _assert_frequencies(codes, support, enum.probs)


def test_hmm_sample_joint_frequencies_match_enumeration(device) -> None:
    from tests.families.cases import HMM

    params = HMM.fixed()
    hmm = HMM.build(params, device)
    generator = seeded(0, device=device)
    x, z = hmm.sample_joint((S,), generator=generator)
    assert x.shape == z.shape == (S, *params["observations"].shape)
    x, z = x.cpu(), z.cpu()
    Z, V = params["emission_logits"].shape
    T = params["observations"].shape[1]
    for b in range(params["observations"].shape[0]):
        length = int(params["lengths"][b])
        assert bool((x[:, b, length:] == 0).all()) and bool((z[:, b, length:] == 0).all())
        xs, zs, probs = brute_force.hmm_joint(
            params["init_logits"],
            params["transition_logits"],
            params["emission_logits"],
            T,
            length,
        )
        codes = _encode(z[:, b], Z) * V**T + _encode(x[:, b], V)
        support = _encode(zs, Z) * V**T + _encode(xs, V)
        _assert_frequencies(codes, support, probs)


def test_sampler_catches_a_wrong_distribution() -> None:
    """The frequency check has power: samples from a different CRF fail it."""
    from tests.families.cases import CRF

    params = CRF.fixed()
    other = {**params, "unary": params["unary"] * 0.7}
    samples = CRF.build(other).sample((S,), generator=seeded(0))
    enum = CRF.brute(params)[0]
    with pytest.raises(AssertionError, match="frequency"):
        Z = params["unary"].shape[-1]
        _assert_frequencies(_encode(samples[:, 0], Z), _encode(enum.structures, Z), enum.probs)
