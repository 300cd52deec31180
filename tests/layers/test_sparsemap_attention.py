"""SparseMAP attention (issue 13, §5): the selection chain's L2-regularized marginals."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import structift as st
from structift.layers import (
    SparseMAPWeights,
    StructuredAttention,
    attend,
    attention_weights,
    qp_solve,
    structured_attention,
)
from structift.variational import sparsemap
from tests.seeding import examples, seeded

F64 = torch.float64


def _selection_qp(scores: torch.Tensor, binary: torch.Tensor, tau: float) -> torch.Tensor:
    """SparseMAP of one binary selection chain as a QP over its enumerated vertices (float64).

    Weights w ≥ 0 on the 2^T selections, Σw = 1; maximize Σ_y w_y ⟨θ, φ(y)⟩ − (τ/2)‖Σ w_y φ_U(y)‖²
    (``qp_solve`` minimizes ½ wᵀ Q w + qᵀ w), then μ_t(1) = Σ_y w_y y_t. Shares no code with
    the active-set forward.
    """
    T = scores.shape[0]
    ys = torch.tensor(list(itertools.product((0, 1), repeat=T)), dtype=F64)  # shape: (2^T, T)
    U = torch.cat([1 - ys, ys], -1)  # one-hot unary statistics, (2^T, 2T)
    c = (ys * scores).sum(-1)
    if T > 1:
        idx = ys.long()
        c = c + binary[idx[:, :-1], idx[:, 1:]].sum(-1)
    n = ys.shape[0]
    Q = tau * U @ U.T + 1e-9 * torch.eye(n, dtype=F64)
    G, h = -torch.eye(n, dtype=F64), torch.zeros(n, dtype=F64)
    A, b = torch.ones(1, n, dtype=F64), torch.ones(1, dtype=F64)
    w = qp_solve(Q[None], -c[None], G[None], h[None], A[None], b[None])[0]
    return w @ ys


@settings(max_examples=examples(10), deadline=None)
@given(data=hst.data())
def test_weights_equal_an_enumerated_qp(data) -> None:
    g = seeded(data.draw(hst.integers(0, 2**16)))
    T = data.draw(hst.integers(1, 5))
    tau = data.draw(hst.sampled_from([0.5, 1.0, 2.0]))
    scores = torch.randn(1, T, dtype=F64, generator=g) * 2
    binary = torch.randn(2, 2, dtype=F64, generator=g)
    w = attention_weights(scores, kind="sparsemap", binary=binary) if tau == 1.0 else None
    if w is None:
        w = SparseMAPWeights(binary, temperature=tau)(
            scores, torch.tensor([T]), torch.ones(1, T, dtype=torch.bool)
        )
    ref = _selection_qp(scores[0], binary, tau)
    torch.testing.assert_close(w[0], ref, atol=1e-6, rtol=0)


def test_weights_are_sparse_runs_zero_on_padding_and_match_sparsemap() -> None:
    g = seeded(1)
    scores = torch.randn(4, 9, dtype=F64, generator=g) * 3
    binary = torch.tensor([[1.0, -1.0], [-1.0, 1.5]], dtype=F64)
    lengths = torch.tensor([9, 6, 3, 1])
    w = attention_weights(scores, lengths, kind="sparsemap", binary=binary)
    for b, n in enumerate(lengths.tolist()):
        assert (w[b, n:] == 0).all()
        unary = torch.stack([torch.zeros(n, dtype=F64), scores[b, :n]], -1)[None]
        crf = st.LinearChainCRF(unary, binary.expand(1, max(n - 1, 0), 2, 2))
        torch.testing.assert_close(w[b, :n], sparsemap(crf).marginals.unary[0, :, 1])
    assert ((w == 0) | (w == 1)).float().mean() > 0.5  # most weights are exactly 0 or 1


def test_gradients_match_finite_differences() -> None:
    g = seeded(2)
    scores = torch.randn(2, 6, dtype=F64, generator=g).requires_grad_()
    binary = torch.tensor([[0.5, -1.0], [-0.7, 1.0]], dtype=F64, requires_grad=True)
    lengths = torch.tensor([6, 4])

    def f(s, b):
        return attention_weights(s, lengths, kind="sparsemap", binary=b)

    assert torch.autograd.gradcheck(f, (scores, binary), atol=1e-6)


def test_small_temperature_selects_the_map_structure() -> None:
    g = seeded(3)
    scores = torch.randn(3, 7, dtype=F64, generator=g) * 2
    binary = torch.tensor([[0.3, -0.5], [-0.5, 0.8]], dtype=F64)
    lengths = torch.full((3,), 7)
    w = SparseMAPWeights(binary, temperature=1e-4)(scores, lengths, torch.ones(3, 7).bool())
    unary = torch.stack([torch.zeros_like(scores), scores], -1)
    tags = st.LinearChainCRF(unary, binary.expand(3, 6, 2, 2)).argmax
    torch.testing.assert_close(w, tags.to(F64))


def test_layer_learns_pairwise_potentials_and_rejects_foreign_options() -> None:
    g = seeded(4)
    layer = StructuredAttention(4, kind="sparsemap").double()
    q = torch.randn(3, 4, dtype=F64, generator=g)
    k = torch.randn(3, 5, 4, dtype=F64, generator=g)
    out = layer(q, k, k, torch.tensor([5, 3, 2]))
    out.context.sum().backward()
    assert layer.pairwise is not None and layer.pairwise.grad is not None
    assert torch.isfinite(layer.pairwise.grad).all() and layer.bias.grad is not None
    ref = attend(q, k, k, torch.tensor([5, 3, 2]), weights=SparseMAPWeights(layer.pairwise))
    torch.testing.assert_close(out.weights, ref.weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gradient applies to kind='structured' only"):
        StructuredAttention(4, kind="sparsemap", gradient="ift")
    with pytest.raises(ValueError, match="binary and normalize apply"):
        structured_attention(q, k, k, kind="softmax", normalize=True)
