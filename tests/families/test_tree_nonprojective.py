"""DependencyCRF (non-projective, single- and multi-root) against brute force and torch-struct.

Tolerances: float64 brute force to 1e-9 (the fast LU path is trusted only where its relative
error bound n κ₁ ε₆₄ is below ~1e-10; the log-domain elimination is accurate to a few ulps per
step). Every test that depends on the numeric path runs on both (``path`` fixture).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structift as st_
from structift.structures.tree import nonprojective
from structift.variational import check_ift, regularized_argmax
from tests.families.cases_tree import TREE_CASES
from tests.families.test_sampling import FALSE_FAILURE_RATE, S, _assert_frequencies, _encode
from tests.reference import brute_force
from tests.seeding import examples, seeded

cases = pytest.mark.parametrize("case", TREE_CASES, ids=repr)
TOL = 1e-9


paths = pytest.mark.parametrize("path", ["fast", "robust"])


@contextlib.contextmanager
def _path(path: str) -> Iterator[None]:
    """Use the LU path where trusted (``fast``) or the log-domain elimination everywhere."""
    if path == "fast":
        yield
        return
    saved = nonprojective._MAX_CONDITION, nonprojective._DEFAULT_MAX_CONDITION
    nonprojective._MAX_CONDITION, nonprojective._DEFAULT_MAX_CONDITION = {}, -1.0
    try:
        yield
    finally:
        nonprojective._MAX_CONDITION, nonprojective._DEFAULT_MAX_CONDITION = saved


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()


# ---- brute force ----------------------------------------------------------------------------


@paths
@cases
@settings(max_examples=examples(25))
@given(data=st.data())
def test_matches_brute_force(case, path, data) -> None:
    with _path(path):
        params = data.draw(case.params())
        dist = case.build(params)
        log_z, mu, ent = dist.log_partition, dist.marginals, dist.entropy()
        heads = dist.argmax
        for b, enum in enumerate(case.brute(params)):
            _close(log_z[b], enum.log_partition)
            _close(mu[b], enum.marginals[0])
            _close(ent[b], enum.entropy, 1e-8)
            assert float(dist.score(heads)[b]) == pytest.approx(float(enum.max_score), abs=1e-9)
            single = case.build(case.select(params, b))
            lp = single.log_prob(enum.structures[:, None])[:, 0]
            _close(lp, enum.log_probs)
            assert float(lp.exp().sum()) == pytest.approx(1.0, abs=1e-9)


@paths
@cases
@settings(max_examples=examples(15))
@given(data=st.data())
def test_kl_matches_brute_force(case, path, data) -> None:
    with _path(path):
        params_p = data.draw(case.params())
        params_q = data.draw(case.like(params_p))
        p, q = case.build(params_p), case.build(params_q)
        kl = torch.distributions.kl_divergence(p, q)
        ce = p.cross_entropy(q)
        for b, (ep, eq) in enumerate(zip(case.brute(params_p), case.brute(params_q))):
            _close(kl[b], ep.kl(eq), 1e-8)
            _close(ce[b], ep.entropy + ep.kl(eq), 1e-8)
            assert float(kl[b]) >= 0


def test_topk() -> None:
    from tests.families.cases_tree import NONPROJECTIVE

    dist = NONPROJECTIVE.build(NONPROJECTIVE.fixed())
    values, scores = dist.topk(1)
    assert torch.equal(values[0], dist.argmax)
    _close(scores[0], dist.score(dist.argmax))
    with pytest.raises(ValueError, match="k = 2 is not supported for non-projective"):
        dist.topk(2)


def test_argmax_layout_and_single_root_on_random_larger_trees() -> None:
    g = seeded(5)
    for multi_root in (False, True):
        for _ in range(40):
            n = int(torch.randint(1, 6, (1,), generator=g))
            arcs = torch.randn(1, 6, 6, generator=g, dtype=torch.float64).round()  # ties too
            dist = st_.DependencyCRF(arcs, torch.tensor([n]), multi_root=multi_root)
            heads = dist.argmax
            assert heads[0, 0] == -1 and bool((heads[0, n + 1 :] == -1).all())
            enum = brute_force.dependency_trees(arcs[0], n, False, multi_root)
            assert float(dist.score(heads)[0]) == pytest.approx(float(enum.max_score), abs=1e-12)


# ---- properties ------------------------------------------------------------------------------


@paths
@cases
@settings(max_examples=examples(20))
@given(data=st.data())
def test_marginals_are_the_gradient(case, path, data) -> None:
    with _path(path):
        params = data.draw(case.params())
        arcs = params["arc_scores"].clone().requires_grad_()
        dist = case.make({**params, "arc_scores": arcs})
        (grad,) = torch.autograd.grad(dist.log_partition.sum(), arcs)
        with torch.no_grad():
            _close(grad, dist.marginals)
            assert float(dist.entropy().min()) >= 0


@cases
@settings(max_examples=examples(15))
@given(data=st.data())
def test_padding_invariance_and_batch_is_stacked_singles(case, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params)
    padded = case.build(case.pad(params, data))
    _close(padded.log_partition, dist.log_partition)
    _close(padded.marginals, dist.marginals)
    assert torch.equal(padded.argmax, dist.argmax)
    for b in range(dist.batch_shape[0]):
        single = case.build(case.select(params, b))
        _close(single.log_partition[0], dist.log_partition[b])
        _close(single.marginals[0], dist.marginals[b])


@paths
@cases
def test_gradcheck_and_gradgradcheck(case, path) -> None:
    with _path(path):
        params = case.fixed()

        def log_z(arcs: torch.Tensor) -> torch.Tensor:
            return case.make({**params, "arc_scores": arcs}).log_partition

        arcs = params["arc_scores"].clone().requires_grad_()
        assert torch.autograd.gradcheck(log_z, (arcs,))
        assert torch.autograd.gradgradcheck(log_z, (arcs,))


# ---- torch-struct ----------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("multi_root", [False, True])
def test_matches_torch_struct(multi_root: bool) -> None:
    torch_struct = pytest.importorskip("torch_struct")
    g = seeded(7)
    B, N = 4, 6
    arcs = torch.randn(B, N + 1, N + 1, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 5, 6])
    # torch-struct: [B, N, N] over the words, [head, child], root scores on the diagonal.
    phi = arcs[:, 1:, 1:].clone()
    idx = torch.arange(N)
    phi[:, idx, idx] = arcs[:, 0, 1:]
    ref = torch_struct.NonProjectiveDependencyCRF(phi, lengths, multiroot=multi_root)
    dist = st_.DependencyCRF(arcs, lengths, multi_root=multi_root)
    mu = dist.marginals
    mine = mu[:, 1:, 1:].clone()
    mine[:, idx, idx] = mu[:, 0, 1:]
    # torch-struct adds eps = 1e-5 to every exp(score): a bias of about N * 1e-5.
    assert torch.allclose(ref.partition, dist.log_partition, atol=1e-3)
    word = dist.structure.word_mask()[:, 1:]
    keep = word[:, :, None] & word[:, None, :]
    assert torch.allclose(ref.marginals[keep], mine[keep], atol=1e-3)


# ---- sampling --------------------------------------------------------------------------------


@cases
def test_sample_frequencies_match_enumeration(case) -> None:
    """Every tree's frequency within Bernstein's bound (false-failure rate 1e-7)."""
    assert FALSE_FAILURE_RATE == 1e-7
    params = case.fixed()
    dist = case.build(params)
    samples = dist.sample((S,), generator=seeded(3))
    assert samples.shape == (S, 2, 5) and samples.dtype == torch.long
    dist.structure.check_value("samples", samples, samples.device)
    base = 6  # heads + 1 in [0, 5]
    for b, enum in enumerate(case.brute(params)):
        _assert_frequencies(
            _encode(samples[:, b] + 1, base), _encode(enum.structures + 1, base), enum.probs
        )
    again = dist.sample((7,), generator=seeded(3))
    assert torch.equal(again, dist.sample((7,), generator=seeded(3)))


# ---- float32 at scale ------------------------------------------------------------------------


@pytest.mark.parametrize("multi_root", [False, True])
def test_float32_large_scores_are_stable(multi_root: bool) -> None:
    g = seeded(9)
    B, N = 6, 24
    arcs = torch.randn(B, N + 1, N + 1, generator=g) * 1e4
    lengths = torch.tensor([24, 3, 17, 24, 1, 10])
    dist = st_.DependencyCRF(arcs, lengths, multi_root=multi_root)
    ref = st_.DependencyCRF(arcs.double(), lengths, multi_root=multi_root)
    mu = dist.marginals
    word = dist.structure.word_mask()
    assert mu.dtype == torch.float32 and bool(torch.isfinite(mu).all())
    assert float(mu.min()) >= 0 and float(mu.max()) <= 1
    assert float((mu.sum(1) - word.float()).abs().max()) <= 1e-4
    assert torch.equal(dist.argmax, ref.argmax)
    log_z = dist.log_partition
    assert bool(torch.isfinite(log_z).all())
    assert torch.allclose(log_z.double(), ref.log_partition, rtol=1e-6)
    assert float(dist.entropy().min()) >= 0
    assert torch.allclose(mu.double(), ref.marginals, atol=1e-5)


# ---- value checks and validation --------------------------------------------------------------


def test_check_value_errors() -> None:
    dist = st_.DependencyCRF(torch.randn(1, 4, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match="cycle"):
        dist.log_prob(torch.tensor([[-1, 2, 1, 0]]))
    with pytest.raises(ValueError, match="2 words on ROOT"):
        dist.log_prob(torch.tensor([[-1, 0, 0, 1]]))
    with pytest.raises(ValueError, match="must lie in"):
        dist.log_prob(torch.tensor([[-1, 0, 4, 1]]))
    with pytest.raises(ValueError, match="is not a head"):
        dist.log_prob(torch.tensor([[-1, 0, 2, 1]]))
    multi = st_.DependencyCRF(torch.randn(1, 4, 4), torch.tensor([3]), multi_root=True)
    assert bool(torch.isfinite(multi.log_prob(torch.tensor([[-1, 0, 0, 1]]))).all())


def test_constructor_errors() -> None:
    with pytest.raises(TypeError, match="floating"):
        st_.DependencyCRF(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, N\+1, N\+1\]"):
        st_.DependencyCRF(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, N\+1, N\+1\]"):
        st_.DependencyCRF(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="lengths"):
        st_.DependencyCRF(torch.zeros(2, 3, 3), torch.tensor([1, 3]))
    with pytest.raises(TypeError, match="multi_root"):
        st_.DependencyCRF(torch.zeros(1, 3, 3), multi_root=1)
    with pytest.raises(ValueError, match="nan"):
        st_.DependencyCRF(torch.full((1, 3, 3), math.nan))
    forbidden = torch.zeros(1, 3, 3)
    forbidden[0, :, 2] = -math.inf
    with pytest.raises(ValueError, match="no structure has finite score"):
        st_.DependencyCRF(forbidden).log_partition
    dist = st_.DependencyCRF(torch.zeros(1, 3, 3))
    assert dist.expand((4,)).batch_shape == (4,)
    assert dist.arg_constraints and dist.support is not None


# ---- the variational view ---------------------------------------------------------------------


@pytest.mark.parametrize("multi_root", [False, True])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_regularized_argmax_and_ift(multi_root: bool, tau: float) -> None:
    from tests.families.cases_tree import NONPROJECTIVE, NONPROJECTIVE_MULTI

    case = NONPROJECTIVE_MULTI if multi_root else NONPROJECTIVE
    params = case.fixed()
    arcs = params["arc_scores"].clone().requires_grad_()
    dist = case.make({**params, "arc_scores": arcs})
    mu = regularized_argmax(dist, tau)
    with torch.no_grad():
        ref = case.make({**params, "arc_scores": params["arc_scores"] / tau}).marginals
    _close(mu, ref, 1e-12)
    cot = torch.randn(mu.shape, generator=seeded(4), dtype=torch.float64)
    (ift,) = torch.autograd.grad((mu * cot).sum(), arcs)
    leaf = params["arc_scores"].clone().requires_grad_()
    scaled = case.make({**params, "arc_scores": leaf / tau})
    (grad,) = torch.autograd.grad(scaled.log_partition.sum(), leaf, create_graph=True)
    (auto,) = torch.autograd.grad((grad * tau * cot).sum(), leaf)  # μ = τ ∇_θ A(θ/τ)
    assert float((ift - auto).abs().max()) <= 1e-10 * max(float(auto.abs().max()), 1.0)
    report = check_ift(dist, tau)
    assert report.max_rel_error <= 1e-10 and report.forward_residual <= 1e-12
