"""Tests of structift.layers.attention: softmax, sparsemax and structured (CRF) attention.

References are independent of the library: brute-force enumeration of all 2^T selections in
float64 (marginals and their covariance = the Jacobian), the sigmoid closed form at zero pairwise
potentials, torch.softmax, and the sort-based sparsemax closed form written below.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch.autograd import gradcheck, gradgradcheck

from structift.layers import StructuredAttention, attention_weights, structured_attention
from structift.layers.attention import GRADIENTS
from tests.seeding import examples, seeded, shift

# every (kind, gradient) pair the layers accept
MODES = [
    ("softmax", "autograd"),
    ("sparsemax", "autograd"),
    *(("structured", g) for g in GRADIENTS),
]

# ------------------------------------------------------------------------------------------
# references


def brute_force_selection(scores: torch.Tensor, binary: torch.Tensor, length: int):
    """Enumerate all 2^L selections of one sequence; return (marginals [L], covariance [L, L]).

    scores [T] and binary [T-1, 2, 2] ([from, to]); only the first ``length`` keys count.
    p(z) ∝ exp(Σ_t z_t s_t + Σ_t binary[t, z_t, z_{t+1}]).
    """
    s, P = scores.double().cpu(), binary.double().cpu()
    zs = torch.tensor(list(itertools.product([0, 1], repeat=length)), dtype=torch.float64)
    logits = zs @ s[:length]
    for t in range(length - 1):
        logits = logits + P[t][zs[:, t].long(), zs[:, t + 1].long()]
    p = torch.softmax(logits, 0)
    mean = p @ zs
    second = zs.T @ (p[:, None] * zs)
    return mean, second - torch.outer(mean, mean)


def sparsemax_reference(x: torch.Tensor) -> torch.Tensor:
    """Closed form of Martins & Astudillo (arXiv:1602.02068) on a 1-D tensor.

    Shifted by the max first (sparsemax is shift invariant): then z_(1) = 0 and k = 1 passes
    the support test exactly, which rounding breaks at large |x| without the shift.
    """
    z, _ = torch.sort(x - x.max(), descending=True)
    k = torch.arange(1, len(z) + 1, dtype=x.dtype, device=x.device)
    cumsum = torch.cumsum(z, 0)
    support = 1 + k * z > cumsum
    k_max = int(support.nonzero().max()) + 1
    tau = (cumsum[k_max - 1] - 1) / k_max
    return torch.clamp(x - x.max() - tau, min=0)


def random_problem(B, M, T, device, dtype=torch.float64, seed=0):
    g = seeded(seed)
    scores = (torch.randn(B, M, T, generator=g, dtype=dtype) * 2).to(device)
    binary = (torch.randn(B, 1, T - 1, 2, 2, generator=g, dtype=dtype) * 2).to(device)
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(device)
    return scores, binary, lengths


# ------------------------------------------------------------------------------------------
# structured weights: values


@pytest.mark.parametrize("T", [1, 2, 5, 7])
def test_structured_weights_match_brute_force(device, T):
    scores, binary, lengths = random_problem(3, 2, T, device, seed=T)
    w = attention_weights(scores, lengths, binary=binary)
    assert w.shape == scores.shape and w.device == scores.device
    for b in range(3):
        L = int(lengths[b])
        for m in range(2):
            mean, _ = brute_force_selection(scores[b, m], binary[b, 0], L)
            torch.testing.assert_close(w[b, m, :L].cpu(), mean, rtol=1e-10, atol=1e-12)
            assert (w[b, m, L:] == 0).all()


@given(
    T=hs.integers(1, 6),
    B=hs.integers(1, 3),
    seed=hs.integers(0, 2**16),
    spread=hs.sampled_from([0.1, 3.0, 20.0]),
)
def test_structured_weights_brute_force_property(T, B, seed, spread):
    g = seeded(seed)
    scores = torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    binary = torch.randn(B, T - 1, 2, 2, generator=g, dtype=torch.float64) * spread
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    w = attention_weights(scores, lengths, binary=binary)
    assert ((w >= 0) & (w <= 1 + 1e-12)).all()  # marginals, up to rounding
    for b in range(B):
        L = int(lengths[b])
        mean, _ = brute_force_selection(scores[b], binary[b], L)
        torch.testing.assert_close(w[b, :L], mean, rtol=1e-9, atol=1e-11)


def test_zero_pairwise_is_independent_sigmoid(device):
    scores = torch.randn(4, 9, dtype=torch.float64, device=device)
    w = attention_weights(scores, binary=torch.zeros(2, 2, dtype=torch.float64, device=device))
    torch.testing.assert_close(w, torch.sigmoid(scores))
    torch.testing.assert_close(attention_weights(scores), torch.sigmoid(scores))


def test_neg_inf_score_switches_key_off(device):
    scores, binary, _ = random_problem(2, 1, 5, device)
    scores[:, :, 2] = float("-inf")
    w = attention_weights(scores, binary=binary)
    assert (w[:, :, 2] == 0).all() and torch.isfinite(w).all()
    mean, _ = brute_force_selection(scores[0, 0].clamp_min(-1e4), binary[0, 0], 5)
    torch.testing.assert_close(w[0, 0].cpu(), mean)


def test_normalized_structured_weights_sum_to_one(device):
    scores, binary, lengths = random_problem(3, 2, 6, device)
    w = attention_weights(scores, lengths, binary=binary, normalize=True)
    raw = attention_weights(scores, lengths, binary=binary)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
    torch.testing.assert_close(w, raw / raw.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------------------
# structured weights: gradients


def test_structured_jacobian_is_brute_force_covariance(device):
    """d p(z_t = 1) / d s_u = Cov(z_t, z_u): the Hessian of the log-partition."""
    T = 5
    scores, binary, lengths = random_problem(2, 1, T, device)
    lengths[:] = torch.tensor([T, 3])
    jac = torch.autograd.functional.jacobian(
        lambda s: attention_weights(s, lengths, binary=binary), scores
    )  # shape: (B, 1, T, B, 1, T)
    for b in range(2):
        L = int(lengths[b])
        _, cov = brute_force_selection(scores[b, 0], binary[b, 0], L)
        torch.testing.assert_close(jac[b, 0, :L, b, 0, :L].cpu(), cov)
        assert (jac[b, 0, L:] == 0).all() and (jac[b, 0, :, b, 0, L:] == 0).all()
        assert (jac[b, 0, :, 1 - b] == 0).all()  # no cross-talk between sequences


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_structured_gradcheck(device, gradient):
    scores, binary, lengths = random_problem(2, 2, 4, device)
    scores.requires_grad_(True)
    binary.requires_grad_(True)

    def f(s, p):
        return attention_weights(s, lengths, binary=p, gradient=gradient)

    assert gradcheck(f, (scores, binary))


def test_structured_gradgradcheck(device):
    scores, binary, lengths = random_problem(2, 1, 4, device)
    scores.requires_grad_(True)
    binary.requires_grad_(True)
    assert gradgradcheck(lambda s, p: attention_weights(s, lengths, binary=p), (scores, binary))


@given(T=hs.integers(1, 6), seed=hs.integers(0, 2**16), off=hs.integers(-1, 5))
def test_ift_and_autograd_gradients_agree(T, seed, off):
    """Same weights and gradients, also with a key switched off by a -inf score (key `off`)."""
    g = seeded(seed)
    scores = torch.randn(2, T, generator=g, dtype=torch.float64)
    if 0 <= off < T:
        scores[0, off] = float("-inf")
    scores.requires_grad_(True)
    binary = torch.randn(2, T - 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, T + 1, (2,), generator=g)
    cotangent = torch.randn(2, T, generator=g, dtype=torch.float64)
    grads = {}
    for mode in GRADIENTS:
        w = attention_weights(scores, lengths, binary=binary, gradient=mode)
        # T = 1 leaves binary empty and unused by the IFT graph: materialize its (empty) gradient
        g_s, g_p = torch.autograd.grad(
            (w * cotangent).sum(), (scores, binary), allow_unused=True, materialize_grads=True
        )
        grads[mode] = (w, g_s, g_p)
    for a, b in zip(grads["autograd"], grads["ift"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_module_gradient_modes_agree(device):
    """The layer's parameter gradients match between double backward and the IFT."""
    g = seeded(3)
    q = torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(3, 6, 4, generator=g, dtype=torch.float64).to(device)
    lengths = torch.tensor([6, 2, 4], device=device)
    grads = {}
    for mode in GRADIENTS:
        torch.manual_seed(shift(0))
        layer = StructuredAttention(4, 4, gradient=mode).to(device, torch.float64)
        with torch.no_grad():
            assert layer.pairwise is not None and layer.bias is not None
            layer.pairwise.copy_(torch.tensor([[0.5, -1.0], [-1.5, 2.0]]))
            layer.bias.fill_(-0.3)
        out = layer(q, k, lengths=lengths)
        out.context.sin().sum().backward()
        grads[mode] = [out.weights.detach()] + [p.grad for p in layer.parameters()]
    for a, b in zip(grads["autograd"], grads["ift"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------------
# padding and batching


@given(T=hs.integers(1, 6), pad=hs.integers(1, 3), seed=hs.integers(0, 2**16))
def test_padding_invariance(T, pad, seed):
    """Appending padded keys (holding garbage, even NaN) changes neither weights nor grads."""
    g = seeded(seed)
    s = torch.randn(1, T, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(1, T - 1, 2, 2, generator=g, dtype=torch.float64)
    garbage = torch.full((1, pad), float("nan"), dtype=torch.float64)
    padded = torch.cat([s, garbage], -1)
    p_pad = torch.cat([p, torch.randn(1, pad, 2, 2, generator=g, dtype=torch.float64)], 1)
    lengths = torch.tensor([T])
    cot = torch.randn(1, T + pad, generator=g, dtype=torch.float64)
    for kind, extra in (("structured", {"binary": p}), ("softmax", {}), ("sparsemax", {})):
        w = attention_weights(s, kind=kind, **extra)
        extra_pad = {"binary": p_pad} if extra else {}
        w_pad = attention_weights(padded, lengths, kind=kind, **extra_pad)
        torch.testing.assert_close(w_pad[:, :T], w)
        assert (w_pad[:, T:] == 0).all()
        (grad,) = torch.autograd.grad((w * cot[:, :T]).sum(), s)
        (grad_pad,) = torch.autograd.grad((w_pad * cot).sum(), s)
        torch.testing.assert_close(grad_pad, grad)


@given(
    T=hs.integers(1, 6),
    B=hs.integers(1, 4),
    kind=hs.sampled_from(["structured", "softmax", "sparsemax"]),
    seed=hs.integers(0, 2**16),
)
def test_batch_equals_stacked_singles(T, B, kind, seed):
    g = seeded(seed)
    q = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, 3, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, 4, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    binary = torch.randn(2, 2, generator=g, dtype=torch.float64)
    extra = {"binary": binary} if kind == "structured" else {}
    out = structured_attention(q, k, v, lengths, kind=kind, **extra)
    for b in range(B):
        L = int(lengths[b])
        one = (q[b : b + 1], k[b : b + 1, :L], v[b : b + 1, :L])
        single = structured_attention(*one, kind=kind, **extra)
        torch.testing.assert_close(out.weights[b : b + 1, :, :L], single.weights)
        torch.testing.assert_close(out.context[b : b + 1], single.context)


def test_mask_equals_lengths(device):
    scores, binary, lengths = random_problem(3, 1, 5, device)
    mask = torch.arange(5, device=device) < lengths[:, None, None]
    for kind, extra in (("structured", {"binary": binary}), ("softmax", {}), ("sparsemax", {})):
        a = attention_weights(scores, lengths, kind=kind, **extra)
        b = attention_weights(scores, mask=mask, kind=kind, **extra)
        torch.testing.assert_close(a, b)


def test_cpu_lengths_follow_the_scores(device):
    scores, binary, lengths = random_problem(3, 1, 5, device)
    for kind, extra in (("structured", {"binary": binary}), ("softmax", {}), ("sparsemax", {})):
        a = attention_weights(scores, lengths, kind=kind, **extra)
        b = attention_weights(scores, lengths.cpu(), kind=kind, **extra)
        assert b.device == scores.device
        torch.testing.assert_close(a, b)


def _attend_with_grads(q, k, v, binary, cot_context, cot_weights, **kwargs):
    """Run structured_attention; return (context, weights, d/dq, d/dk, d/dv[, d/dbinary])."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    if binary is not None:
        leaves.append(binary.detach().clone().requires_grad_(True))
        kwargs["binary"] = leaves[-1]
    out = structured_attention(*leaves[:3], **kwargs)
    loss = (out.context * cot_context).sum() + (out.weights * cot_weights).sum()
    return (out.context, out.weights, *torch.autograd.grad(loss, leaves))


@settings(max_examples=examples(40))
@given(
    T=hs.integers(1, 4),
    pad=hs.integers(1, 2),
    M=hs.sampled_from([None, 1, 2]),
    mode=hs.sampled_from(MODES),
    garbage=hs.sampled_from([float("nan"), float("inf"), float("-inf")]),
    poisoned=hs.sampled_from(["key", "value", "both"]),
    by=hs.sampled_from(["lengths", "mask", "per-query lengths"]),
    seed=hs.integers(0, 2**16),
)
def test_padded_keys_and_values_never_leak(T, pad, M, mode, garbage, poisoned, by, seed):
    """NaN/inf in padded key or value rows changes no output and no gradient: the gradients at
    padded rows are exactly 0 and everything equals, bit for bit, a run with zeros there."""
    kind, gradient = mode
    g = seeded(seed)
    B, D, Dv, L = 3, 3, 2, T + pad
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    if M is not None:
        q = torch.randn(B, M, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, L, Dv, generator=g, dtype=torch.float64)
    out_shape = (B, Dv) if M is None else (B, M, Dv)
    w_shape = (B, L) if M is None else (B, M, L)
    cot_context = torch.randn(out_shape, generator=g, dtype=torch.float64)
    cot_weights = torch.randn(w_shape, generator=g, dtype=torch.float64)
    binary = torch.randn(2, 2, generator=g, dtype=torch.float64) if kind == "structured" else None
    kwargs = {"kind": kind, "gradient": gradient}
    if by == "per-query lengths" and M is not None:
        lengths = torch.randint(1, T + 1, (B, M), generator=g)  # one length per query
        kwargs["lengths"] = lengths
        padded = torch.arange(L) >= lengths.amax(1, keepdim=True)  # no query sees these keys
    else:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        padded = torch.arange(L) >= lengths[:, None]  # shape: (B, L)
        if by == "mask":
            kwargs["mask"] = ~padded
        else:
            kwargs["lengths"] = lengths
    rows = padded[..., None]
    clean_k, clean_v = k.masked_fill(rows, 0.0), v.masked_fill(rows, 0.0)
    dirty_k = k.masked_fill(rows, garbage) if poisoned != "value" else clean_k
    dirty_v = v.masked_fill(rows, garbage) if poisoned != "key" else clean_v
    clean = _attend_with_grads(q, clean_k, clean_v, binary, cot_context, cot_weights, **kwargs)
    dirty = _attend_with_grads(q, dirty_k, dirty_v, binary, cot_context, cot_weights, **kwargs)
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    _, weights, _, grad_k, grad_v, *_ = dirty
    assert (grad_k[padded] == 0).all() and (grad_v[padded] == 0).all()
    assert (weights.reshape(B, -1, L).transpose(0, 1)[:, padded] == 0).all()


@pytest.mark.parametrize(("kind", "gradient"), MODES)
def test_module_ignores_nonfinite_padding(device, kind, gradient):
    """The layer (query projection, learned bias and potentials) too, on every device."""
    torch.manual_seed(shift(0))
    layer = StructuredAttention(3, query_dim=2, kind=kind, gradient=gradient)
    layer = layer.to(device, torch.float64)
    if layer.pairwise is not None:
        with torch.no_grad():
            layer.pairwise.copy_(torch.tensor([[0.2, -1.0], [-0.5, 1.5]]))
    g = seeded(4)
    q = torch.randn(3, 2, 2, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(3, 5, 3, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(3, 5, 4, generator=g, dtype=torch.float64).to(device)
    lengths = torch.tensor([5, 2, 3])
    padded = (torch.arange(5) >= lengths[:, None]).to(device)[..., None]
    runs = []
    for fill_k, fill_v in ((0.0, 0.0), (float("nan"), float("inf"))):
        layer.zero_grad()
        k_, v_ = k.masked_fill(padded, fill_k), v.masked_fill(padded, fill_v)
        k_.requires_grad_(True)
        v_.requires_grad_(True)
        out = layer(q, k_, v_, lengths)
        (out.context.sin().sum() + out.weights.square().sum()).backward()
        assert k_.grad is not None and v_.grad is not None
        grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
        runs.append([out.context.detach(), out.weights.detach(), k_.grad, v_.grad, *grads])
    assert len(runs[1]) == len(runs[0]) == 4 + len(list(layer.parameters()))
    for a, b in zip(*runs):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# softmax and sparsemax kinds


def test_softmax_kind_matches_torch(device):
    scores, _, lengths = random_problem(3, 2, 6, device)
    w = attention_weights(scores, lengths, kind="softmax")
    for b in range(3):
        L = int(lengths[b])
        torch.testing.assert_close(w[b, :, :L], torch.softmax(scores[b, :, :L], -1))
        assert (w[b, :, L:] == 0).all()


@given(T=hs.integers(1, 8), seed=hs.integers(0, 2**16), spread=hs.sampled_from([0.1, 1.0, 5.0]))
def test_sparsemax_kind_matches_closed_form(T, seed, spread):
    g = seeded(seed)
    scores = torch.randn(3, T, generator=g, dtype=torch.float64) * spread
    lengths = torch.randint(1, T + 1, (3,), generator=g)
    w = attention_weights(scores, lengths, kind="sparsemax")
    for b in range(3):
        L = int(lengths[b])
        torch.testing.assert_close(w[b, :L], sparsemax_reference(scores[b, :L]))
        assert (w[b, L:] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(3, dtype=torch.float64))


def test_sparsemax_kind_on_device(device):
    scores, _, lengths = random_problem(3, 2, 6, device)
    w = attention_weights(scores, lengths, kind="sparsemax")
    for b in range(3):
        L = int(lengths[b])
        for m in range(2):
            torch.testing.assert_close(w[b, m, :L], sparsemax_reference(scores[b, m, :L]))


def test_sparsemax_kind_at_large_scores_reproducer():
    """Issue 10, section 4: the sort-based threshold lost the support at large scores."""
    w = attention_weights(torch.tensor([[2e7, 0.0]]), kind="sparsemax")
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0]]), rtol=0, atol=0)
    # and through the dot products: scores of about ±1e8 select the best key alone
    q = torch.full((2, 4), 1e4)
    k = torch.tensor([[1.0, -1.0, 2.0], [3.0, 1.0, -2.0]])[..., None] * torch.full((4,), 1e4)
    v = torch.randn(2, 3, 5, generator=seeded(7))
    out = structured_attention(q, k, v, torch.tensor([3, 1]), kind="sparsemax")
    torch.testing.assert_close(out.weights, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.context, torch.stack([v[0, 2], v[1, 0]]))


@settings(max_examples=examples(60))
@given(
    dtype=hs.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    T=hs.integers(1, 6),
    log_scale=hs.floats(0, 1),
    seed=hs.integers(0, 2**16),
)
def test_sparsemax_kind_at_any_magnitude(dtype, T, log_scale, seed):
    """Weights sum to one and equal the float64 projection of the rounded scores on the valid
    prefix, at scales up to finfo.max / 4 (the error bound of tests/layers/test_sparsemax.py:
    T + 2 roundings in the working precision, one in the dtype)."""
    top = torch.finfo(dtype).max / 4
    g = seeded(seed)
    scale = top**log_scale
    scores = (torch.rand(2, T, generator=g, dtype=torch.float64) * 2 - 1) * scale
    scores[:, 0] = top * torch.sign(scores[:, 0])  # an extreme entry in every row
    scores = scores.clamp(-top, top).to(dtype)
    lengths = torch.randint(1, T + 1, (2,), generator=g)
    w = attention_weights(scores, lengths, kind="sparsemax")
    work = torch.float32 if torch.finfo(dtype).bits < 32 else dtype
    atol = (T + 2) * torch.finfo(work).eps + torch.finfo(dtype).eps
    assert w.dtype == dtype and (w >= 0).all()
    for b in range(2):
        n = int(lengths[b])
        ref = sparsemax_reference(scores[b, :n].double())
        torch.testing.assert_close(w[b, :n].double(), ref, rtol=0, atol=atol)
        assert (w[b, n:] == 0).all()
        assert abs(float(w[b].double().sum()) - 1) <= T * atol


@pytest.mark.parametrize("kind", ["softmax", "sparsemax"])
def test_simplex_kinds_gradcheck(kind):
    scores, _, lengths = random_problem(2, 2, 5, "cpu")
    scores.requires_grad_(True)
    assert gradcheck(lambda s: attention_weights(s, lengths, kind=kind), (scores,))


# ------------------------------------------------------------------------------------------
# structured_attention and the module


@pytest.mark.parametrize("kind", ["structured", "softmax", "sparsemax"])
def test_context_is_weighted_sum_of_values(device, kind):
    g = seeded(1)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device)
    k = torch.randn(2, 5, 4, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(2, 5, 6, generator=g, dtype=torch.float64).to(device)
    lengths = torch.tensor([5, 2], device=device)
    out = structured_attention(q, k, v, lengths, kind=kind)
    scores = q @ k.transpose(1, 2) / 2.0
    torch.testing.assert_close(out.weights, attention_weights(scores, lengths, kind=kind))
    torch.testing.assert_close(out.context, out.weights @ v)
    one = structured_attention(q[:, 0], k, v, lengths, kind=kind)  # [B, D] query
    torch.testing.assert_close(one.weights, out.weights[:, 0])
    torch.testing.assert_close(one.context, out.context[:, 0])


def test_structured_attention_gradcheck_through_query_key_value():
    g = seeded(2)
    q = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 3])
    assert gradcheck(
        lambda q, k, v, p: structured_attention(q, k, v, lengths, binary=p).context, (q, k, v, p)
    )


@pytest.mark.parametrize("kind", ["structured", "softmax", "sparsemax"])
def test_module_forward_and_learns(device, kind):
    torch.manual_seed(shift(0))
    layer = StructuredAttention(4, query_dim=3, kind=kind).to(device)
    q = torch.randn(5, 3, device=device)
    k = torch.randn(5, 7, 4, device=device)
    lengths = torch.tensor([7, 1, 3, 5, 6], device=device)
    out = layer(q, k, lengths=lengths)
    assert out.context.shape == (5, 4) and out.weights.shape == (5, 7)
    pad = torch.arange(7, device=device) >= lengths[:, None]
    assert (out.weights[pad] == 0).all()
    out.context.square().sum().backward()
    assert layer.query_proj is not None and layer.query_proj.weight.grad is not None
    assert torch.isfinite(layer.query_proj.weight.grad).all()
    if kind == "structured":
        assert layer.pairwise is not None and layer.bias is not None
        assert layer.pairwise.grad is not None and layer.pairwise.grad.abs().sum() > 0
        assert layer.bias.grad is not None and layer.bias.grad != 0
        # the layer's weights are the CRF marginals of its scores with its potentials
        with torch.no_grad():
            s = torch.einsum("bd,btd->bt", layer.query_proj(q), k) / 2.0 + layer.bias
            ref = attention_weights(s, lengths, binary=layer.pairwise)
        torch.testing.assert_close(out.weights.detach(), ref)
    else:
        assert layer.pairwise is None


# ------------------------------------------------------------------------------------------
# empty batches


@pytest.mark.parametrize(("kind", "gradient"), MODES)
@pytest.mark.parametrize("M", [None, 2])
@pytest.mark.parametrize("lengths", [None, torch.zeros(0, dtype=torch.long)])
def test_empty_batch(kind, gradient, M, lengths):
    """B = 0: empty results of the right shapes, and empty gradients (issue 10, section 5)."""
    T, D, Dv = 4, 3, 5
    q = torch.randn((0, D) if M is None else (0, M, D), dtype=torch.float64, requires_grad=True)
    k = torch.randn(0, T, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(0, T, Dv, dtype=torch.float64, requires_grad=True)
    leaves = [q, k, v]
    kwargs = {"kind": kind, "gradient": gradient}
    if kind == "structured":
        binary = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
        leaves.append(binary)
        kwargs["binary"] = binary
    out = structured_attention(q, k, v, lengths, **kwargs)
    batch = (0,) if M is None else (0, M)
    assert out.context.shape == (*batch, Dv) and out.weights.shape == (*batch, T)
    grads = torch.autograd.grad(out.context.sum() + out.weights.sum(), leaves, allow_unused=True)
    for x, grad in zip(leaves, grads):
        assert grad is None or (grad.shape == x.shape and (grad == 0).all())
    assert all(grad is not None for grad in grads[:3])
    scores = torch.randn(*batch, T, dtype=torch.float64, requires_grad=True)
    extra = {"binary": kwargs["binary"]} if kind == "structured" else {}
    w = attention_weights(scores, lengths, kind=kind, gradient=gradient, **extra)
    assert w.shape == scores.shape
    (grad,) = torch.autograd.grad(w.sum(), scores)
    assert grad.shape == scores.shape


@pytest.mark.parametrize(("kind", "gradient"), MODES)
def test_module_empty_batch(kind, gradient):
    layer = StructuredAttention(3, query_dim=2, kind=kind, gradient=gradient)
    out = layer(torch.randn(0, 2), torch.randn(0, 4, 3), torch.randn(0, 4, 6))
    assert out.context.shape == (0, 6) and out.weights.shape == (0, 4)
    out.context.sum().backward()
    assert layer.query_proj is not None and layer.query_proj.weight.grad is not None
    assert (layer.query_proj.weight.grad == 0).all()


# ------------------------------------------------------------------------------------------
# validation


def test_errors_name_the_argument():
    s = torch.randn(2, 4)
    with pytest.raises(ValueError, match="kind"):
        attention_weights(s, kind="hard")
    with pytest.raises(ValueError, match="gradient"):
        attention_weights(s, gradient="unrolled")
    with pytest.raises(ValueError, match="scores"):
        attention_weights(torch.randn(4))
    with pytest.raises(TypeError, match="scores"):
        attention_weights(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        attention_weights(s, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="lengths"):
        attention_weights(s, torch.tensor([2, 5]))
    with pytest.raises(ValueError, match="lengths"):
        attention_weights(s, torch.tensor([2, 3, 4]))
    with pytest.raises(TypeError, match="lengths"):
        attention_weights(s, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="either lengths or mask"):
        attention_weights(s, torch.tensor([2, 3]), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="prefix"):
        attention_weights(s, mask=torch.tensor([[True, False, True, False]] * 2))
    with pytest.raises(TypeError, match="mask"):
        attention_weights(s, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        attention_weights(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        attention_weights(torch.tensor([[0.0, float("inf")]]), kind="softmax")
    with pytest.raises(ValueError, match="finite score"):
        attention_weights(torch.full((1, 3), float("-inf")), kind="sparsemax")
    with pytest.raises(ValueError, match="binary"):
        attention_weights(s, binary=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="binary"):
        attention_weights(s, binary=torch.zeros(5, 2, 2))
    with pytest.raises(ValueError, match="binary"):
        attention_weights(s, binary=torch.tensor([[0.0, float("nan")], [0.0, 0.0]]))
    with pytest.raises(TypeError, match="binary"):
        attention_weights(s, binary=torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="structured"):
        attention_weights(s, kind="softmax", binary=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="structured"):
        StructuredAttention(4, kind="sparsemax", normalize=True)


def test_query_key_value_errors():
    q, k, v = torch.randn(2, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="query"):
        structured_attention(torch.randn(2, 4), k, v)
    with pytest.raises(ValueError, match="query"):
        structured_attention(torch.randn(3, 3), k, v)
    with pytest.raises(ValueError, match="key"):
        structured_attention(q, torch.randn(2, 5), v)
    with pytest.raises(ValueError, match="value"):
        structured_attention(q, k, torch.randn(2, 4, 4))
    with pytest.raises(TypeError, match="query"):
        structured_attention(q.double(), k, v)
    with pytest.raises(TypeError, match="value"):
        structured_attention(q, k, [1, 2])  # type: ignore[arg-type]


def test_padded_garbage_is_not_an_error():
    s = torch.tensor([[0.5, -1.0, float("nan"), float("inf")]])
    for kind in ("structured", "softmax", "sparsemax"):
        w = attention_weights(s, torch.tensor([2]), kind=kind)
        assert torch.isfinite(w).all() and (w[:, 2:] == 0).all()


def test_infeasible_pairwise_potentials_raise():
    """With -inf pairwise potentials a sequence may have no selection of finite score."""
    forbid_all = torch.full((2, 2), float("-inf"))
    with pytest.raises(ValueError, match="finite score"):
        attention_weights(torch.randn(1, 3), binary=forbid_all)
    # forbidding only switches is feasible: all-0 or all-1, never NaN
    stay = torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]], dtype=torch.float64)
    s = torch.randn(2, 4, dtype=torch.float64)
    w = attention_weights(s, binary=stay)
    torch.testing.assert_close(w, torch.sigmoid(s.sum(-1, keepdim=True)).expand(2, 4))


def test_bool_lengths_are_rejected_as_a_mask():
    """A bool tensor is a mask, not lengths: it used to be read as lengths 0 and 1."""
    s = torch.randn(2, 4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for bad in (mask, mask[:, 0]):
        with pytest.raises(TypeError, match=r"lengths.*bool.*mask\.sum\(-1\)"):
            attention_weights(s, bad)
        with pytest.raises(TypeError, match=r"lengths.*mask"):
            structured_attention(torch.randn(2, 3), torch.randn(2, 4, 3), lengths=bad)
        with pytest.raises(TypeError, match=r"lengths.*mask"):
            StructuredAttention(3)(torch.randn(2, 3), torch.randn(2, 4, 3), lengths=bad)
    # the advice works
    torch.testing.assert_close(
        attention_weights(s, mask.sum(-1)), attention_weights(s, mask=mask), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", ["query", "key", "value"])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.complex64])
def test_non_float_query_key_value_name_the_argument(name, dtype):
    args = {"query": torch.randn(2, 3), "key": torch.randn(2, 4, 3), "value": torch.randn(2, 4, 5)}
    args[name] = torch.ones_like(args[name]).to(dtype)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor.*{dtype}"):
        structured_attention(args["query"], args["key"], args["value"])
    layer = StructuredAttention(3, query_dim=3, kind="softmax")
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor.*{dtype}"):
        layer(args["query"], args["key"], args["value"])


def test_feature_size_mismatches_name_both_dims():
    k = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"query has feature size 5.*query_dim=2"):
        StructuredAttention(3, query_dim=2)(torch.randn(2, 5), k)
    with pytest.raises(ValueError, match=r"query has feature size 5.*key_dim=3"):
        StructuredAttention(3)(torch.randn(2, 5), k)
    with pytest.raises(ValueError, match=r"key has feature size 3.*key_dim=4"):
        StructuredAttention(4, query_dim=2)(torch.randn(2, 2), k)


def test_zero_feature_size_is_rejected():
    with pytest.raises(ValueError, match=r"key.*D = 0"):
        structured_attention(torch.randn(2, 0), torch.randn(2, 4, 0), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match=r"key.*D = 0"):
        structured_attention(torch.randn(2, 3, 0), torch.randn(2, 4, 0), kind="softmax")
    with pytest.raises(ValueError, match="key_dim"):
        StructuredAttention(0)
    with pytest.raises(ValueError, match="query_dim"):
        StructuredAttention(3, query_dim=0)
    with pytest.raises(TypeError, match="key_dim"):
        StructuredAttention(3.0)  # type: ignore[arg-type]
