"""Projective dependency trees (``ProjectiveTrees``, Eisner) against brute-force enumeration.

The structure is built directly (θ = ``(arc_scores,)``, ``[B, N+1, N+1]`` laid out ``[h, m]``)
and, where ``structift.DependencyCRF`` supports ``projective=True``, through the family.
Scores are continuous random draws, so ties have probability 0 and argmax / top-k orders are
unique.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from structift.structures.tree.projective import ProjectiveTrees
from tests.reference import brute_force
from tests.seeding import examples, seeded

NEG_INF = float("-inf")
roots = pytest.mark.parametrize("multi_root", [False, True], ids=["single", "multi"])


def _instance(seed: int, lengths: list[int], N: int, scale: float = 1.0, masked: bool = False):
    """Arc scores ``[B, N+1, N+1]`` (float64) and the structure; ``masked``: some ``-inf``."""
    g = seeded(seed)
    B = len(lengths)
    theta = scale * torch.randn(B, N + 1, N + 1, generator=g, dtype=torch.float64)
    if masked:  # forbid ~1/4 of the arcs but keep the chain ROOT -> 1 -> 2 -> ... finite
        hard = torch.rand(B, N + 1, N + 1, generator=g) < 0.25
        chain = torch.zeros(N + 1, N + 1, dtype=torch.bool)
        chain[torch.arange(N), torch.arange(1, N + 1)] = True
        theta = torch.where(hard & ~chain, NEG_INF, theta)
    return theta, torch.tensor(lengths)


def _enumerations(theta: torch.Tensor, lengths: torch.Tensor, multi_root: bool):
    return [
        brute_force.dependency_trees(theta[b], int(n), projective=True, multi_root=multi_root)
        for b, n in enumerate(lengths.tolist())
    ]


# ---- log-partition, marginals, entropy, KL ---------------------------------------------------


@roots
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_log_partition_and_marginals_match_enumeration(multi_root: bool, masked: bool) -> None:
    theta, lengths = _instance(1, [5, 3, 1, 4], 5, masked=masked)
    s = ProjectiveTrees(lengths, 5, multi_root)
    enums = _enumerations(theta, lengths, multi_root)
    want_z = torch.stack([e.log_partition for e in enums])
    want_mu = torch.stack([e.marginals[0] for e in enums])
    torch.testing.assert_close(s.log_partition((theta,)), want_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s._log_partition_graph((theta,)), want_z, rtol=1e-12, atol=1e-12)
    log_z, (mu,) = s.posterior((theta,))
    torch.testing.assert_close(log_z, want_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mu, want_mu, rtol=1e-12, atol=1e-12)
    x = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(s.log_partition((x,)).sum(), x)
    torch.testing.assert_close(grad, want_mu, rtol=1e-12, atol=1e-12)
    _, (mu_graph,) = s.posterior((x,), create_graph=True)
    torch.testing.assert_close(mu_graph, want_mu, rtol=1e-12, atol=1e-12)


@roots
def test_entropy_and_kl_match_enumeration(multi_root: bool) -> None:
    theta_p, lengths = _instance(2, [5, 2, 4], 5)
    theta_q, _ = _instance(3, [5, 2, 4], 5)
    s = ProjectiveTrees(lengths, 5, multi_root)
    ep, eq = (
        _enumerations(theta_p, lengths, multi_root),
        _enumerations(theta_q, lengths, multi_root),
    )
    _, mu_p = s.posterior((theta_p,))
    entropy = s.entropy((theta_p,), mu_p)
    kl = s.kl((theta_p,), (theta_q,), mu_p)
    torch.testing.assert_close(
        entropy, torch.stack([e.entropy for e in ep]), rtol=1e-10, atol=1e-12
    )
    want_kl = torch.stack([p.kl(q) for p, q in zip(ep, eq)])
    torch.testing.assert_close(kl, want_kl, rtol=1e-10, atol=1e-12)
    assert bool((s.kl((theta_p,), (theta_p,), mu_p).abs() < 1e-12).all())


@roots
def test_log_prob_of_every_tree_sums_to_one(multi_root: bool) -> None:
    theta, lengths = _instance(4, [4, 5, 2], 5)
    s = ProjectiveTrees(lengths, 5, multi_root)
    log_z = s.log_partition((theta,))
    for b, n in enumerate(lengths.tolist()):
        trees = brute_force.heads(n, 5, projective=True, multi_root=multi_root)  # shape: (K, N+1)
        value = torch.full((trees.shape[0], 3, 6), -1)
        value[:, b] = trees
        for other in range(3):  # any valid tree elsewhere: the first enumerated one
            if other != b:
                value[:, other] = brute_force.heads(int(lengths[other]), 5, True, multi_root)[0]
        for row in value:
            s.check_value("heads", row, theta.device)
        log_prob = s.score((theta,), value)[:, b] - log_z[b]
        torch.testing.assert_close(torch.logsumexp(log_prob, 0), torch.zeros((), dtype=theta.dtype))


@roots
def test_infeasible_elements_are_minus_inf_without_nan(multi_root: bool) -> None:
    theta, lengths = _instance(18, [3, 3], 3)
    theta[1, :, 2] = NEG_INF  # word 2 of element 1 has no head: no tree
    s = ProjectiveTrees(lengths, 3, multi_root)
    log_z, (mu,) = s.posterior((theta,))
    assert bool(torch.isfinite(log_z[0])) and float(log_z[1]) == NEG_INF
    assert bool((mu[1] == 0).all()) and not bool(torch.isnan(mu).any())
    x = theta.clone().requires_grad_()
    for fn in (s.log_partition, s._log_partition_graph):
        (grad,) = torch.autograd.grad(fn((x,)).sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.sum(), x)
        assert not bool(torch.isnan(grad).any()) and not bool(torch.isnan(second).any())
        assert bool((grad[1] == 0).all())
    heads, score = s.argmax((theta,))
    assert float(score[1]) == NEG_INF and bool((heads[1] == -1).all())


# ---- argmax and top-k ------------------------------------------------------------------------


@roots
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_argmax_and_topk_match_sorted_enumeration(multi_root: bool, masked: bool) -> None:
    theta, lengths = _instance(5, [4, 2, 1, 3], 4, masked=masked)
    s = ProjectiveTrees(lengths, 4, multi_root)
    enums = _enumerations(theta, lengths, multi_root)
    heads, score = s.argmax((theta,))
    k = max(int(torch.isfinite(e.scores).sum()) for e in enums) + 2  # past the last tree
    values, scores = s.topk((theta,), k)
    assert values.shape == (k, 4, 5) and scores.shape == (k, 4)
    for b, e in enumerate(enums):
        order = torch.sort(e.scores, descending=True, stable=True)
        count = int(torch.isfinite(order.values).sum())
        assert torch.equal(heads[b], e.structures[order.indices[0]])
        torch.testing.assert_close(score[b], order.values[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(values[:count, b], e.structures[order.indices[:count]])
        torch.testing.assert_close(scores[:count, b], order.values[:count], rtol=1e-12, atol=1e-12)
        assert bool((scores[count:, b] == NEG_INF).all()), "missing ranks score -inf"
        assert bool((values[count:, b] == -1).all()), "missing ranks hold -1"
    assert torch.equal(values[0], heads)
    # scores are differentiable in θ: their gradient is the statistics of the trees
    x = theta.clone().requires_grad_()
    _, top = s.topk((x,), 2)
    (grad,) = torch.autograd.grad(top[0].sum(), x)
    torch.testing.assert_close(grad, s.statistics(values[0], x.dtype)[0])


@roots
def test_larger_trees_agree_with_autograd_and_are_valid(multi_root: bool) -> None:
    """n up to 12: outside pass = autograd through the graph; decoded and sampled are trees."""
    theta, lengths = _instance(19, [12, 9, 12, 5], 12, masked=True)
    s = ProjectiveTrees(lengths, 12, multi_root)
    _, (mu,) = s.posterior((theta,))
    x = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(s._log_partition_graph((x,)).sum(), x)
    torch.testing.assert_close(mu, grad, rtol=1e-10, atol=1e-12)
    values, scores = s.topk((theta,), 6)
    assert bool((scores[1:] <= scores[:-1]).all()), "best first"
    for r in range(6):
        s.check_value("heads", values[r], theta.device)
        torch.testing.assert_close(scores[r], s.score((theta,), values[r]))
    differ = (values[:, None] != values[None, :]).any(-1)  # shape: (6, 6, B)
    assert bool((differ.sum((0, 1)) == 30).all()), "six distinct trees"
    heads, best = s.argmax((theta,))
    assert torch.equal(heads, values[0]) and torch.equal(best, scores[0])
    for row in s.sample((theta,), torch.Size([50]), seeded(20)):
        s.check_value("sample", row, theta.device)


# ---- hypothesis properties ------------------------------------------------------------------


@st.composite
def _trees(draw: st.DrawFn):
    N = draw(st.integers(1, 5))
    B = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, N), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**20))
    scale = draw(st.sampled_from([1.0, 1.0, 10.0]))
    return (*_instance(seed, lengths, N, scale=scale, masked=draw(st.booleans())), N)


@settings(max_examples=examples(25))
@given(case=_trees(), multi_root=st.booleans())
def test_marginals_are_the_gradient_and_batches_are_stacked_singles(case, multi_root) -> None:
    theta, lengths, N = case
    s = ProjectiveTrees(lengths, N, multi_root)
    log_z, (mu,) = s.posterior((theta,))
    x = theta.clone().requires_grad_()
    (grad,) = torch.autograd.grad(s._log_partition_graph((x,)).sum(), x)
    torch.testing.assert_close(mu, grad, rtol=1e-10, atol=1e-12)
    assert bool(((mu >= 0) & (mu <= 1 + 1e-12)).all())
    torch.testing.assert_close(mu.sum(-2)[:, 1:], s.word_mask()[:, 1:].double())
    heads, _ = s.argmax((theta,))
    for b in range(theta.shape[0]):
        single = ProjectiveTrees(lengths[b : b + 1], N, multi_root)
        z1, (mu1,) = single.posterior((theta[b : b + 1],))
        torch.testing.assert_close(z1, log_z[b : b + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mu1, mu[b : b + 1], rtol=1e-12, atol=1e-12)
        assert torch.equal(single.argmax((theta[b : b + 1],))[0], heads[b : b + 1])


@settings(max_examples=examples(25))
@given(case=_trees(), multi_root=st.booleans(), extra=st.integers(1, 3))
def test_padding_invariance(case, multi_root, extra) -> None:
    """Scores outside the space (padding, column 0, diagonal) change nothing; nor does more N."""
    theta, lengths, N = case
    s = ProjectiveTrees(lengths, N, multi_root)
    g = seeded(7)
    noise = torch.randn(theta.shape, generator=g, dtype=theta.dtype)
    noisy = torch.where(s.arc_mask(), theta, noise)
    big = torch.randn(theta.shape[0], N + extra + 1, N + extra + 1, generator=g).double()
    big[:, : N + 1, : N + 1] = theta
    wide = ProjectiveTrees(lengths, N + extra, multi_root)
    log_z, (mu,) = s.posterior((theta,))
    for other, structure in ((noisy, s), (big, wide)):
        z2, (mu2,) = structure.posterior((other,))
        torch.testing.assert_close(z2, log_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mu2[:, : N + 1, : N + 1], mu, rtol=1e-12, atol=1e-12)
        assert bool((mu2[:, N + 1 :] == 0).all()) and bool((mu2[:, :, N + 1 :] == 0).all())
        h2, _ = structure.argmax((other,))
        assert torch.equal(h2[:, : N + 1], s.argmax((theta,))[0])
        assert bool((h2[:, N + 1 :] == -1).all())


# ---- gradients ------------------------------------------------------------------------------


@roots
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_gradcheck_and_gradgradcheck(multi_root: bool, masked: bool) -> None:
    theta, lengths = _instance(8, [3, 2], 3, masked=masked)
    s = ProjectiveTrees(lengths, 3, multi_root)
    x = theta.clone().requires_grad_()
    for fn in (lambda t: s.log_partition((t,)), lambda t: s._log_partition_graph((t,))):
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))
    v = torch.randn(theta.shape, generator=seeded(9), dtype=theta.dtype)
    (hv,) = s.hvp(None, (v,), (theta,))
    (grad,) = torch.autograd.grad(s.log_partition((x,)).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad((grad * v).sum(), x)
    torch.testing.assert_close(hv, want, rtol=1e-10, atol=1e-12)
    assert not bool(torch.isnan(hv).any())


# ---- sampling -------------------------------------------------------------------------------

FALSE_FAILURE_RATE = 1e-7
S = 20_000


@roots
def test_sampling_frequencies_match_probabilities(multi_root: bool) -> None:
    """Every tree's frequency within Bernstein's bound (false failure <= 1e-7, union bound).

    |p̂ − p| <= sqrt(2 p (1 − p) ln(2K/δ) / S) + 2 ln(2K/δ) / (3 S) for all K trees with
    probability >= 1 − δ, δ = 1e-7.
    """
    theta, lengths = _instance(10, [4, 3, 1], 4, masked=True)
    s = ProjectiveTrees(lengths, 4, multi_root)
    samples = s.sample((theta,), torch.Size([S]), seeded(11))
    assert samples.shape == (S, 3, 5)
    enums = _enumerations(theta, lengths, multi_root)
    total = sum(e.structures.shape[0] for e in enums)
    log_term = math.log(2 * total / FALSE_FAILURE_RATE)
    for b, e in enumerate(enums):
        match = (samples[:, b, None, :] == e.structures[None]).all(-1)  # shape: (S, K)
        assert bool((match.sum(-1) == 1).all()), "sampled something that is not a tree"
        freq, p = match.double().mean(0), e.probs
        bound = torch.sqrt(2 * p * (1 - p) * log_term / S) + 2 * log_term / (3 * S)
        assert bool(((freq - p).abs() <= bound).all()), (freq, p)
    again = s.sample((theta,), torch.Size([S]), seeded(11))
    assert torch.equal(samples, again), "the generator decides the samples"
    shaped = s.sample((theta,), torch.Size([2, 3]), seeded(12))
    assert shaped.shape == (2, 3, 3, 5)


# ---- float32 at large scores ----------------------------------------------------------------


@roots
@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_float32_large_scores(multi_root: bool, scale: float) -> None:
    """Marginals in [0, 1], one head per word, close to float64, for scores up to ×1e4."""
    theta, lengths = _instance(13, [20, 13, 7], 20, scale=scale)
    s = ProjectiveTrees(lengths, 20, multi_root)
    z64, (mu64,) = s.posterior((theta,))
    z32, (mu32,) = s.posterior((theta.float(),))
    assert bool(((mu32 >= 0) & (mu32 <= 1)).all())
    words = s.word_mask()[:, 1:].float()
    torch.testing.assert_close(mu32.sum(-2)[:, 1:], words, rtol=0, atol=1e-5)
    # log Z: float32 rounding of the scores themselves, ~eps |θ| per arc, n arcs
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(z32.double(), z64, rtol=0, atol=20 * 4 * eps * scale * 4)
    # marginals: a shift δ of the log-weights moves μ by at most ~δ; δ ≲ n eps |θ|
    delta = min(1.0, 20 * 4 * eps * scale * 4)
    assert float((mu32.double() - mu64).abs().max()) <= max(delta, 1e-5)
    x = theta.float().requires_grad_()
    (grad,) = torch.autograd.grad(s.log_partition((x,)).sum(), x)
    torch.testing.assert_close(grad, mu32, rtol=0, atol=1e-6)
    assert torch.equal(s.argmax((theta.float(),))[0], s.argmax((theta,))[0])


# ---- torch-struct 0.5 -----------------------------------------------------------------------


@pytest.mark.reference
@roots
def test_matches_torch_struct_dependency_crf(multi_root: bool) -> None:
    """torch-struct's layout: ``[B, n, n]`` over words, ``[h-1, m-1]``, ROOT -> m at [m-1, m-1]."""
    torch_struct = pytest.importorskip("torch_struct")
    theta, lengths = _instance(14, [5, 3, 4], 5)
    s = ProjectiveTrees(lengths, 5, multi_root)
    ts = theta[:, 1:, 1:].clone()
    idx = torch.arange(5)
    ts[:, idx, idx] = theta[:, 0, 1:]
    dist = torch_struct.DependencyCRF(ts.clone().requires_grad_(), lengths, multiroot=multi_root)
    log_z, (mu,) = s.posterior((theta,))
    torch.testing.assert_close(dist.partition.detach(), log_z, rtol=1e-10, atol=1e-10)
    theirs = dist.marginals.detach()
    ours = mu[:, 1:, 1:].clone()
    ours[:, idx, idx] = mu[:, 0, 1:]
    torch.testing.assert_close(theirs, ours, rtol=1e-8, atol=1e-10)


# ---- the family -----------------------------------------------------------------------------


def _family():
    try:
        from structift.families.tree import DependencyCRF  # noqa: F401
    except ImportError:
        pytest.skip("structift.families.tree is not there yet")
    import structift

    return structift.DependencyCRF


@roots
def test_through_the_family(multi_root: bool) -> None:
    DependencyCRF = _family()
    theta, lengths = _instance(15, [4, 2, 3], 4)
    theta_q, _ = _instance(16, [4, 2, 3], 4, masked=True)
    dist = DependencyCRF(theta, lengths, projective=True, multi_root=multi_root)
    other = DependencyCRF(theta_q, lengths, projective=True, multi_root=multi_root)
    assert isinstance(dist.structure, ProjectiveTrees)
    enums = _enumerations(theta, lengths, multi_root)
    enums_q = _enumerations(theta_q, lengths, multi_root)
    torch.testing.assert_close(dist.log_partition, torch.stack([e.log_partition for e in enums]))
    torch.testing.assert_close(dist.marginals, torch.stack([e.marginals[0] for e in enums]))
    torch.testing.assert_close(dist.entropy(), torch.stack([e.entropy for e in enums]))
    want_kl = torch.stack([p.kl(q) for p, q in zip(enums, enums_q)])
    torch.testing.assert_close(torch.distributions.kl_divergence(dist, other), want_kl)
    heads = dist.argmax
    best = torch.stack([e.log_probs.max() for e in enums])
    torch.testing.assert_close(dist.log_prob(heads), best)
    values, scores = dist.topk(3)
    for b, e in enumerate(enums):
        order = torch.sort(e.scores, descending=True)
        count = min(3, e.scores.shape[0])
        assert torch.equal(values[:count, b], e.structures[order.indices[:count]])
        torch.testing.assert_close(scores[:count, b], order.values[:count])
        assert bool((scores[count:, b] == NEG_INF).all())
    draws = dist.sample((5,), generator=seeded(17))
    assert draws.shape == (5, 3, 5)
    assert torch.equal(draws, dist.sample((5,), generator=seeded(17)))


@roots
def test_regularized_argmax_ift_through_the_family(multi_root: bool) -> None:
    """μ*(θ) = ∇A(θ/τ) with the IFT backward (one hvp) against autograd through A."""
    DependencyCRF = _family()
    from structift import variational

    theta, lengths = _instance(21, [4, 3], 4)
    x = theta.clone().requires_grad_()
    dist = DependencyCRF(x, lengths, projective=True, multi_root=multi_root)
    mu = variational.regularized_argmax(dist, 0.5)
    s = ProjectiveTrees(lengths, 4, multi_root)
    torch.testing.assert_close(mu.detach(), s.posterior((theta / 0.5,))[1][0])
    v = torch.randn(theta.shape, generator=seeded(22), dtype=theta.dtype)
    (got,) = torch.autograd.grad((mu * v).sum(), x)
    # μ*(θ) = ∇A(θ/τ) = τ ∇_θ [A(θ/τ)]
    (grad,) = torch.autograd.grad(s._log_partition_graph((x / 0.5,)).sum(), x, create_graph=True)
    (want,) = torch.autograd.grad((0.5 * grad * v).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    report = variational.check_ift(dist, 0.5)
    assert report.max_rel_error <= 1e-10
