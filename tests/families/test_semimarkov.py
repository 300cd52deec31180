"""SemiMarkovCRF: the generic family tests, brute force, torch-struct, numerics and the IFT."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import kl_divergence
from torch.testing import assert_close

import structift as st_
from structift.variational import check_ift, regularized_argmax
from tests.conftest import DEVICES
from tests.families import test_gradients as generic_gradients
from tests.families import test_properties as generic
from tests.families.cases_semimarkov import SEMI_MARKOV, brute, fixed, semi_markov_params
from tests.reference import brute_force
from tests.seeding import examples, seeded

TOL = {"rtol": 1e-9, "atol": 1e-9}
INF = float("-inf")
devices = pytest.mark.parametrize("device", DEVICES)


def _inner(test):
    """The body of a generic property test (hypothesis' wrapped function)."""
    return test.hypothesis.inner_test


# ---- the generic tests of tests/families, run on this case -----------------------------------

GENERIC_PROPERTIES = [
    "test_log_partition_marginals_entropy_match_brute_force",
    "test_argmax_score_is_max_over_enumeration",
    "test_kl_and_cross_entropy_match_brute_force",
    "test_marginals_equal_autograd_gradient",
    "test_padding_beyond_lengths_changes_nothing",
    "test_batch_equals_stacked_singles",
]


@pytest.mark.parametrize("name", GENERIC_PROPERTIES)
@devices
@settings(max_examples=examples(20))
@given(data=st.data())
def test_generic_property(name: str, device, data) -> None:
    _inner(getattr(generic, name))(case=SEMI_MARKOV, device=device, data=data)


@pytest.mark.parametrize(
    "name",
    ["test_parameter_gradients_match_brute_force", "test_kl_gradient_reaches_both_arguments"],
)
@settings(max_examples=examples(15))
@given(data=st.data())
def test_generic_gradient_property(name: str, data) -> None:
    _inner(getattr(generic, name))(case=SEMI_MARKOV, data=data)


@devices
@settings(max_examples=examples(15))
@given(data=st.data(), c=st.floats(-50.0, 50.0))
def test_generic_shift(device, data, c) -> None:
    _inner(generic.test_shifting_one_position_shifts_log_partition_only)(
        case=SEMI_MARKOV, device=device, data=data, c=c
    )


def test_generic_torch_entropy_through_the_hooks() -> None:
    generic.test_torch_generic_entropy_agrees_through_the_hooks(SEMI_MARKOV)


@pytest.mark.parametrize("quantity", list(generic_gradients.QUANTITIES))
def test_gradcheck_and_gradgradcheck(quantity: str, device) -> None:
    generic_gradients.test_gradcheck_and_gradgradcheck(SEMI_MARKOV, quantity, device)


def test_gradcheck_kl_and_cross_entropy_in_both_arguments(device) -> None:
    generic_gradients.test_gradcheck_kl_and_cross_entropy_in_both_arguments(SEMI_MARKOV, device)


def test_kl_gradient_in_p_is_minus_hessian_times_difference() -> None:
    generic_gradients.test_kl_gradient_in_p_is_minus_hessian_times_difference(SEMI_MARKOV)


# ---- brute force ---------------------------------------------------------------------------


@settings(max_examples=examples(25))
@given(data=st.data())
def test_log_prob_sums_to_one_and_statistics_match(data) -> None:
    """Every segmentation of element b (other elements get their own argmax: valid values)."""
    params = data.draw(semi_markov_params())
    dist = SEMI_MARKOV.build(params)
    best = dist.argmax
    for b, enum in enumerate(brute(params)):
        values = best[None].repeat(enum.structures.shape[0], 1, 1)
        values[:, b] = enum.structures
        log_prob = dist.log_prob(values)[:, b]
        finite = torch.isfinite(enum.log_probs)
        assert_close(log_prob[finite], enum.log_probs[finite], **TOL)
        assert bool((log_prob[~finite] == INF).all())
        assert_close(torch.logsumexp(log_prob, 0), torch.zeros((), dtype=torch.float64), **TOL)
        assert_close(dist.sufficient_statistics(values)[:, b], enum.features[0], **TOL)


@settings(max_examples=examples(25))
@given(data=st.data())
def test_each_gap_is_covered_by_exactly_one_segment(data) -> None:
    """Σ_{s <= t < s+k} μ[s, k] = 1 for every gap t < L-1; zero at ignored entries."""
    params = data.draw(semi_markov_params())
    dist = SEMI_MARKOV.build(params)
    mu = dist.marginals
    B, N1, K = mu.shape[:3]
    for b in range(B):
        L = int(params["lengths"][b])
        for t in range(L - 1):
            cover = sum(mu[b, s, k].sum() for s in range(N1) for k in range(K) if s <= t < s + k)
            assert_close(cover, torch.tensor(1.0, dtype=torch.float64), **TOL)
    from tests.families.cases_semimarkov import _ignored

    assert bool((mu[_ignored(params)] == 0).all())


@settings(max_examples=examples(25))
@given(data=st.data(), k=st.integers(1, 12))
def test_topk_matches_sorted_enumeration(data, k: int) -> None:
    params = data.draw(semi_markov_params())
    dist = SEMI_MARKOV.build(params)
    values, scores = dist.topk(k)
    B, N = params["scores"].shape[0], params["scores"].shape[1] + 1
    assert values.shape == (k, B, N) and scores.shape == (k, B)
    for b, enum in enumerate(brute(params)):
        ref = torch.sort(enum.scores, descending=True).values
        ref = ref[torch.isfinite(ref)][:k]
        n = ref.shape[0]
        assert_close(scores[:n, b], ref, **TOL)
        assert bool((scores[n:, b] == INF).all())
        assert bool((values[n:, b] == -1).all()), "missing ranks are all -1"
        rows = {tuple(v) for v in values[:n, b].tolist()}
        assert len(rows) == n, "k-best structures must be distinct"
        known = {tuple(v) for v in enum.structures.tolist()}
        assert rows <= known
    # scores are the structures' scores (validated: each rank is a real segmentation)
    real = torch.isfinite(scores)
    for r in range(k):
        if bool(real[r].all()):
            assert_close(dist.score(values[r]), scores[r], **TOL)
    assert_close(scores[0], dist.score(dist.argmax), **TOL)


def test_hvp_is_the_covariance_of_the_statistics() -> None:
    """∇²A(θ) v = Cov[φ, ⟨v, φ⟩] against the enumeration (an independent second derivative)."""
    params = fixed()
    dist = SEMI_MARKOV.build(params)
    v = torch.randn(params["scores"].shape, generator=seeded(13), dtype=torch.float64)
    (hv,) = dist.structure.hvp(None, (v,), (params["scores"],))
    for b, enum in enumerate(brute(params)):
        phi, p = enum.features[0], enum.probs
        proj = (phi * v[b]).flatten(1).sum(-1)  # shape: (M,)
        mean = enum.marginals[0]
        cov = torch.einsum("m,m...->...", p * (proj - (p * proj).sum()), phi)
        assert_close(hv[b], cov, **TOL)
        assert_close(mean, dist.marginals[b], **TOL)


def test_argmax_tie_rule() -> None:
    """All scores equal: the lowest last label, then the shortest segments, lowest labels."""
    dist = st_.SemiMarkovCRF(torch.zeros(2, 4, 3, 2, 2), torch.tensor([5, 2]))
    assert dist.argmax.tolist() == [[0, 0, 0, 0, 0], [0, 0, -1, -1, -1]]
    values, _ = dist.topk(3)
    assert values[:, 1].tolist() == [[0, 0, -1, -1, -1], [1, 0, -1, -1, -1], [0, 1, -1, -1, -1]]


def test_fast_posterior_matches_the_autograd_reference(device) -> None:
    """The float64 forward-backward equals the gradient of ``_log_partition_graph``."""
    g = seeded(3)
    scores = torch.randn(3, 9, 4, 3, 3, generator=g, dtype=torch.float64).to(device)
    scores[0, 2, 1] = INF
    dist = st_.SemiMarkovCRF(scores, torch.tensor([10, 6, 1], device=device))
    leaf = scores.clone().requires_grad_()
    log_z = dist.structure._log_partition_graph((leaf,))
    (grad,) = torch.autograd.grad(log_z.sum(), leaf)
    assert_close(dist.log_partition, log_z.detach(), rtol=1e-12, atol=1e-12)
    assert_close(dist.marginals, grad, rtol=1e-12, atol=1e-12)


def test_sample_frequencies_match_enumeration(device) -> None:
    """Per-structure Bernstein bound (tests/families/test_sampling.py): false failure < 1e-7."""
    from tests.families.test_sampling import S, _assert_frequencies

    params = fixed()
    dist = SEMI_MARKOV.build(params, device)
    samples = dist.sample((S,), generator=seeded(0, device=device)).cpu()
    assert samples.shape == (S, 2, 4) and samples.dtype == torch.long
    dist.structure.check_value("samples", samples.to(device), dist.scores.device)
    for b, enum in enumerate(brute(params)):
        codes = _code(samples[:, b], dist.num_labels)
        _assert_frequencies(codes, _code(enum.structures, dist.num_labels), enum.probs)


def _code(x: torch.Tensor, C: int) -> torch.Tensor:
    return ((x + 1) * (C + 1) ** torch.arange(x.shape[-1])).sum(-1)


def test_sampler_catches_a_wrong_distribution() -> None:
    from tests.families.test_sampling import S, _assert_frequencies

    params = fixed()
    wrong = st_.SemiMarkovCRF(params["scores"] * 0.7, params["lengths"])
    samples = wrong.sample((S,), generator=seeded(0))
    enum = brute(params)[0]
    with pytest.raises(AssertionError, match="frequency"):
        _assert_frequencies(_code(samples[:, 0], 2), _code(enum.structures, 2), enum.probs)


def test_sample_honours_the_generator() -> None:
    dist = SEMI_MARKOV.build(fixed())
    a = dist.sample((5, 3), generator=seeded(4))
    b = dist.sample((5, 3), generator=seeded(4))
    assert a.shape == (5, 3, 2, 4) and torch.equal(a, b)
    assert dist.sample((0,)).shape == (0, 2, 4)


def test_length_one_has_num_labels_structures_of_score_zero() -> None:
    dist = st_.SemiMarkovCRF(torch.randn(1, 3, 2, 4, 4), torch.tensor([1]))
    assert_close(dist.log_partition, torch.tensor([math.log(4)]))
    assert_close(dist.entropy(), torch.tensor([math.log(4)]))
    assert bool((dist.marginals == 0).all())
    assert dist.argmax.tolist() == [[0, -1, -1, -1]]


# ---- hypothesis properties beyond the generic ones --------------------------------------------


@settings(max_examples=examples(25))
@given(data=st.data(), scale=st.sampled_from([1.0, 1e2, 1e4]))
def test_entropy_and_kl_are_never_negative(data, scale: float) -> None:
    params = data.draw(semi_markov_params(neg_inf=False))
    other = data.draw(SEMI_MARKOV.like(params, neg_inf=False))
    for dtype in (torch.float32, torch.float64):
        p = st_.SemiMarkovCRF((params["scores"] * scale).to(dtype), params["lengths"])
        q = st_.SemiMarkovCRF((other["scores"] * scale).to(dtype), params["lengths"])
        assert bool((p.entropy() >= 0).all())
        assert bool((kl_divergence(p, q) >= 0).all())
        assert_close(kl_divergence(p, p), torch.zeros_like(p.entropy()), rtol=0, atol=0)


# ---- torch-struct ----------------------------------------------------------------------------


@pytest.mark.reference
def test_matches_torch_struct_per_element() -> None:
    """log Z and marginals against torch-struct 0.5 (potentials transposed to [to, from]).

    torch-struct's SemiMarkov asserts max(lengths) == N, and with batch > 1 and unequal lengths
    it is wrong (issue #110). Observed here, lengths (7, 5, 3): its log Z is right only for the
    shortest element (4.8637) and wrong for the others, the full-length one included (10.2331
    instead of 11.0307, 6.1066 instead of 7.1823; brute force agrees with structift): it builds
    the chart's initial length-k diagonals up to ``min(lengths) - 1`` for every element. So the
    comparison is per element, batch 1, with each element's own N = L (checked against brute
    force too), and the batched discrepancy is asserted so that a fixed torch-struct shows up.
    """
    import torch_struct

    g = seeded(5)
    B, N, K, C = 3, 7, 4, 3
    scores = torch.randn(B, N - 1, K, C, C, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 5, 3])
    ours = st_.SemiMarkovCRF(scores, lengths)
    for b in range(B):
        L = int(lengths[b])
        phi = scores[b : b + 1, : L - 1].transpose(-1, -2).contiguous()
        ref = torch_struct.SemiMarkovCRF(phi)
        assert_close(ours.log_partition[b : b + 1], ref.partition, rtol=1e-10, atol=1e-10)
        mu = ref.marginals.transpose(-1, -2)
        assert_close(ours.marginals[b : b + 1, : L - 1], mu, rtol=1e-10, atol=1e-10)
        assert_close(ours.log_partition[b], brute_force.semi_markov(scores[b], L).log_partition)
    # Without lengths, batch > 1 agrees.
    full = torch_struct.SemiMarkovCRF(scores.transpose(-1, -2).contiguous())
    assert_close(st_.SemiMarkovCRF(scores).log_partition, full.partition, rtol=1e-10, atol=1e-10)
    # With lengths and batch > 1 (torch-struct #110): right for the shortest element only.
    batched = torch_struct.SemiMarkovCRF(scores.transpose(-1, -2).contiguous(), lengths=lengths)
    assert_close(batched.partition[2], ours.log_partition[2], rtol=1e-10, atol=1e-10)
    wrong = (batched.partition[:2] - ours.log_partition[:2]).abs() > 1e-3
    assert bool(wrong.all()), "torch-struct #110 seems fixed: compare the batch directly"


@pytest.mark.reference
def test_argmax_matches_torch_struct() -> None:
    import torch_struct

    g = seeded(6)
    scores = torch.randn(4, 8, 4, 3, 3, generator=g, dtype=torch.float64)
    ours = st_.SemiMarkovCRF(scores)
    ref = torch_struct.SemiMarkovCRF(scores.transpose(-1, -2).contiguous())
    assert_close(ours.max_score, ref.max, rtol=1e-10, atol=1e-10)
    mine = ours.sufficient_statistics(ours.argmax)
    assert_close(mine, ref.argmax.transpose(-1, -2).to(mine.dtype))


# ---- float32 at scale ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_float32_at_scale_matches_float64(scale: float) -> None:
    g = seeded(8)
    B, N, K, C = 4, 64, 8, 8
    s32 = (torch.randn(B, N - 1, K, C, C, generator=g) * scale).float()
    lengths = torch.tensor([64, 50, 17, 2])
    p32, p64 = st_.SemiMarkovCRF(s32, lengths), st_.SemiMarkovCRF(s32.double(), lengths)
    q32 = st_.SemiMarkovCRF(s32.roll(1, 0) * 0.5, lengths)
    q64 = st_.SemiMarkovCRF(s32.roll(1, 0).double() * 0.5, lengths)
    m32, m64 = p32.marginals, p64.marginals
    assert m32.dtype == torch.float32
    assert bool(((m32 >= 0) & (m32 <= 1)).all())
    assert (m32.double() - m64).abs().max() <= 1e-5
    # each gap t < L-1 is covered by exactly one segment
    mu = m32.double().sum((-1, -2))  # shape: (B, N-1, K)
    cover = torch.zeros(B, N - 1, dtype=torch.float64)
    for k in range(1, K):
        for j in range(k):  # the segment from s covers gaps s..s+k-1
            cover[:, j:] += mu[:, : N - 1 - j, k]
    gaps = torch.arange(N - 1)[None] < (lengths - 1)[:, None]
    assert (cover[gaps] - 1).abs().max() <= 1e-5
    for x32, x64 in (
        (p32.entropy(), p64.entropy()),
        (kl_divergence(p32, q32), kl_divergence(p64, q64)),
    ):
        assert bool((x32 >= 0).all())
        assert ((x32.double() - x64).abs() <= 1e-4 * (1 + x64.abs())).all(), (x32, x64)
    assert_close(p32.log_partition.double(), p64.log_partition, rtol=1e-6, atol=0)


# ---- the variational view ------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_regularized_argmax_and_its_ift_gradient(tau: float) -> None:
    params = fixed()
    scores = params["scores"].clone().requires_grad_()
    dist = st_.SemiMarkovCRF(scores, params["lengths"])
    mu = regularized_argmax(dist, tau)
    assert_close(mu.detach(), st_.SemiMarkovCRF(scores.detach() / tau, params["lengths"]).marginals)
    # the IFT gradient against autograd's double backward through A(θ/τ)
    cot = torch.randn(mu.shape, generator=seeded(9), dtype=torch.float64)
    (ift,) = torch.autograd.grad((mu * cot).sum(), scores)
    leaf = scores.detach().clone().requires_grad_()
    log_z = dist.structure._log_partition_graph((leaf / tau,))
    (ref_mu,) = torch.autograd.grad(tau * log_z.sum(), leaf, create_graph=True)
    (ref,) = torch.autograd.grad((ref_mu * cot).sum(), leaf)
    finite = torch.isfinite(scores.detach())
    err = (ift - ref)[finite].abs().max() / ref[finite].abs().max()
    assert err <= 1e-10
    check = check_ift(
        st_.SemiMarkovCRF(params["scores"], params["lengths"]), tau, generator=seeded(10)
    )
    assert check.max_rel_error <= 1e-10 and check.forward_error <= 1e-12


# ---- validation ----------------------------------------------------------------------------


def _ok(**kw):
    return {"scores": torch.zeros(2, 4, 3, 2, 2), **kw}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (_ok(scores=torch.zeros(2, 4, 3, 2, 2, dtype=torch.long)), TypeError, "floating-point"),
        (_ok(scores=torch.zeros(2, 4, 3, 2)), ValueError, r"\[B, N-1, K, C, C\]"),
        (_ok(scores=torch.zeros(2, 4, 3, 2, 3)), ValueError, r"\[B, N-1, K, C, C\]"),
        (_ok(scores=torch.zeros(2, 4, 1, 2, 2)), ValueError, "K >= 2"),
        (
            _ok(
                scores=torch.zeros(2, 4, 3, 2, 2).index_put_(
                    (torch.tensor(0),) * 5, torch.tensor(float("nan"))
                )
            ),
            ValueError,
            "scores must be real or -inf",
        ),
        (
            _ok(scores=torch.full((2, 4, 3, 2, 2), float("inf"))),
            ValueError,
            "scores must be real or -inf",
        ),
        (_ok(lengths=torch.tensor([5, 6])), ValueError, r"lengths must lie in \[1, T\] = \[1, 5\]"),
        (_ok(lengths=torch.tensor([5.0, 2.0])), TypeError, "lengths must have an integer dtype"),
        (_ok(lengths=torch.tensor([5])), ValueError, r"lengths must have shape \[B\]"),
    ],
)
def test_bad_construction_raises(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        st_.SemiMarkovCRF(**kwargs)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 9, 9]]).float(), TypeError, "integer dtype"),
        (torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]]), ValueError, r"trailing shape \(2, 5\)"),
        (
            torch.tensor([[0, 0, 2, 0, 0], [0, 0, 0, 9, 9]]),
            ValueError,
            r"value\[\(0, 2\)\] = 2: labels",
        ),
        (
            torch.tensor([[-1, 0, 0, 0, 0], [0, 0, 0, 9, 9]]),
            ValueError,
            "position 0 holds the initial",
        ),
        (torch.tensor([[0, 0, 0, 0, -1], [0, 0, 0, 9, 9]]), ValueError, "last position L - 1 = 4"),
        (
            torch.tensor([[0, -1, -1, 0, 0], [0, 0, 0, 9, 9]]),
            ValueError,
            "3 steps; segments have at most K - 1 = 2",
        ),
        (torch.tensor([[0, 0, 0, 0, 0], [0, 0, -1, 9, 9]]), ValueError, "last position L - 1 = 2"),
    ],
)
def test_bad_values_raise(value, error, message) -> None:
    dist = st_.SemiMarkovCRF(torch.zeros(2, 4, 3, 2, 2), torch.tensor([5, 3]))
    with pytest.raises(error, match=message):
        dist.log_prob(value)


def test_padding_values_are_ignored_and_inputs_not_mutated() -> None:
    scores = torch.randn(2, 4, 3, 2, 2, generator=seeded(12))
    before = scores.clone()
    dist = st_.SemiMarkovCRF(scores, torch.tensor([5, 3]))
    a = dist.log_prob(torch.tensor([[0, 1, 0, 1, 0], [1, -1, 0, -1, -1]]))
    b = dist.log_prob(torch.tensor([[0, 1, 0, 1, 0], [1, -1, 0, 7, -5]]))
    assert_close(a, b)
    _ = dist.entropy(), dist.marginals, dist.argmax, dist.sample((3,)), dist.topk(2)
    assert torch.equal(scores, before)


def test_incompatible_kl_raises() -> None:
    p = st_.SemiMarkovCRF(torch.zeros(2, 4, 3, 2, 2), torch.tensor([5, 3]))
    q = st_.SemiMarkovCRF(torch.zeros(2, 4, 3, 2, 2), torch.tensor([5, 4]))
    with pytest.raises(ValueError, match="not defined on the same structures"):
        kl_divergence(p, q)


def test_infeasible_element_raises_and_gives_minus_inf_unvalidated() -> None:
    scores = torch.zeros(1, 2, 2, 1, 1)
    scores[0, 1, 1] = INF  # the only segmentation of 3 positions uses (1, 1)
    with pytest.raises(ValueError, match="no structure has finite score"):
        _ = st_.SemiMarkovCRF(scores).log_partition
    dist = st_.SemiMarkovCRF(scores, validate_args=False)
    assert dist.log_partition.tolist() == [INF]
    assert not bool(dist.marginals.isnan().any())


def test_api_shapes_constraints_expand_and_empty_batch() -> None:
    dist = st_.SemiMarkovCRF(torch.zeros(1, 4, 3, 2, 2))
    assert dist.batch_shape == (1,) and dist.event_shape == (5,)
    assert dist.support.check(dist.argmax).all()
    assert set(dist.arg_constraints) == {"scores", "lengths"}
    wide = dist.expand((3,))
    assert wide.batch_shape == (3,) and wide.log_partition.shape == (3,)
    assert "semi-Markov" in dist.structure.describe()
    empty = st_.SemiMarkovCRF(torch.zeros(0, 4, 3, 2, 2))
    assert empty.log_partition.shape == (0,) and empty.marginals.shape == (0, 4, 3, 2, 2)
    assert empty.entropy().shape == (0,) and empty.argmax.shape == (0, 5)
    assert empty.sample((2,)).shape == (2, 0, 5)
