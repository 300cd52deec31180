"""Blocked emissions (``st.BlockedEmission``): equal to the dense HMM with the -inf zeros."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

import structift as st
from tests.families.test_sampling import _assert_frequencies, _encode
from tests.reference import brute_force
from tests.seeding import examples, seeded

F64 = torch.float64


def _draw(seed: int, B: int, T: int, M: int, S: int, V: int, scale: float = 1.0) -> dict:
    g = seeded(seed)
    Z = M * S
    clusters = torch.cat([torch.arange(M), torch.randint(M, (V - M,), generator=g)])
    return {
        "init": torch.randn(Z, generator=g, dtype=F64) * scale,
        "transition": torch.randn(Z, Z, generator=g, dtype=F64) * scale,
        "logits": torch.randn(Z, V, generator=g, dtype=F64) * scale,
        "clusters": clusters[torch.randperm(V, generator=g)],
        "M": M,
        "x": torch.randint(V, (B, T), generator=g),
        "lengths": torch.randint(1, T + 1, (B,), generator=g),
    }


def _pair(p: dict) -> tuple[st.HMM, st.HMM]:
    emission = st.BlockedEmission(p["logits"], p["clusters"], p["M"])
    args = (p["x"], p["lengths"])
    blocked = st.HMM(p["init"], p["transition"], emission, *args)
    return blocked, st.HMM(p["init"], p["transition"], emission.log_probs(), *args)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    a, b = a.detach(), b.detach()
    diff = torch.where(a == b, torch.zeros_like(a), a - b)  # equal infinities agree
    err = float(diff.abs().max()) if a.numel() else 0.0
    assert err <= tol, f"max abs difference {err:.3e} > {tol:.1e}"


def test_log_probs_are_softmax_within_each_cluster() -> None:
    p = _draw(0, 1, 1, 3, 2, 8)
    log_e = st.BlockedEmission(p["logits"], p["clusters"], 3).log_probs()
    own = p["clusters"][None, :] == (torch.arange(6) // 2)[:, None]
    assert bool((log_e[~own] == float("-inf")).all())
    _close(torch.logsumexp(log_e, -1), torch.zeros(6, dtype=F64), 1e-14)


@settings(max_examples=examples(15))
@given(
    dims=hs.tuples(hs.integers(1, 3), hs.integers(1, 6), hs.integers(1, 3), hs.integers(1, 3)),
    extra_words=hs.integers(0, 4),
    scale=hs.sampled_from([0.5, 1.0, 8.0]),
    seed=hs.integers(0, 2**16),
)
def test_matches_dense_with_minus_inf_zeros(dims, extra_words, scale, seed) -> None:
    B, T, M, S = dims
    p = _draw(seed, B, T, M, S, M + extra_words, scale)
    _assert_matches_dense(*_pair(p), seed)


def _assert_matches_dense(blocked: st.HMM, dense: st.HMM, seed: int) -> None:
    """Evidence, marginals, entropy, MAP and sample scores of the two models agree."""
    _close(blocked.log_partition, dense.log_partition)
    _close(blocked.marginals.unary, dense.marginals.unary)
    _close(blocked.entropy(), dense.entropy())
    _close(blocked.max_score, dense.max_score)
    # The blocked MAP is a dense MAP (ties aside): its dense log-probability is the best one.
    _close(dense.log_prob(blocked.argmax), dense.log_prob(dense.argmax))
    tags = dense.sample((4,), generator=seeded(seed))
    _close(blocked.log_prob(tags), dense.log_prob(tags))


def test_pair_marginals_are_the_dense_blocks() -> None:
    p = _draw(1, 2, 5, 3, 2, 7)
    blocked, dense = _pair(p)
    mu, states = blocked.marginals, blocked.marginals.states
    B, T, _ = states.shape
    rows = torch.arange(B)[:, None, None, None]
    steps = torch.arange(T - 1)[None, :, None, None]
    expected = dense.marginals.binary[rows, steps, states[:, :-1, :, None], states[:, 1:, None, :]]
    _close(mu.block_binary, expected)
    _close(mu.block_binary.sum((1, 2, 3)), (p["lengths"] - 1).to(F64))


def test_gradients_match_dense() -> None:
    p = _draw(2, 3, 6, 2, 3, 9, scale=2.0)
    grads = []
    for dense in (False, True):
        leaves = [p[k].clone().requires_grad_(True) for k in ("init", "transition", "logits")]
        emission = st.BlockedEmission(leaves[2], p["clusters"], p["M"])
        arg = emission.log_probs() if dense else emission
        hmm = st.HMM(leaves[0], leaves[1], arg, p["x"], p["lengths"])
        grads.append(torch.autograd.grad((hmm.log_partition + hmm.entropy()).sum(), leaves))
    for blocked_grad, dense_grad in zip(*grads):
        _close(blocked_grad, dense_grad)


def test_brute_force_and_states_outside_the_block_have_probability_zero() -> None:
    p = _draw(3, 1, 4, 2, 2, 5)
    p["lengths"] = torch.tensor([4])
    blocked, _ = _pair(p)
    log_e = st.BlockedEmission(p["logits"], p["clusters"], 2).log_probs()
    enum = brute_force.hmm_posterior(p["init"], p["transition"], log_e, p["x"][0], 4)
    _close(blocked.log_partition[0], enum.log_partition)
    finite = enum.log_probs > float("-inf")
    _close(blocked.log_prob(enum.structures[:, None])[finite, 0], enum.log_probs[finite])
    assert bool((blocked.log_prob(enum.structures[~finite][:, None]) == float("-inf")).all())


def test_sample_frequencies_match_enumeration() -> None:
    p = _draw(4, 1, 4, 2, 3, 6)
    p["lengths"] = torch.tensor([4])
    blocked, _ = _pair(p)
    samples = blocked.sample((20_000,), generator=seeded(5))[:, 0]
    log_e = st.BlockedEmission(p["logits"], p["clusters"], 2).log_probs()
    enum = brute_force.hmm_posterior(p["init"], p["transition"], log_e, p["x"][0], 4)
    keep = enum.probs > 0
    _assert_frequencies(_encode(samples, 6), _encode(enum.structures[keep], 6), enum.probs[keep])


def test_padding_is_ignored() -> None:
    p = _draw(6, 3, 6, 2, 2, 5)
    p["lengths"] = torch.tensor([6, 2, 1])
    blocked, _ = _pair(p)
    mask = torch.arange(6)[None] < p["lengths"][:, None]
    moved = st.HMM(
        p["init"],
        p["transition"],
        blocked.emission,
        torch.where(mask, p["x"], torch.full_like(p["x"], -100)),
        mask=mask,
    )
    _close(moved.log_partition, blocked.log_partition)
    _close(moved.marginals.unary, blocked.marginals.unary)


def _blocks_of(logits: torch.Tensor, clusters: torch.Tensor, M: int, pad: float) -> torch.Tensor:
    """The [M, S, W] layout built word by word (W = largest cluster + 1, padding ``pad``)."""
    Z, _ = logits.shape
    S = Z // M
    members = [[w for w in range(len(clusters)) if int(clusters[w]) == c] for c in range(M)]
    W = max(map(len, members)) + 1
    blocks = torch.full((M, S, W), pad, dtype=logits.dtype)
    for c, words in enumerate(members):
        for i, w in enumerate(words):
            blocks[c, :, i] = logits[c * S : (c + 1) * S, w]
    return blocks


@pytest.mark.parametrize("pad", [float("nan"), float("inf"), 0.0])
def test_from_blocks_is_the_same_emission_and_ignores_padding(pad: float) -> None:
    p = _draw(16, 2, 5, 3, 2, 11)
    blocks = _blocks_of(p["logits"], p["clusters"], 3, pad).requires_grad_(True)
    compact = st.BlockedEmission.from_blocks(blocks, p["clusters"])
    full = st.BlockedEmission(p["logits"].clone().requires_grad_(True), p["clusters"], 3)
    _close(compact.log_probs(), full.log_probs())
    args = (p["init"], p["transition"])
    a = st.HMM(*args, compact, p["x"], p["lengths"])
    b = st.HMM(*args, full, p["x"], p["lengths"])
    _close(a.log_partition, b.log_partition)
    (grad_blocks,) = torch.autograd.grad(a.log_partition.sum(), blocks)
    (grad_logits,) = torch.autograd.grad(b.log_partition.sum(), full.logits)
    _close(grad_blocks, _blocks_of(grad_logits, p["clusters"], 3, 0.0))


def test_from_blocks_rejects_bad_blocks() -> None:
    clusters = torch.tensor([0, 1, 0, 0])  # cluster 0 holds 3 words
    with pytest.raises(ValueError, match=r"W = 2 word slots .* cluster 0 holds 3 words"):
        st.BlockedEmission.from_blocks(torch.zeros(2, 2, 2), clusters)
    with pytest.raises(ValueError, match=r"blocks must have shape \[M, S, W\]"):
        st.BlockedEmission.from_blocks(torch.zeros(4, 3), clusters)
    with pytest.raises(TypeError, match=r"blocks must be a floating"):
        st.BlockedEmission.from_blocks(torch.zeros(2, 2, 3, dtype=torch.long), clusters)
    bad = torch.zeros(2, 2, 3)
    bad[1, 0, 0] = float("nan")  # cluster 1's only word: a used entry
    with pytest.raises(ValueError, match=r"blocks must be real or -inf"):
        st.BlockedEmission.from_blocks(bad, clusters)
    with pytest.raises(ValueError, match=r"cluster 1 has no words"):
        st.BlockedEmission.from_blocks(torch.zeros(2, 2, 4), torch.zeros(4, dtype=torch.long))


# ---- bad input --------------------------------------------------------------------------------


def test_word_outside_every_cluster_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"word 2 is outside every cluster: clusters\[2\] = 3"):
        st.BlockedEmission(torch.zeros(4, 3), torch.tensor([0, 1, 3]), 2)
    with pytest.raises(ValueError, match=r"word 1 is outside every cluster: clusters\[1\] = -1"):
        st.BlockedEmission(torch.zeros(4, 3), torch.tensor([0, -1, 1]), 2)


@pytest.mark.parametrize(
    "Z,clusters,M,match",
    [
        (5, [0, 1, 1], 2, r"num_clusters must be an int dividing Z = 5"),
        (4, [0, 0, 0], 2, r"cluster 1 has no words"),
        (4, [0, 1], 2, r"clusters must have shape \[V\] = \[3\] .* got \(2,\)"),
    ],
)
def test_bad_partitions_are_rejected(Z, clusters, M, match) -> None:
    with pytest.raises(ValueError, match=match):
        st.BlockedEmission(torch.zeros(Z, 3), torch.tensor(clusters), M)


def test_state_without_a_finite_logit_in_its_cluster_is_rejected() -> None:
    logits = torch.zeros(4, 3)
    logits[3, 1] = float("-inf")  # state 3 (cluster 1) can emit only word 1
    with pytest.raises(ValueError, match=r"state 3 \(cluster 1\) has no finite logit"):
        st.BlockedEmission(logits, torch.tensor([0, 1, 0]), 2)


def test_low_rank_transition_must_match_the_emission_states() -> None:
    emission = st.BlockedEmission(torch.zeros(4, 3), torch.tensor([0, 1, 0]), 2)
    transition = st.LowRankTransition(torch.zeros(6, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match=r"LowRankTransition has Z = 6 .* has Z = 4"):
        st.HMM(torch.zeros(4), transition, emission, torch.zeros(1, 2, dtype=torch.long))


# ---- low-rank transitions with blocked emissions ----------------------------------------------


def _low_rank(p: dict, r: int, seed: int, scale: float = 1.0) -> st.LowRankTransition:
    g = seeded(seed + 1)
    Z = p["init"].shape[0]
    u = torch.randn(Z, r, generator=g, dtype=F64) * scale
    return st.LowRankTransition(u, torch.randn(Z, r, generator=g, dtype=F64) * scale)


@settings(max_examples=examples(15))
@given(
    dims=hs.tuples(hs.integers(1, 3), hs.integers(1, 6), hs.integers(1, 3), hs.integers(1, 3)),
    rank=hs.integers(1, 4),
    scale=hs.sampled_from([0.5, 1.0, 6.0]),
    seed=hs.integers(0, 2**16),
)
def test_low_rank_blocked_matches_dense_on_the_materialized_matrix(dims, rank, scale, seed):
    B, T, M, S = dims
    p = _draw(seed, B, T, M, S, M + 2, scale)
    transition = _low_rank(p, min(rank, M * S), seed, scale)
    emission = st.BlockedEmission(p["logits"], p["clusters"], p["M"])
    args = (p["x"], p["lengths"])
    model = st.HMM(p["init"], transition, emission, *args)
    dense = st.HMM(p["init"], transition.log_probs(), emission.log_probs(), *args)
    assert type(model).__name__ == "BlockedHMM"
    _assert_matches_dense(model, dense, seed)


def test_low_rank_blocked_brute_force_and_gradcheck() -> None:
    p = _draw(11, 1, 4, 2, 2, 5)
    p["lengths"] = torch.tensor([4])
    transition = _low_rank(p, 3, 11)
    emission = st.BlockedEmission(p["logits"], p["clusters"], 2)
    model = st.HMM(p["init"], transition, emission, p["x"], p["lengths"])
    enum = brute_force.hmm_posterior(
        p["init"], transition.log_probs(), emission.log_probs(), p["x"][0], 4
    )
    _close(model.log_partition[0], enum.log_partition)
    finite = enum.log_probs > float("-inf")
    _close(model.log_prob(enum.structures[:, None])[finite, 0], enum.log_probs[finite])

    def evidence_and_entropy(init, u, v, logits):
        blocked = st.BlockedEmission(logits, p["clusters"], 2)
        hmm = st.HMM(init, st.LowRankTransition(u, v), blocked, p["x"], p["lengths"])
        return hmm.log_partition + hmm.entropy()

    leaves = [x.clone().requires_grad_(True) for x in (p["init"], transition.u, transition.v)]
    leaves.append(p["logits"].clone().requires_grad_(True))
    assert torch.autograd.gradcheck(evidence_and_entropy, leaves)


def test_low_rank_blocked_gradients_match_dense() -> None:
    p = _draw(12, 3, 7, 3, 4, 10, scale=2.0)
    transition = _low_rank(p, 5, 12, scale=2.0)
    grads = []
    for dense in (False, True):
        leaves = [
            x.clone().requires_grad_(True)
            for x in (p["init"], transition.u, transition.v, p["logits"])
        ]
        emission = st.BlockedEmission(leaves[3], p["clusters"], p["M"])
        low_rank = st.LowRankTransition(leaves[1], leaves[2])
        trans = low_rank.log_probs() if dense else low_rank
        hmm = st.HMM(leaves[0], trans, emission, p["x"], p["lengths"])
        grads.append(torch.autograd.grad((hmm.log_partition + hmm.entropy()).sum(), leaves))
    for blocked_grad, dense_grad in zip(*grads):
        _close(blocked_grad, dense_grad)


def test_low_rank_blocked_float32_matches_float64_at_scale() -> None:
    # Z = 1024 states in 16 clusters of 64, rank 32, T = 400: float32 against float64.
    p = _draw(13, 2, 400, 16, 64, 300, scale=3.0)
    transition = _low_rank(p, 32, 13, scale=3.0)
    out = {}
    for dtype in (F64, torch.float32):
        emission = st.BlockedEmission(p["logits"].to(dtype), p["clusters"], 16)
        low_rank = st.LowRankTransition(transition.u.to(dtype), transition.v.to(dtype))
        hmm = st.HMM(p["init"].to(dtype), low_rank, emission, p["x"], p["lengths"])
        out[dtype] = (hmm.log_partition.double(), hmm.marginals.unary.double())
    (z64, mu64), (z32, mu32) = out[F64], out[torch.float32]
    assert float(((z32 - z64) / z64.abs()).abs().max()) < 1e-5
    assert float((mu32 - mu64).abs().max()) < 1e-3
    assert bool((mu32 >= 0).all())


def test_low_rank_blocks_that_underflow_stay_finite_with_finite_gradients() -> None:
    # Row i of A puts its mass on feature 0, column j of B on feature 1, both others ~e^-200:
    # the float32 product underflows; it becomes a tiny finite transition, never NaN.
    Z, M = 4, 2  # rank 2
    u = torch.tensor([[0.0, -200.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    v = torch.tensor([[0.0, 0.0], [0.0, 0.0], [-200.0, 0.0], [0.0, 0.0]])
    clusters = torch.tensor([0, 1, 0, 1])  # states 0-1 emit words 0, 2; states 2-3 words 1, 3
    x = torch.tensor([[0, 1, 0, 1]])
    values, grads = [], []
    for dtype in (F64, torch.float32):
        leaves = [t.to(dtype).requires_grad_(True) for t in (u, v, torch.zeros(Z, 4))]
        emission = st.BlockedEmission(leaves[2], clusters, M)
        hmm = st.HMM(torch.zeros(Z, dtype=dtype), st.LowRankTransition(*leaves[:2]), emission, x)
        value = hmm.log_partition
        grads.append(torch.autograd.grad(value.sum(), leaves))
        values.append(value.detach().double())
    assert torch.isfinite(values[1]).all()
    assert all(bool(torch.isfinite(g).all()) for g in grads[1])
    assert abs(float(values[1] - values[0])) < 1e-4
    for g32, g64 in zip(grads[1], grads[0]):
        assert float((g32.double() - g64).abs().max()) < 1e-4


# ---- state dropout ----------------------------------------------------------------------------


def test_state_dropout_equals_minus_inf_on_dropped_states() -> None:
    from structift.families.blocked import state_dropout

    p = _draw(7, 2, 5, 3, 4, 8)
    emission = st.BlockedEmission(p["logits"], p["clusters"], 3)
    init, trans, small, kept = state_dropout(
        p["init"], p["transition"], emission, 2, generator=seeded(8)
    )
    assert kept.shape == (6,) and bool((kept // 4 == torch.arange(3).repeat_interleave(2)).all())
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[kept] = False
    inf = float("-inf")
    reference = st.HMM(
        p["init"].masked_fill(dropped, inf),
        p["transition"].masked_fill(dropped[None, :], inf),
        emission.log_probs(),
        p["x"],
        p["lengths"],
    )
    model = st.HMM(init, trans, small, p["x"], p["lengths"])
    _close(model.log_partition, reference.log_partition)
    _close(model.marginals.unary, reference.marginals.unary[..., kept])


def test_state_dropout_of_low_rank_transitions_renormalises_the_kernel() -> None:
    from structift.families.blocked import state_dropout

    p = _draw(14, 2, 5, 3, 4, 8)
    transition = _low_rank(p, 4, 14)
    emission = st.BlockedEmission(p["logits"], p["clusters"], 3)
    init, trans, small, kept = state_dropout(
        p["init"], transition, emission, 2, generator=seeded(15)
    )
    assert isinstance(trans, st.LowRankTransition) and trans.num_states == 6
    dropped = torch.ones(12, dtype=torch.bool)
    dropped[kept] = False
    inf = float("-inf")
    reference = st.HMM(
        p["init"].masked_fill(dropped, inf),
        transition.log_probs().masked_fill(dropped[None, :], inf),
        emission.log_probs(),
        p["x"],
        p["lengths"],
    )
    model = st.HMM(init, trans, small, p["x"], p["lengths"])
    _close(model.log_partition, reference.log_partition)
    _close(model.marginals.unary, reference.marginals.unary[..., kept])
    with pytest.raises(ValueError, match=r"leaves 3 states, fewer than .* rank r = 4"):
        state_dropout(p["init"], transition, emission, 1)


def test_state_dropout_rejects_a_bad_keep() -> None:
    from structift.families.blocked import state_dropout

    emission = st.BlockedEmission(torch.zeros(4, 3), torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match=r"keep must be an int in \[1, S\] with S = 2"):
        state_dropout(torch.zeros(4), torch.zeros(4, 4), emission, 3)


def test_kl_expand_and_sample_joint() -> None:
    p = _draw(9, 2, 4, 2, 2, 5)
    blocked, dense = _pair(p)
    q = dict(p, transition=p["transition"] * 0.5, init=p["init"] + 1.0)
    other, other_dense = _pair(q)
    _close(blocked.kl(other), dense.kl(other_dense))
    _close(blocked.kl(blocked), torch.zeros(2, dtype=F64))
    one = _pair({**p, "x": p["x"][:1], "lengths": p["lengths"][:1]})[0]
    _close(one.expand((3,)).log_partition, one.log_partition.expand(3))
    x, z = blocked.sample_joint((200,), generator=seeded(10))
    clusters = p["clusters"][x]  # every emitted word lies in its state's cluster
    mask = torch.arange(4)[None] < p["lengths"][:, None]
    assert bool(((clusters == z // 2) | ~mask).all())
