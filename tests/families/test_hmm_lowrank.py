"""Low-rank HMMs (``st.LowRankTransition``): exactness, gradients, sampling, numerics, errors.

References: the dense HMM on the materialized matrix (``.log_probs()``), brute-force
enumeration of hidden paths (``tests/reference/brute_force.py``) and of the lifted chain's
rank indices, and the kernel's definition ``P[i, j] ∝ Σ_k exp(u[i, k] + v[j, k])``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch.utils._python_dispatch import TorchDispatchMode

import structift as st
from structift.structures.chain import _lowrank
from tests.families.test_sampling import _assert_frequencies, _encode
from tests.reference import brute_force
from tests.seeding import examples, seeded

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def _draw(seed: int, B: int, T: int, Z: int, r: int, V: int, scale: float = 1.0) -> dict:
    g = seeded(seed)
    return {
        "init": torch.randn(Z, generator=g, dtype=F64) * scale,
        "u": torch.randn(Z, r, generator=g, dtype=F64) * scale,
        "v": torch.randn(Z, r, generator=g, dtype=F64) * scale,
        "emission": torch.randn(Z, V, generator=g, dtype=F64) * scale,
        "x": torch.randint(V, (B, T), generator=g),
        "lengths": torch.randint(1, T + 1, (B,), generator=g),
    }


def _to(p: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) for k, v in p.items()}


def _pair(p: dict, **kw) -> tuple[st.HMM, st.HMM]:
    """The low-rank HMM and the dense HMM on its materialized matrix."""
    transition = st.LowRankTransition(p["u"], p["v"])
    low = st.HMM(p["init"], transition, p["emission"], p["x"], p["lengths"], **kw)
    dense = st.HMM(p["init"], transition.log_probs(), p["emission"], p["x"], p["lengths"], **kw)
    return low, dense


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    diff = torch.where(a == b, torch.zeros_like(a), a - b)  # equal infinities agree
    err = float(diff.abs().max()) if a.numel() else 0.0
    assert err <= tol, f"max abs difference {err:.3e} > {tol:.1e}"


# ---- the parameterization -------------------------------------------------------------------


def test_log_probs_is_the_row_normalised_kernel() -> None:
    p = _draw(0, 1, 1, 7, 3, 2)
    kernel = torch.exp(p["u"]) @ torch.exp(p["v"]).T  # phi(u) phi(v)^T, shape: (Z, Z)
    expected = torch.log(kernel / kernel.sum(-1, keepdim=True))
    log_p = st.LowRankTransition(p["u"], p["v"]).log_probs()
    _close(log_p, expected, 50 * EPS64)
    _close(torch.logsumexp(log_p, -1), torch.zeros(7, dtype=F64), 50 * EPS64)


def test_factors_are_row_stochastic_and_multiply_to_p() -> None:
    p = _draw(1, 1, 1, 6, 4, 2, scale=3.0)
    transition = st.LowRankTransition(p["u"], p["v"])
    log_a, log_b = transition.factors()
    assert log_a.shape == (6, 4) and log_b.shape == (4, 6)
    _close(log_a.exp().sum(-1), torch.ones(6, dtype=F64), 50 * EPS64)
    _close(log_b.exp().sum(-1), torch.ones(4, dtype=F64), 50 * EPS64)
    _close(log_a.exp() @ log_b.exp(), transition.log_probs().exp(), 50 * EPS64)


# ---- exact contract: low-rank == dense on the materialized matrix ----------------------------


@settings(max_examples=examples(25))
@given(
    dims=hs.tuples(hs.integers(1, 3), hs.integers(1, 6), hs.integers(1, 6), hs.integers(1, 4)),
    rank=hs.integers(1, 6),
    scale=hs.sampled_from([0.3, 1.0, 6.0]),
    seed=hs.integers(0, 2**16),
)
def test_matches_dense_on_materialized_matrix(dims, rank, scale, seed) -> None:
    B, T, Z, V = dims
    p = _draw(seed, B, T, Z, min(rank, Z), V, scale)
    low, dense = _pair(p)
    _close(low.log_partition, dense.log_partition)
    mu, mu_dense = low.marginals, dense.marginals
    _close(mu.unary, mu_dense.unary)
    # Summing the factored counts over the rank index gives the dense pair counts' margins.
    _close(mu.state_feature.sum(-1), mu_dense.binary.sum((1, 3)))
    _close(mu.feature_state.sum(1), mu_dense.binary.sum((1, 2)))
    _close(low.entropy(), dense.entropy())
    _close(low.max_score, dense.max_score)
    tags = dense.sample((3,), generator=seeded(seed))
    _close(low.log_prob(tags), dense.log_prob(tags))


def test_factored_counts_match_lifted_enumeration() -> None:
    """E #(z_t = i, k_t = k) from dense pair marginals and p(k | i, j) = A_ik B_kj / P_ij."""
    p = _draw(2, 2, 5, 4, 2, 3)
    low, dense = _pair(p)
    log_a, log_b = low.transition.factors()
    a, b = log_a.exp(), log_b.exp()
    P = a @ b
    pair = dense.marginals.binary.sum(1)  # shape: (B, Z, Z)
    lift = a[:, :, None] * b[None] / P[:, None, :]  # p(k | i, j), shape: (Z, r, Z)
    expected_n = torch.einsum("bij,ikj->bik", pair, lift)
    expected_m = torch.einsum("bij,ikj->bkj", pair, lift)
    mu = low.marginals
    _close(mu.state_feature, expected_n)
    _close(mu.feature_state, expected_m)


@pytest.mark.parametrize("Z,r,T", [(3, 1, 4), (3, 2, 5), (4, 3, 4)])
def test_brute_force_over_all_state_sequences(Z: int, r: int, T: int) -> None:
    p = _draw(3 + Z + r, 2, T, Z, r, 3)
    low, _ = _pair(p)
    log_p = low.transition.log_probs()
    for b in range(2):
        enum = brute_force.hmm_posterior(
            p["init"], log_p, p["emission"], p["x"][b], int(p["lengths"][b])
        )
        _close(low.log_partition[b], enum.log_partition)
        _close(low.marginals.unary[b], enum.marginals[0])
        _close(low.entropy()[b], enum.entropy)
        _close(low.max_score[b], enum.max_score)
        _close(low.log_prob(enum.structures[:, None].expand(-1, 2, -1))[:, b], enum.log_probs)


def test_evidence_sums_to_one_over_all_observation_sequences() -> None:
    """Σ_x p(x) = 1 for a fixed length: the low-rank HMM is a normalised generative model."""
    Z, r, V, T = 3, 2, 2, 4
    p = _draw(4, 1, T, Z, r, V, scale=2.0)
    xs = torch.tensor(list(itertools.product(range(V), repeat=T)))
    hmm = st.HMM(p["init"], st.LowRankTransition(p["u"], p["v"]), p["emission"], xs)
    _close(torch.logsumexp(hmm.log_partition, 0), torch.zeros((), dtype=F64))


@settings(max_examples=examples(20))
@given(seed=hs.integers(0, 2**16), Z=hs.integers(2, 6), r=hs.integers(1, 4))
def test_log_evidence_invariant_under_state_and_rank_permutations(seed, Z, r) -> None:
    r = min(r, Z)
    p = _draw(seed, 2, 5, Z, r, 3)
    g = seeded(seed + 1)
    states, ranks = torch.randperm(Z, generator=g), torch.randperm(r, generator=g)
    base, _ = _pair(p)
    q = dict(p, init=p["init"][states], emission=p["emission"][states])
    q["u"], q["v"] = p["u"][states][:, ranks], p["v"][states][:, ranks]
    moved, _ = _pair(q)
    _close(moved.log_partition, base.log_partition)
    _close(moved.marginals.unary, base.marginals.unary[..., states])


# ---- gradients --------------------------------------------------------------------------------


def test_log_partition_function_gradcheck() -> None:
    g = seeded(5)
    B, T, Z, r = 3, 5, 4, 2
    unary = torch.randn(B, T, Z, generator=g, dtype=F64, requires_grad=True)
    log_a = torch.randn(Z, r, generator=g, dtype=F64, requires_grad=True)
    log_b = torch.randn(r, Z, generator=g, dtype=F64, requires_grad=True)
    lengths = torch.tensor([5, 2, 1])
    fn = lambda u, a, b: _lowrank.LogPartition.apply(u, a, b, lengths)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (unary, log_a, log_b))


def test_hmm_gradcheck_in_u_v_and_emissions() -> None:
    p = _draw(6, 2, 4, 4, 2, 3)
    leaves = [p[k].clone().requires_grad_(True) for k in ("init", "u", "v", "emission")]

    def log_evidence(init, u, v, emission):
        return st.HMM(
            init, st.LowRankTransition(u, v), emission, p["x"], p["lengths"]
        ).log_partition

    assert torch.autograd.gradcheck(log_evidence, tuple(leaves))


@pytest.mark.parametrize("quantity", ["log_partition", "entropy"])
def test_gradients_match_dense_autograd(quantity: str, device) -> None:
    p = _to(_draw(7, 3, 6, 5, 3, 4, scale=2.0), device)
    grads = []
    for dense in (False, True):
        leaves = [p[k].clone().requires_grad_(True) for k in ("init", "u", "v", "emission")]
        transition = st.LowRankTransition(leaves[1], leaves[2])
        arg = transition.log_probs() if dense else transition
        hmm = st.HMM(leaves[0], arg, leaves[3], p["x"], p["lengths"])
        value = hmm.log_partition if quantity == "log_partition" else hmm.entropy()
        weights = torch.arange(1.0, 4.0, dtype=F64, device=device)
        grads.append(torch.autograd.grad((value * weights).sum(), leaves))
    for low, dense_grad in zip(*grads):
        _close(low, dense_grad)


def test_no_per_step_graph() -> None:
    """The autograd graph of log p(x) has the same size for T = 4 and T = 64."""

    def graph_size(T: int) -> int:
        p = _draw(8, 2, T, 4, 2, 3)
        u = p["u"].requires_grad_(True)
        hmm = st.HMM(p["init"], st.LowRankTransition(u, p["v"]), p["emission"], p["x"])
        seen, stack = set(), [hmm.log_partition.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(f for f, _ in node.next_functions)
        return len(seen)

    assert graph_size(4) == graph_size(64)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_forward_backward_never_materializes_z_by_z() -> None:
    Z, r, B, T, V = 512, 4, 2, 6, 7
    p = _draw(9, B, T, Z, r, V)
    leaves = [p[k].float().requires_grad_(True) for k in ("init", "u", "v", "emission")]
    with _LargestTensor() as mode:
        hmm = st.HMM(leaves[0], st.LowRankTransition(leaves[1], leaves[2]), leaves[3], p["x"])
        hmm.log_partition.sum().backward()
        _ = hmm.marginals
        _ = hmm.sample((3,))
    assert mode.largest <= max(B * T * Z, Z * V) < Z * Z, mode.largest
    assert all(x.grad is not None and bool(torch.isfinite(x.grad).all()) for x in leaves)


# ---- sampling -------------------------------------------------------------------------------

S = 20_000


def test_posterior_sample_frequencies_match_enumeration(device) -> None:
    Z, r, T = 3, 2, 4
    p = _draw(10, 2, T, Z, r, 3)
    p["lengths"] = torch.tensor([4, 2])
    low, _ = _pair(_to(p, device))
    samples = low.sample((S,), generator=seeded(11, device=device)).cpu()
    assert samples.shape == (S, 2, T) and samples.dtype == torch.long
    log_p = low.transition.log_probs().cpu()
    for b in range(2):
        length = int(p["lengths"][b])
        assert bool((samples[:, b, length:] == 0).all())
        enum = brute_force.hmm_posterior(p["init"], log_p, p["emission"], p["x"][b], length)
        _assert_frequencies(_encode(samples[:, b], Z), _encode(enum.structures, Z), enum.probs)


def test_joint_sample_frequencies_match_enumeration() -> None:
    Z, r, V, T = 3, 2, 2, 3
    p = _draw(12, 1, T, Z, r, V)
    p["lengths"] = torch.tensor([3])
    low, _ = _pair(p)
    x, z = low.sample_joint((S,), generator=seeded(13))
    xs, zs, probs = brute_force.hmm_joint(
        p["init"], low.transition.log_probs(), p["emission"], T, T
    )
    codes = _encode(z[:, 0], Z) * V**T + _encode(x[:, 0], V)
    _assert_frequencies(codes, _encode(zs, Z) * V**T + _encode(xs, V), probs)


# ---- padding, float32 -------------------------------------------------------------------------


def test_padding_is_ignored_and_batches_are_independent() -> None:
    p = _draw(14, 3, 6, 5, 2, 4)
    p["lengths"] = torch.tensor([6, 3, 1])
    low, _ = _pair(p)
    mask = torch.arange(6)[None] < p["lengths"][:, None]
    other = torch.where(mask, p["x"], torch.full_like(p["x"], -100))
    moved = st.HMM(p["init"], low.transition, p["emission"], other, mask=mask)
    _close(moved.log_partition, low.log_partition)
    _close(moved.marginals.unary, low.marginals.unary)
    assert bool((low.marginals.unary[~mask] == 0).all())
    for b in range(3):
        one = st.HMM(
            p["init"], low.transition, p["emission"], p["x"][b : b + 1], p["lengths"][b : b + 1]
        )
        _close(one.log_partition[0], low.log_partition[b])
        _close(one.marginals.state_feature[0], low.marginals.state_feature[b])


@pytest.mark.parametrize("T", [16, 4096])
def test_float32_error_does_not_grow_with_length(T: int) -> None:
    """Scaled messages: the marginals' float32 error stays at a few ulps for any T.

    Each step is a normalised product of sums over Z and r terms, so the relative error per
    step is O((Z + r) eps) and does not accumulate in normalised messages; log p(x) sums T such
    steps, so its error is O(T (Z + r) eps) relative to the per-step magnitude.
    """
    Z, r, V = 16, 4, 8
    p = _draw(15, 2, T, Z, r, V, scale=3.0)
    p["lengths"] = torch.tensor([T, T // 2])
    p32 = {k: v.float() if v.is_floating_point() else v for k, v in p.items()}
    low, low32 = (
        st.HMM(q["init"], st.LowRankTransition(q["u"], q["v"]), q["emission"], q["x"], q["lengths"])
        for q in (p, p32)
    )
    eps = torch.finfo(torch.float32).eps
    per_step = float(low.log_partition.abs().max()) / T + math.log(Z * V)
    _close(low32.log_partition.double(), low.log_partition, 4 * (Z + r) * eps * T * per_step)
    _close(low32.marginals.unary.double(), low.marginals.unary, 4 * (Z + r) * eps)


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "u_shape,v_shape,match",
    [
        ((4, 5), (4, 5), r"rank r = 5 .* must be in \[1, Z\] with Z = 4"),
        ((4,), (4,), r"u must have shape \[Z, r\] .* got \(4,\)"),
        ((4, 2), (3, 2), r"same shape \[Z, r\]; got u \(4, 2\) and v \(3, 2\)"),
        ((4, 0), (4, 0), r"rank r = 0"),
    ],
)
def test_bad_shapes_are_rejected(u_shape, v_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        st.LowRankTransition(torch.zeros(u_shape), torch.zeros(v_shape))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_rejected(value: float) -> None:
    v = torch.zeros(4, 2)
    v[2, 1] = value
    with pytest.raises(ValueError, match=r"v must be finite .* v\[\(2, 1\)\] = "):
        st.LowRankTransition(torch.zeros(4, 2), v)


def test_integer_parameters_are_rejected() -> None:
    with pytest.raises(TypeError, match="u"):
        st.LowRankTransition(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2))


def test_state_count_must_match_emissions() -> None:
    transition = st.LowRankTransition(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"Z = 4 states .* emission_logits has Z = 3"):
        st.HMM(torch.zeros(3), transition, torch.zeros(3, 5), torch.zeros(1, 2, dtype=torch.long))


def test_observation_outside_vocabulary_is_rejected() -> None:
    transition = st.LowRankTransition(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="observations"):
        st.HMM(torch.zeros(3), transition, torch.zeros(3, 5), torch.tensor([[0, 5]]))


def test_impossible_observations_are_reported_not_nan() -> None:
    emission = torch.zeros(3, 4)
    emission[:, 2] = float("-inf")  # no state emits word 2
    transition = st.LowRankTransition(torch.zeros(3, 2), torch.zeros(3, 2))
    hmm = st.HMM(torch.zeros(3), transition, emission, torch.tensor([[0, 2, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match=r"no structure has finite score at batch index \(0,\)"):
        _ = hmm.log_partition
    free = st.HMM(
        torch.zeros(3), transition, emission, torch.tensor([[0, 2, 1]]), validate_args=False
    )
    assert float(free.log_partition) == float("-inf")


def test_unsupported_operations_say_what_to_do() -> None:
    p = _draw(16, 1, 3, 3, 2, 2)
    low, _ = _pair(p)
    with pytest.raises(NotImplementedError, match=r"log_probs\(\)"):
        low.kl(low)


def test_topk_and_expand_match_dense() -> None:
    p = _draw(17, 2, 4, 4, 2, 3)
    low, dense = _pair(p)
    values, scores = low.topk(5)
    _, dense_scores = dense.topk(5)
    _close(scores, dense_scores)
    _close(low.log_prob(values), dense.log_prob(values))
    one = _pair({**p, "x": p["x"][:1], "lengths": p["lengths"][:1]})[0]
    grown = one.expand((3,))
    assert grown.batch_shape == (3,)
    _close(grown.log_partition, one.log_partition.expand(3))


def test_dense_hmm_evidence_gradient_never_forms_per_step_pair_buffers() -> None:
    # Shared dense transitions: d log p(x) / d log P is summed over steps inside the kernel,
    # per sequence ([B, 1, Z, Z]: the upstream gradient weights each sequence), so nothing of
    # size B (T-1) Z^2 exists (4x more here).
    Z, B, T, V = 256, 3, 5, 7
    g = seeded(21)
    leaves = [
        torch.randn(*shape, generator=g).requires_grad_(True) for shape in ((Z,), (Z, Z), (Z, V))
    ]
    x = torch.randint(V, (B, T), generator=g)
    with _LargestTensor() as mode:
        hmm = st.HMM(*leaves, x)
        hmm.log_partition.sum().backward()
    assert mode.largest <= max(B * Z * Z, B * T * Z, Z * V) < B * (T - 1) * Z * Z, mode.largest
    # ... and the gradients are those through the posterior CRF (whose binary is expanded).
    mine = [x.grad.clone() for x in leaves]
    for x_ in leaves:
        x_.grad = None
    st.HMM(*leaves, x).posterior.log_partition.sum().backward()
    for a, b in zip(mine, (x_.grad for x_ in leaves)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
