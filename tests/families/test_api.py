"""The public API: shapes, layouts, defaults and the torch.distributions vocabulary."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import constraints, kl_divergence
from torch.testing import assert_close

import structift as st
from tests.seeding import seeded

TOL = {"rtol": 1e-9, "atol": 1e-9}


def _crf(device, B=3, T=5, Z=4, shared=True, lengths=(5, 3, 1)) -> st.LinearChainCRF:
    g = seeded(3)
    unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64).to(device)
    shape = (Z, Z) if shared else (B, T - 1, Z, Z)
    binary = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    return st.LinearChainCRF(unary, binary, torch.tensor(lengths, device=device))


def test_exports() -> None:
    for name in ("ExpFamily", "Categorical", "LinearChainCRF", "HMM", "ChainMarginals"):
        assert name in st.__all__ and hasattr(st, name)
    assert issubclass(st.ExpFamily, torch.distributions.ExponentialFamily)
    for cls in (st.Categorical, st.LinearChainCRF, st.HMM):
        assert issubclass(cls, st.ExpFamily)


def test_crf_shapes_and_types(device) -> None:
    crf = _crf(device)
    B, T, Z = 3, 5, 4
    assert crf.batch_shape == (B,) and crf.event_shape == (T,)
    assert crf.binary.shape == (B, T - 1, Z, Z)
    assert crf.log_partition.shape == (B,)
    mu = crf.marginals
    assert isinstance(mu, st.ChainMarginals)
    assert mu.unary.shape == (B, T, Z) and mu.binary.shape == (B, T - 1, Z, Z)
    assert crf.argmax.shape == (B, T) and crf.argmax.dtype == torch.long
    assert crf.log_prob(crf.argmax).shape == (B,)
    assert crf.sample((7,)).shape == (7, B, T)
    assert crf.sample().shape == (B, T)
    assert crf.sample((2, 3)).shape == (2, 3, B, T)
    assert crf.entropy().shape == (B,)
    assert crf.log_prob(crf.sample((2, 3))).shape == (2, 3, B)
    assert torch.equal(crf.mode, crf.argmax)
    assert mu.unary.device.type == crf.argmax.device.type == torch.device(device).type


def test_crf_padding_conventions(device) -> None:
    crf = _crf(device)
    lengths = crf.lengths
    mask = torch.arange(5, device=device) < lengths[:, None]
    assert bool((crf.argmax[~mask] == 0).all())
    assert bool((crf.sample((4,))[:, ~mask] == 0).all())
    assert bool((crf.marginals.unary[~mask] == 0).all())
    assert bool((crf.marginals.binary[~mask[:, 1:]] == 0).all())


def test_binary_layouts_broadcast_like_the_full_tensor() -> None:
    g = seeded(4)
    B, T, Z = 2, 4, 3
    unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64)
    full_shapes = {(Z, Z): (B, T - 1, Z, Z), (T - 1, Z, Z): (B, T - 1, Z, Z), (B, 1, Z, Z): None}
    for shape in full_shapes:
        binary = torch.randn(shape, generator=g, dtype=torch.float64)
        a = st.LinearChainCRF(unary, binary)
        b = st.LinearChainCRF(unary, binary.expand(B, T - 1, Z, Z).clone())
        assert_close(a.log_partition, b.log_partition, **TOL)
        assert_close(a.marginals.binary, b.marginals.binary, **TOL)


def test_binary_layout_is_from_to() -> None:
    """binary[b, t, i, j] scores y_t = i followed by y_{t+1} = j."""
    binary = torch.full((2, 2), float("-inf"), dtype=torch.float64)
    binary[0, 1] = 0.0  # only 0 -> 1 allowed
    binary[1, 1] = 0.0
    crf = st.LinearChainCRF(torch.zeros(1, 2, 2, dtype=torch.float64), binary)
    assert_close(crf.log_partition, torch.log(torch.tensor([2.0], dtype=torch.float64)))
    assert crf.marginals.binary[0, 0, 1, 0] == 0 and crf.marginals.binary[0, 0, 0, 1] > 0


def test_lengths_default_to_full_and_accept_int32() -> None:
    unary = torch.randn(2, 3, 2)
    binary = torch.randn(2, 2)
    a = st.LinearChainCRF(unary, binary)
    assert a.lengths.dtype == torch.long and a.lengths.tolist() == [3, 3]
    b = st.LinearChainCRF(unary, binary, torch.tensor([3, 3], dtype=torch.int32))
    assert torch.equal(a.log_partition, b.log_partition)


def test_float32_matches_float64() -> None:
    crf64 = _crf("cpu")
    crf32 = st.LinearChainCRF(crf64.unary.float(), crf64.binary.float(), crf64.lengths)
    assert crf32.log_partition.dtype == torch.float32
    assert_close(crf32.log_partition.double(), crf64.log_partition, rtol=1e-5, atol=1e-5)
    assert_close(crf32.marginals.unary.double(), crf64.marginals.unary, rtol=1e-4, atol=1e-5)


def test_constraints_and_support() -> None:
    crf = _crf("cpu")
    assert crf.support.check(crf.sample((3,))).all()
    assert not crf.support.check(torch.full((3, 5), 4)).any()
    assert "unary" in crf.arg_constraints and "binary" in crf.arg_constraints
    assert crf.arg_constraints["unary"].check(crf.unary).all()
    cat = st.Categorical(torch.zeros(2, 5))
    assert isinstance(cat.support, constraints.integer_interval)
    assert cat.support.check(torch.tensor([0, 4])).all() and not cat.support.check(torch.tensor(5))
    assert "LinearChainCRF(unary" in repr(crf)


def test_expand() -> None:
    crf = _crf("cpu", B=1, lengths=(4,))
    big = crf.expand((3,))
    assert big.batch_shape == (3,)
    assert_close(big.log_partition, crf.log_partition.expand(3), **TOL)
    with pytest.raises(ValueError, match=r"LinearChainCRF.expand: batch_shape must be \(3,\)"):
        big.expand((4,))
    cat = st.Categorical(torch.randn(4, dtype=torch.float64)).expand((2, 3))
    assert cat.batch_shape == (2, 3) and cat.entropy().shape == (2, 3)


@pytest.mark.parametrize("batched_params", [False, True])
def test_hmm_expand(batched_params: bool) -> None:
    """A batch of one expanded to three: same A, marginals and entropy in every row."""
    Z, V, T = 3, 4, 5
    lead = (1,) if batched_params else ()
    init = torch.randn(*lead, Z, dtype=torch.float64)
    trans = torch.randn(*lead, Z, Z, dtype=torch.float64)
    emit = torch.randn(*lead, Z, V, dtype=torch.float64)
    hmm = st.HMM(init, trans, emit, torch.randint(V, (1, T)), torch.tensor([4]))
    big = hmm.expand((3,))
    assert big.batch_shape == (3,) and big.event_shape == (T,)
    assert_close(big.log_partition, hmm.log_partition.expand(3), **TOL)
    assert_close(big.marginals.unary, hmm.marginals.unary.expand(3, T, Z), **TOL)
    assert_close(big.entropy(), hmm.entropy().expand(3), **TOL)
    assert big.expand((3,)).batch_shape == (3,)
    with pytest.raises(ValueError, match=r"HMM.expand: batch_shape must be \(3,\)"):
        big.expand((4,))
    with pytest.raises(ValueError, match="got \\(2, 3\\)"):
        hmm.expand((2, 3))


def test_categorical_matches_torch_categorical(device) -> None:
    logits = torch.randn(2, 3, 5, dtype=torch.float64, device=device)
    logits[0, 1, 2] = float("-inf")
    ours = st.Categorical(logits)
    ref = torch.distributions.Categorical(logits=logits)
    assert ours.batch_shape == ref.batch_shape == (2, 3) and ours.event_shape == ()
    assert_close(ours.marginals, ref.probs, **TOL)
    assert_close(ours.entropy(), ref.entropy(), **TOL)
    x = ref.sample((4,))
    assert_close(ours.log_prob(x), ref.log_prob(x), **TOL)
    assert torch.equal(ours.argmax, ref.mode)
    q = torch.randn(2, 3, 5, dtype=torch.float64, device=device)
    assert_close(
        kl_divergence(ours, st.Categorical(q)),
        kl_divergence(ref, torch.distributions.Categorical(logits=q)),
        **TOL,
    )


def test_hmm_posterior_and_shapes(device) -> None:
    g = seeded(5)
    Z, V, B, T = 3, 4, 2, 5
    init = torch.randn(Z, generator=g, dtype=torch.float64).to(device)
    trans = torch.randn(Z, Z, generator=g, dtype=torch.float64).to(device)
    emit = torch.randn(Z, V, generator=g, dtype=torch.float64).to(device)
    obs = torch.randint(0, V, (B, T), generator=g).to(device)
    lengths = torch.tensor([5, 2], device=device)
    hmm = st.HMM(init, trans, emit, obs, lengths)
    post = hmm.posterior
    assert isinstance(post, st.LinearChainCRF)
    assert hmm.log_partition.shape == (B,) and hmm.argmax.shape == (B, T)
    assert_close(hmm.log_partition, post.log_partition, **TOL)
    assert torch.equal(hmm.argmax, post.argmax)
    assert hmm.sample((3,)).shape == (3, B, T)
    x, z = hmm.sample_joint((3,))
    assert x.shape == z.shape == (3, B, T) and x.max() < V and z.max() < Z
    # The posterior of an HMM is an ExpFamily on the same space as a CRF: KL is defined.
    crf = st.LinearChainCRF(post.unary.detach(), post.binary.detach(), lengths)
    assert_close(kl_divergence(hmm, crf), torch.zeros(B, dtype=torch.float64, device=device))
    # log p(x) by the forward algorithm in probability space (an independent path).
    pi, A, E = init.softmax(-1), trans.softmax(-1), emit.softmax(-1)
    for b in range(B):
        alpha = pi * E[:, obs[b, 0]]
        for t in range(1, int(lengths[b])):
            alpha = (alpha @ A) * E[:, obs[b, t]]
        assert_close(hmm.log_partition[b], alpha.sum().log(), **TOL)


def test_hmm_batched_parameters_equal_stacked_singles() -> None:
    g = seeded(6)
    Z, V, B, T = 2, 3, 3, 4
    init = torch.randn(B, Z, generator=g, dtype=torch.float64)
    trans = torch.randn(B, Z, Z, generator=g, dtype=torch.float64)
    emit = torch.randn(B, Z, V, generator=g, dtype=torch.float64)
    obs = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([4, 1, 3])
    hmm = st.HMM(init, trans, emit, obs, lengths)
    for b in range(B):
        single = st.HMM(init[b], trans[b], emit[b], obs[b : b + 1], lengths[b : b + 1])
        assert_close(hmm.log_partition[b : b + 1], single.log_partition, **TOL)
        assert_close(hmm.marginals.unary[b : b + 1], single.marginals.unary, **TOL)


def test_gradients_reach_parameters_and_inputs_are_not_modified() -> None:
    unary = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    binary = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    crf = st.LinearChainCRF(unary, binary, torch.tensor([4, 2]))
    crf.entropy().sum().backward()
    assert unary.grad is not None and binary.grad is not None
    assert binary.grad.shape == (3, 3)
    assert unary.is_leaf and binary.is_leaf


@pytest.mark.parametrize("family", ["crf", "hmm"])
def test_log_prob_and_entropy_can_be_backpropagated_twice(family) -> None:
    """Quantities from the same distribution object can each be differentiated."""
    logits = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    if family == "crf":
        dist = st.LinearChainCRF(torch.zeros(1, 3, 3, dtype=torch.float64), logits)
    else:
        obs = torch.tensor([[0, 2, 1]])
        dist = st.HMM(torch.zeros(3).double(), logits, torch.zeros(3, 3).double(), obs)
    dist.log_partition.sum().backward()
    dist.entropy().sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_empty_sample_shape() -> None:
    assert st.Categorical(torch.zeros(2, 3)).sample((0, 4)).shape == (0, 4, 2)
    assert st.LinearChainCRF(torch.zeros(2, 3, 2), torch.zeros(2, 2)).sample((0,)).shape == (
        0,
        2,
        3,
    )
