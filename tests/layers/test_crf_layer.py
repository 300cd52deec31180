"""``structift.layers.CRF``: pytorch-crf compatibility, brute force, masks, k-best, constraints.

Grouped by method (pytorch-crf's habit): construction and state, forward (log-likelihood),
decode, marginals and the distribution, constraints.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import structift
from structift.layers import CRF, allowed_transitions
from tests.seeding import examples, seeded

NEG_INF = float("-inf")


def _inputs(B: int, T: int, Z: int, seed: int, dtype=torch.float64):
    g = seeded(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    emissions = torch.randn(B, T, Z, generator=g, dtype=dtype)
    tags = torch.randint(Z, (B, T), generator=g)
    return emissions, tags, mask, lengths


def _crf(Z: int, seed: int, **kw) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(Z, **kw).double()
    with torch.no_grad():  # larger than pytorch-crf's init, so the scores matter
        for p in crf.parameters():
            p.normal_()
    return crf


def _path_score(crf: CRF, emissions: torch.Tensor, path: tuple[int, ...]) -> torch.Tensor:
    """score(y) = start[y0] + sum emissions + sum transitions + end[y_{L-1}] (one sequence)."""
    start, end, trans = (x.detach() for x in crf._scores())
    s = start[path[0]] + end[path[-1]]
    s = s + sum(emissions[t, z] for t, z in enumerate(path))
    return s + sum((trans[i, j] for i, j in itertools.pairwise(path)), torch.zeros(()).double())


def _enumerate(crf: CRF, emissions: torch.Tensor, length: int):
    paths = list(itertools.product(range(crf.num_tags), repeat=length))
    return paths, torch.stack([_path_score(crf, emissions, p) for p in paths]).detach()


# ---- construction and state ----------------------------------------------------------------


class TestState:
    def test_exported_at_top_level(self) -> None:
        assert structift.CRF is CRF

    @pytest.mark.reference
    def test_pytorch_crf_state_dict_loads_unchanged(self) -> None:
        torchcrf = pytest.importorskip("torchcrf")
        ref = torchcrf.CRF(5, batch_first=True)
        ours = CRF(5, constraints=allowed_transitions("BIO", ["O", "B-A", "I-A", "B-B", "I-B"]))
        ours.load_state_dict(ref.state_dict())  # strict: same names, shapes, no extra state
        for name, p in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[name], p)
        ref.load_state_dict(CRF(5).state_dict())  # and back

    def test_init_and_repr(self) -> None:
        crf = CRF(7)
        for p in crf.parameters():
            assert p.abs().max() <= 0.1
        assert "num_tags=7" in repr(crf)
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match="num_tags"):
                CRF(bad)  # type: ignore[arg-type]


# ---- forward: the log-likelihood -----------------------------------------------------------


class TestForward:
    @given(B=st.integers(1, 3), T=st.integers(1, 4), Z=st.integers(1, 3), seed=st.integers(0, 99))
    @settings(max_examples=examples(25))
    def test_log_likelihood_is_brute_force(self, B, T, Z, seed) -> None:
        crf = _crf(Z, seed)
        emissions, tags, mask, lengths = _inputs(B, T, Z, seed)
        llh = crf(emissions, torch.where(mask, tags, -100), mask=mask, reduction="none")
        for b in range(B):
            L = int(lengths[b])
            _, scores = _enumerate(crf, emissions[b], L)
            gold = _path_score(crf, emissions[b], tuple(tags[b, :L].tolist()))
            assert_close(llh[b], gold - torch.logsumexp(scores, 0))

    @pytest.mark.reference
    @pytest.mark.parametrize("batch_first", [True, False])
    @pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
    def test_matches_pytorch_crf(self, batch_first: bool, reduction: str) -> None:
        torchcrf = pytest.importorskip("torchcrf")
        crf = _crf(4, 1, batch_first=batch_first)
        ref = torchcrf.CRF(4, batch_first=batch_first).double()
        ref.load_state_dict(crf.state_dict())
        emissions, tags, mask, _ = _inputs(5, 6, 4, 2)
        if not batch_first:
            emissions, tags, mask = emissions.transpose(0, 1), tags.T, mask.T
        emissions.requires_grad_(True)
        ours = crf(emissions, tags, mask=mask, reduction=reduction)
        theirs = ref(emissions, tags, mask=mask, reduction=reduction)
        assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        g_ours = torch.autograd.grad(ours.sum(), [emissions, *crf.parameters()])
        g_ref = torch.autograd.grad(theirs.sum(), [emissions, *ref.parameters()])
        for a, b in zip(g_ours, g_ref):
            assert_close(a, b, rtol=1e-10, atol=1e-10)

    def test_lengths_and_mask_agree_and_padding_is_ignored(self) -> None:
        crf = _crf(3, 3)
        emissions, tags, mask, lengths = _inputs(4, 5, 3, 3)
        a = crf(emissions, tags, mask=mask, reduction="none")
        dirty = torch.where(mask[..., None], emissions, torch.full_like(emissions, 1e6))
        b = crf(dirty, torch.where(mask, tags, -100), lengths=lengths, reduction="none")
        assert_close(a, b)
        c = crf(emissions, tags, mask=mask.to(torch.uint8), reduction="none")  # ByteTensor mask
        assert_close(a, c)
        full = crf(emissions, tags, reduction="none")  # no mask: every sequence has length T
        assert_close(full, crf(emissions, tags, lengths=torch.full((4,), 5), reduction="none"))

    def test_reductions(self) -> None:
        crf = _crf(3, 4)
        emissions, tags, mask, lengths = _inputs(4, 5, 3, 4)
        none = crf(emissions, tags, mask=mask, reduction="none")
        assert_close(crf(emissions, tags, mask=mask), none.sum())
        assert_close(crf(emissions, tags, mask=mask, reduction="mean"), none.mean())
        token = crf(emissions, tags, mask=mask, reduction="token_mean")
        assert_close(token, none.sum() / lengths.sum())
        with pytest.raises(ValueError, match="reduction must be one of"):
            crf(emissions, tags, mask=mask, reduction="avg")

    def test_clear_errors(self) -> None:
        crf = CRF(3)
        emissions = torch.randn(2, 4, 3)
        tags = torch.zeros(2, 4, dtype=torch.long)
        holes = torch.tensor([[True, False, True, False], [True, True, False, False]])
        with pytest.raises(ValueError, match="prefix mask"):
            crf(emissions, tags, mask=holes)
        empty = torch.tensor([[True, True, False, False], [False, False, False, False]])
        with pytest.raises(ValueError, match="mask row 1 is all False"):
            crf(emissions, tags, mask=empty)
        with pytest.raises(ValueError, match="not both"):
            crf(emissions, tags, mask=holes, lengths=torch.tensor([4, 2]))
        with pytest.raises(ValueError, match="num_tags = 3"):
            crf(torch.randn(2, 4, 5), tags)
        with pytest.raises(ValueError, match="3-D tensor"):
            crf(torch.randn(4, 3), tags)
        with pytest.raises(ValueError, match="tags must lie in"):
            crf(emissions, torch.full((2, 4), 3))
        with pytest.raises(ValueError, match="real or -inf"):
            crf(torch.full((2, 4, 3), float("nan")), tags)


# ---- decode ---------------------------------------------------------------------------------


class TestDecode:
    @given(B=st.integers(1, 3), T=st.integers(1, 4), Z=st.integers(1, 3), seed=st.integers(0, 99))
    @settings(max_examples=examples(25))
    def test_viterbi_and_k_best_are_brute_force(self, B, T, Z, seed) -> None:
        crf = _crf(Z, seed)
        emissions, _, mask, lengths = _inputs(B, T, Z, seed)
        best = crf.decode(emissions, mask=mask)
        k = int(torch.randint(2, Z**T + 3, (), generator=seeded(seed)))
        kbest = crf.decode(emissions, mask=mask, k=k)
        for b in range(B):
            L = int(lengths[b])
            paths, scores = _enumerate(crf, emissions[b], L)
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            assert len(best[b]) == L
            top = float(_path_score(crf, emissions[b], tuple(best[b])))
            assert top == pytest.approx(float(scores.max()), abs=1e-12)
            assert len(kbest[b]) == min(k, len(paths))  # every path is allowed here
            for r, (tags, score) in enumerate(kbest[b]):
                assert score == pytest.approx(float(scores[order[r]]), abs=1e-9)
                assert float(_path_score(crf, emissions[b], tuple(tags))) == pytest.approx(score)
            assert kbest[b][0][0] == best[b]

    @pytest.mark.reference
    def test_matches_pytorch_crf(self) -> None:
        torchcrf = pytest.importorskip("torchcrf")
        crf = _crf(6, 5)
        ref = torchcrf.CRF(6, batch_first=True).double()
        ref.load_state_dict(crf.state_dict())
        emissions, _, mask, _ = _inputs(8, 7, 6, 5)
        assert crf.decode(emissions, mask=mask) == ref.decode(emissions, mask=mask)
        crf.batch_first = ref.batch_first = False
        e, m = emissions.transpose(0, 1), mask.T
        assert crf.decode(e, mask=m) == ref.decode(e, mask=m)


# ---- marginals and the distribution ---------------------------------------------------------


class TestDistribution:
    @given(B=st.integers(1, 3), T=st.integers(1, 4), Z=st.integers(1, 3), seed=st.integers(0, 99))
    @settings(max_examples=examples(20))
    def test_start_and_end_are_folded_at_each_length(self, B, T, Z, seed) -> None:
        crf = _crf(Z, seed)
        emissions, _, mask, lengths = _inputs(B, T, Z, seed)
        dist = crf.distribution(emissions, mask=mask)
        assert isinstance(dist, structift.LinearChainCRF)
        mu = crf.marginals(emissions, mask=mask)
        for b in range(B):
            L = int(lengths[b])
            paths, scores = _enumerate(crf, emissions[b], L)
            assert_close(dist.log_partition[b], torch.logsumexp(scores, 0))
            p = torch.softmax(scores, 0)
            ref = torch.zeros(T, Z, dtype=torch.float64)
            for path, w in zip(paths, p):
                for t, z in enumerate(path):
                    ref[t, z] += w
            assert_close(mu[b], ref)
        assert_close(mu, dist.marginals.unary)
        # Everything the family offers is one call away.
        H = dist.entropy()
        assert bool((H >= 0).all()) and dist.sample((2,)).shape == (2, B, T)

    def test_differentiable_marginals(self) -> None:
        crf = _crf(3, 6)
        emissions, _, mask, _ = _inputs(2, 4, 3, 6)
        emissions.requires_grad_(True)
        mu = crf.marginals(emissions, mask=mask)
        (g,) = torch.autograd.grad((mu * torch.arange(3.0).double()).sum(), [emissions])
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
        with torch.no_grad():
            assert_close(crf.marginals(emissions, mask=mask), mu.detach())

    def test_batch_first_false_layout(self) -> None:
        crf = _crf(3, 7)
        emissions, _, mask, _ = _inputs(2, 4, 3, 7)
        crf_t = _crf(3, 7, batch_first=False)
        mu = crf.marginals(emissions, mask=mask)
        assert_close(crf_t.marginals(emissions.transpose(0, 1), mask=mask.T), mu.transpose(0, 1))


# ---- constraints ----------------------------------------------------------------------------

BIO = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def _allowed_path(allowed: set[tuple[int, int]], Z: int, path: list[int]) -> bool:
    steps = [(Z, path[0]), *itertools.pairwise(path), (path[-1], Z + 1)]
    return all(s in allowed for s in steps)


class TestConstraints:
    @given(
        scheme=st.sampled_from(["BIO", "IOB1", "BIOUL", "BMES"]),
        B=st.integers(1, 3),
        T=st.integers(1, 5),
        seed=st.integers(0, 999),
    )
    @settings(max_examples=examples(25))
    def test_decoding_never_outputs_a_forbidden_path(self, scheme, B, T, seed) -> None:
        prefixes = {"BIO": "BIO", "IOB1": "BIO", "BIOUL": "BIOUL", "BMES": "BMES"}[scheme]
        labels = [p if p == "O" else f"{p}-X" for p in prefixes] + [
            p + "-Y" for p in prefixes if p != "O"
        ]
        Z = len(labels)
        pairs = allowed_transitions(scheme, labels)
        crf = _crf(Z, seed, constraints=pairs)
        emissions, _, mask, lengths = _inputs(B, T, Z, seed)
        emissions = 5 * emissions  # strong emissions push towards forbidden paths
        allowed = set(pairs)
        for b, (path, kbest) in enumerate(
            zip(crf.decode(emissions, mask=mask), crf.decode(emissions, mask=mask, k=4))
        ):
            assert len(path) == int(lengths[b]) and _allowed_path(allowed, Z, path)
            assert kbest and all(_allowed_path(allowed, Z, tags) for tags, _ in kbest)
            assert kbest[0][0] == path

    def test_likelihood_is_over_allowed_paths_and_gradients_are_finite(self) -> None:
        pairs = allowed_transitions("BIO", BIO)
        crf = _crf(5, 8, constraints=pairs)
        emissions, _, mask, lengths = _inputs(3, 4, 5, 8)
        emissions.requires_grad_(True)
        gold = [[0, 1, 2, 0], [3, 4, 0, 0], [1, 0, 0, 0]]
        tags = torch.tensor(gold)
        llh = crf(emissions, tags, mask=mask, reduction="none")
        allowed = set(pairs)
        for b in range(3):
            L = int(lengths[b])
            paths, scores = _enumerate(crf, emissions[b].detach(), L)
            ok = torch.tensor([_allowed_path(allowed, 5, list(p)) for p in paths])
            assert bool(torch.isinf(scores[~ok]).all()) and bool(torch.isfinite(scores[ok]).all())
            gold_score = _path_score(crf, emissions[b].detach(), tuple(gold[b][:L]))
            assert_close(llh[b].detach(), gold_score - torch.logsumexp(scores[ok], 0))
        grads = torch.autograd.grad(llh.sum(), [emissions, *crf.parameters()])
        for g in grads:
            assert bool(torch.isfinite(g).all())
        # Forbidden entries get zero gradient (their score is the constant -inf).
        g_trans = grads[3]
        assert bool((g_trans[~crf.transition_mask] == 0).all())
        assert bool((grads[1][~crf.start_mask] == 0).all())

    def test_forbidden_gold_path_is_a_clear_error(self) -> None:
        crf = CRF(5, constraints=allowed_transitions("BIO", BIO))
        emissions = torch.randn(2, 3, 5)
        with pytest.raises(ValueError, match=r"sequence 1 .*tag 2 may not start a sequence"):
            crf(emissions, torch.tensor([[0, 1, 2], [2, 2, 0]]))
        with pytest.raises(ValueError, match=r"tag 0 -> 2 at positions 1, 2"):
            crf(emissions, torch.tensor([[1, 0, 2], [0, 0, 0]]))

    def test_constraint_pairs_are_checked(self) -> None:
        with pytest.raises(ValueError, match="out of range"):
            CRF(3, constraints=[(0, 7)])
        with pytest.raises(ValueError, match="allow no first tag"):
            CRF(3, constraints=[(0, 1), (1, 4)])
        with pytest.raises(ValueError, match="allow no last tag"):
            CRF(3, constraints=[(3, 0), (0, 1)])
        with pytest.raises(ValueError, match="pairs of ints"):
            CRF(3, constraints=[(0,)])  # type: ignore[list-item]
