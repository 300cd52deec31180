"""k-best decoding (``topk``): every family against brute-force enumeration, tie rules,
missing ranks, validation, gradients, backends and float32 at scale."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import structift as st_
from structift.structures import chain
from tests import strategies
from tests.conftest import DEVICES
from tests.families.cases import CASES, Case
from tests.reference import brute_force
from tests.seeding import examples, seeded

cases = pytest.mark.parametrize("case", CASES, ids=repr)
kbest_cases = pytest.mark.parametrize("case", [c for c in CASES if c.kbest], ids=repr)
devices = pytest.mark.parametrize("device", DEVICES)
NEG_INF = float("-inf")


def _event(value: torch.Tensor, dist, b: int) -> tuple[int, ...]:
    """One structure as a tuple, padding dropped (chains keep their first L tags)."""
    if value.dim() == 0:
        return (int(value),)
    if dist.structure.padding_value != 0:  # padding is canonical (-1) in values and enumeration
        return tuple(value.tolist())
    L = int(dist.lengths[b]) if hasattr(dist, "lengths") else value.shape[-1]
    return tuple(value[:L].tolist())


def _brute_table(enum: brute_force.Enumeration, dist, b: int) -> dict[tuple[int, ...], float]:
    return {_event(s, dist, b): float(x) for s, x in zip(enum.structures, enum.scores)}


@kbest_cases
@devices
@given(data=st.data())
@settings(max_examples=examples(40))
def test_topk_is_the_k_best_of_the_enumeration(case: Case, device, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params, device)
    enums = case.brute(params)
    n_max = max(e.scores.shape[0] for e in enums)
    k = data.draw(st.integers(1, n_max + 3))  # k beyond the number of structures too
    values, scores = dist.topk(k)
    assert values.shape == (k, *dist.batch_shape, *dist.event_shape)
    assert scores.shape == (k, *dist.batch_shape)
    values, scores = values.cpu(), scores.detach().cpu()
    for b, enum in enumerate(enums):
        table = _brute_table(enum, dist, b)
        finite = sorted((x for x in table.values() if x > NEG_INF), reverse=True)
        n = min(k, len(finite))
        # Exact: the k best scores, in descending order (ties in any order here).
        assert_close(
            scores[:n, b].double(),
            torch.tensor(finite[:n], dtype=torch.float64),
            rtol=1e-9,
            atol=1e-9,
        )
        got = [_event(values[r, b], dist, b) for r in range(n)]
        assert len(set(got)) == n, "the k best structures must be distinct"
        for r, g in enumerate(got):  # each structure carries its own score
            assert table[g] == pytest.approx(float(scores[r, b]), rel=1e-9, abs=1e-9)
        # Missing ranks: score -inf, value padding_value (0 for chains, -1 for trees).
        assert bool((scores[n:, b] == NEG_INF).all())
        assert bool((values[n:, b] == dist.structure.padding_value).all())


@pytest.mark.parametrize("case", [c for c in CASES if not c.kbest], ids=repr)
def test_topk_beyond_one_is_a_clear_error_where_unsupported(case: Case) -> None:
    dist = case.build(case.fixed())
    with pytest.raises(ValueError, match="k = 2 is not supported"):
        dist.topk(2)


@cases
@devices
@given(data=st.data())
@settings(max_examples=examples(20))
def test_topk_one_is_argmax(case: Case, device, data) -> None:
    params = data.draw(case.params())
    dist = case.build(params, device)
    values, scores = dist.topk(1)
    assert_close(scores[0], dist.max_score, rtol=1e-12, atol=1e-12)
    # Viterbi and k-best share the tie rule, so the structures agree even on ties.
    assert torch.equal(values[0], dist.argmax)


def _integer_chain(data, neg_inf: bool) -> dict:
    """Integer potentials: scores are exact in float64, so ties are exact ties."""
    params = data.draw(strategies.chain_params(neg_inf=neg_inf))
    u, b = params["unary"], params["binary"]
    params["unary"] = torch.where(torch.isfinite(u), (u / 4).round().clamp(-2, 2), u)
    params["binary"] = torch.where(torch.isfinite(b), (b / 4).round().clamp(-2, 2), b)
    return params


@given(data=st.data())
@settings(max_examples=examples(40))
def test_chain_tie_rule_is_reversed_lexicographic(data) -> None:
    params = _integer_chain(data, neg_inf=data.draw(st.booleans()))
    unary, binary, lengths = params["unary"], params["binary"], params["lengths"]
    B, T, Z = unary.shape
    k = data.draw(st.integers(1, Z**T + 2))
    tags, scores = chain.topk(unary, binary, lengths, k)
    for b in range(B):
        L = int(lengths[b])
        bb = binary.expand(B, T - 1, Z, Z)[b] if T > 1 else binary.new_zeros(0, Z, Z)
        enum = brute_force.chain(unary[b], bb, L)
        rows = [
            (float(x), tuple(s[:L].tolist()))
            for x, s in zip(enum.scores, enum.structures)
            if x > NEG_INF
        ]
        # Documented rule: score descending, then the reversed sequence ascending.
        rows.sort(key=lambda r: (-r[0], tuple(reversed(r[1]))))
        n = min(k, len(rows))
        got = [(float(scores[r, b]), tuple(tags[r, b, :L].tolist())) for r in range(n)]
        assert got == rows[:n]


@given(params=strategies.categorical_params(neg_inf=True), k=st.integers(1, 9))
@settings(max_examples=examples(30))
def test_categorical_tie_rule_is_lowest_index(params, k) -> None:
    logits = params["logits"].round()  # integer logits: frequent exact ties
    values, scores = st_.Categorical(logits).topk(k)
    for b in range(logits.shape[0]):
        order = np.argsort(-logits[b].numpy(), kind="stable")  # stable: lower index first
        keep = [int(i) for i in order if logits[b, i] > NEG_INF][:k]
        n = len(keep)
        assert values[:n, b].tolist() == keep
        assert scores[:n, b].tolist() == logits[b, keep].tolist()
        assert bool((scores[n:, b] == NEG_INF).all()) and bool((values[n:, b] == 0).all())


def test_topk_validates_k() -> None:
    crf = st_.LinearChainCRF(torch.randn(2, 3, 2, generator=seeded(0)), torch.zeros(2, 2))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="k must be >= 1"):
            crf.topk(bad)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="k must be an int"):
            crf.topk(bad)  # type: ignore[arg-type]
    tags, _ = crf.topk(np.int64(2))  # anything with __index__
    assert tags.shape == (2, 2, 3)


def test_topk_infeasible_element() -> None:
    unary = torch.zeros(2, 2, 2, dtype=torch.float64)
    binary = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    binary[1] = NEG_INF  # element 1 has no allowed transition
    with pytest.raises(ValueError, match="no structure has finite score at batch index"):
        st_.LinearChainCRF(unary, binary).topk(3)
    tags, scores = st_.LinearChainCRF(unary, binary, validate_args=False).topk(3)
    assert bool((scores[:, 1] == NEG_INF).all()) and bool((tags[:, 1] == 0).all())
    assert bool(torch.isfinite(scores[:, 0]).all())


def test_topk_scores_are_differentiable() -> None:
    g = seeded(1)
    unary = torch.randn(3, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    binary = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    lengths = torch.tensor([4, 2, 1])
    crf = st_.LinearChainCRF(unary, binary, lengths)
    tags, scores = crf.topk(4)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)[:, None]
    gu, gb = torch.autograd.grad((scores * weights).sum(), [unary, binary])
    # The gradient of a path's score is its sufficient statistic; missing ranks (element 2 has
    # 3 paths) have none.
    assert bool((scores[3:, 2] == NEG_INF).all()) and bool(torch.isfinite(scores[:, :2]).all())
    w = weights * torch.isfinite(scores.detach())  # shape: (k, B)
    stats = crf.sufficient_statistics(tags)
    assert_close(gu, (stats.unary * w[..., None, None]).sum(0))
    assert_close(gb, (stats.binary * w[..., None, None, None]).sum((0, 1, 2)))


def test_missing_ranks_have_zero_gradient() -> None:
    unary = torch.zeros(1, 2, 2, dtype=torch.float64, requires_grad=True)
    binary = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    _, scores = st_.LinearChainCRF(unary, binary).topk(6)  # 4 paths exist
    assert scores[4:].eq(NEG_INF).all()
    gu, gb = torch.autograd.grad(
        scores[torch.isfinite(scores)].sum() + 0 * scores.sum(), [unary, binary]
    )
    assert bool(torch.isfinite(gu).all()) and bool(torch.isfinite(gb).all())


@pytest.mark.parametrize("backend", ["log", "scaled", "fused"])
def test_topk_is_backend_independent(backend: str) -> None:
    g = seeded(2)
    unary = torch.randn(4, 6, 3, generator=g)
    binary = torch.randn(5, 3, 3, generator=g)
    lengths = torch.tensor([6, 3, 1, 5])
    ref = st_.LinearChainCRF(unary, binary, lengths, backend="log").topk(5)
    out = st_.LinearChainCRF(unary, binary, lengths, backend=backend).topk(5)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_hmm_topk_matches_its_posterior() -> None:
    g = seeded(3)
    hmm = st_.HMM(
        torch.randn(3, generator=g),
        torch.randn(3, 3, generator=g),
        torch.randn(3, 4, generator=g),
        torch.randint(4, (2, 5), generator=g),
        torch.tensor([5, 3]),
    )
    tags, scores = hmm.topk(3)
    ref_tags, ref_scores = hmm.posterior.topk(3)
    assert torch.equal(tags, ref_tags)
    assert_close(scores, ref_scores)
    assert_close(scores, hmm.score(tags))  # log p(x, z) of each path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_in_float32(dtype) -> None:
    g = seeded(4)
    unary, binary = torch.randn(2, 5, 3, generator=g), torch.randn(3, 3, generator=g)
    ref_tags, _ = chain.topk(
        unary.to(dtype).float(), binary.to(dtype).float(), torch.tensor([5, 4]), 3
    )
    tags, scores = chain.topk(unary.to(dtype), binary.to(dtype), torch.tensor([5, 4]), 3)
    assert torch.equal(tags, ref_tags) and scores.dtype == dtype


@devices
def test_float32_long_peaked_chain_matches_float64(device) -> None:
    """float32 at scale: T = 400 steps of peaked potentials (|log Z| ~ 1e4)."""
    g = seeded(5)
    B, T, Z, k = 3, 400, 4, 4
    unary = 10 * torch.randn(B, T, Z, dtype=torch.float64, generator=g)
    binary = 10 * torch.randn(Z, Z, dtype=torch.float64, generator=g)
    lengths = torch.tensor([T, T // 2, 7])
    _, scores64 = chain.topk(unary, binary, lengths, k)
    u32, b32 = unary.float().to(device), binary.float().to(device)
    tags32, scores32 = chain.topk(u32, b32, lengths.to(device), k)
    # Different paths may only come from float32 near-ties: compare the exact scores of the
    # float32 paths with the float64 optimum, to float32 rounding of |score| ~ 1e4.
    exact = torch.stack([chain.score(unary, binary, lengths, t.cpu()) for t in tags32])
    tol = 64 * torch.finfo(torch.float32).eps * float(scores64.abs().max())
    assert_close(exact, scores64, rtol=0, atol=tol)
    assert_close(scores32.double().cpu(), exact, rtol=0, atol=tol)
    assert bool((scores32[1:] <= scores32[:-1]).all()), "descending"
