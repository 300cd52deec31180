"""Attention by composition: weight objects and the one attend step (issue 11, §6)."""

from __future__ import annotations

import pytest
import torch

from structift.layers import (
    SelectionWeights,
    SoftmaxWeights,
    SparsemaxWeights,
    StructuredAttention,
    attend,
    attention_weights,
    structured_attention,
    weights_for,
)
from tests.seeding import seeded

F64 = torch.float64


def _inputs():
    g = seeded(0)
    q = torch.randn(3, 2, 4, dtype=F64, generator=g)
    k = torch.randn(3, 5, 4, dtype=F64, generator=g)
    v = torch.randn(3, 5, 6, dtype=F64, generator=g)
    return q, k, v, torch.tensor([5, 3, 1])


@pytest.mark.parametrize(
    ("kind", "weights"),
    [
        ("softmax", SoftmaxWeights()),
        ("sparsemax", SparsemaxWeights()),
        ("structured", SelectionWeights()),
    ],
)
def test_attend_with_an_object_equals_the_kind_form(kind, weights) -> None:
    q, k, v, lengths = _inputs()
    a = attend(q, k, v, lengths, weights=weights)
    b = structured_attention(q, k, v, lengths, kind=kind)
    torch.testing.assert_close(a.context, b.context, rtol=0, atol=0)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
    assert (a.weights[1, :, 3:] == 0).all() and (a.weights[2, :, 1:] == 0).all()


def test_selection_options_live_on_the_selection_weights() -> None:
    q, k, v, lengths = _inputs()
    theta = torch.tensor([[0.0, -1.0], [-1.0, 2.0]], dtype=F64, requires_grad=True)
    for gradient in ("autograd", "ift"):
        w = SelectionWeights(theta, gradient=gradient, normalize=True)
        out = attend(q, k, v, lengths, weights=w)
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(3, 2, dtype=F64))
        (g,) = torch.autograd.grad(out.context.sum(), theta)
        assert torch.isfinite(g).all()
    ref = attention_weights(
        torch.einsum("bmd,btd->bmt", q, k) / 2.0, lengths[:, None].expand(3, 2),
        binary=theta, normalize=True,
    )  # fmt: skip
    torch.testing.assert_close(attend(q, k, v, lengths, weights=w).weights, ref)


def test_options_of_another_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="apply to kind='structured' or 'sparsemap' only"):
        weights_for("softmax", normalize=True)
    with pytest.raises(ValueError, match="gradient to kind='structured' only"):
        weights_for("sparsemap", gradient="ift")
    with pytest.raises(ValueError, match="gradient must be one of"):
        SelectionWeights(gradient="unrolled")
    with pytest.raises(TypeError, match=r"weights must be a structift\.layers\.weights object"):
        attend(*_inputs()[:3], weights="softmax")  # type: ignore[arg-type]


def test_one_query_with_per_sequence_pairwise_potentials() -> None:
    q, k, v, lengths = _inputs()
    theta = torch.randn(3, 4, 2, 2, dtype=F64, generator=seeded(1))
    one = attend(q[:, 0], k, v, lengths, weights=SelectionWeights(theta))
    many = attend(q[:, :1], k, v, lengths, weights=SelectionWeights(theta.unsqueeze(1)))
    torch.testing.assert_close(one.context, many.context.squeeze(1))


def test_the_layer_builds_its_weights_from_its_parameters() -> None:
    torch.manual_seed(seeded(2).initial_seed())
    layer = StructuredAttention(4, kind="structured", gradient="ift").double()
    q, k, v, lengths = _inputs()
    with torch.no_grad():
        layer.pairwise.copy_(torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
        layer.bias.fill_(0.25)
    out = layer(q, k, v, lengths)
    w = SelectionWeights(layer.pairwise.detach(), gradient="ift")
    ref = attend(q, k, v, lengths, weights=w, bias=torch.tensor(0.25, dtype=F64))
    torch.testing.assert_close(out.context, ref.context)
