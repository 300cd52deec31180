"""Attention layers: softmax, sparsemax and structured (linear-chain CRF) attention.

Structured attention follows Kim, Denton, Hoang & Rush, "Structured Attention Networks"
(arXiv:1702.00887), segmentation attention: every key t carries a binary selection variable
z_t ∈ {0, 1}, and the selections form a linear-chain CRF

    p(z | x, q) ∝ exp( Σ_t z_t s_t + Σ_t θ(z_t, z_{t+1}) ),

whose unary potentials are the query–key scores s_t (the potential of z_t = 0 is 0) and whose
pairwise potentials θ ∈ R^{2×2} (laid out [from, to]) are learned. The attention weight of key t
is the marginal p(z_t = 1 | x, q): each weight lies in [0, 1], the weights need not sum to one,
and a positive θ(1, 1) makes contiguous spans of keys light up together.

Softmax (categorical) and sparsemax attention are the special cases of regularized argmax over
the simplex (entropy and squared-norm regularizer). Each kind of weights is an object
(``structift.layers.weights``: ``SoftmaxWeights``, ``SparsemaxWeights``, ``SelectionWeights``)
holding only its own options, and ``attend`` is the one attend step they share;
``attention_weights``/``structured_attention`` take a ``kind`` name for convenience and build
the object from it (``weights_for``).

Gradients of the structured weights flow either by autograd double-backward (the marginals are
the gradient of the log-partition A(θ), computed with ``create_graph=True``, so their Jacobian is
the Hessian ∇²A, the covariance of the sufficient statistics), or by the implicit function
theorem on the variational problem μ*(θ) = argmax_{μ ∈ M} ⟨θ, μ⟩ + H(μ) (``gradient="ift"``,
`structift.variational.regularized_argmax`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from structift.layers._attention_checks import (
    check_choice,
    check_layer_inputs,
    check_query_key_value,
    check_size,
    valid_mask,
)
from structift.layers.weights import (
    GRADIENTS,
    KINDS,
    AbstractWeights,
    SelectionWeights,
    SoftmaxWeights,
    SparseMAPWeights,
    weights_for,
)

__all__ = [
    "GRADIENTS",
    "KINDS",
    "Attention",
    "StructuredAttention",
    "attend",
    "attention_weights",
    "structured_attention",
]


class Attention(NamedTuple):
    """Result of an attention layer.

    Attributes:
        context: Weighted sum of the values, shape ``[B, M, Dv]`` (``[B, Dv]`` for one query).
        weights: Attention weights, shape ``[B, M, T]`` (``[B, T]`` for one query); exactly
            zero on padded keys.
    """

    context: Tensor
    weights: Tensor


# --------------------------------------------------------------------------------------------
# public API


def attention_weights(
    scores: Tensor,
    lengths: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    kind: str = "structured",
    binary: Tensor | None = None,
    gradient: str = "autograd",
    normalize: bool = False,
) -> Tensor:
    """Turn attention scores into weights: softmax, sparsemax or CRF selection marginals.

    ``kind="softmax"`` solves max_{w ∈ Δ} ⟨w, s⟩ + H(w); ``kind="sparsemax"`` solves
    min_{w ∈ Δ} ‖w − s‖² (Martins & Astudillo, arXiv:1602.02068); ``kind="structured"``
    returns w_t = p(z_t = 1) under the binary-selection chain CRF with unary potentials
    (0, s_t) and pairwise potentials ``binary`` (Kim et al., arXiv:1702.00887), i.e.
    w = ∇_s A(s, binary) where A is the log-partition.

    Args:
        scores: Query–key scores, shape ``[B, T]`` or ``[B, M, T]`` (M queries per sequence).
            Must not be NaN or +inf at valid keys; -inf switches a key off.
        lengths: Number of valid keys per sequence, LongTensor ``[B]`` (or the batch shape of
            ``scores``), values in ``[1, T]``, on any device. Keys beyond the length are
            padding and get weight exactly 0. Defaults to all keys valid. A bool tensor is
            refused (it is a mask: pass ``mask=`` or ``lengths=mask.sum(-1)``).
        mask: Alternative to ``lengths``: BoolTensor ``[B, T]`` (or the batch shape of
            ``scores`` plus T), True on a prefix of valid keys.
        kind: ``"softmax"``, ``"sparsemax"``, ``"structured"`` or ``"sparsemap"`` (the
            selection chain's SparseMAP marginals, `SparseMAPWeights`: sparse runs).
        binary: Pairwise potentials θ(z_t, z_{t+1}) of the selection chain, laid out
            [from, to], broadcastable to ``[*batch, T-1, 2, 2]`` (e.g. ``[2, 2]`` shared, or
            ``[B, 1, 2, 2]`` per sequence). Structured kind only; defaults to zeros (then the
            weights are sigmoid(s_t), independent Bernoulli selections).
        gradient: How the structured weights are differentiated: ``"autograd"`` (double
            backward through the log-partition, an analytic Hessian-vector product; the
            faster and leaner of the two on CPU, see ``benchmarks/attention.py``) or ``"ift"``
            (implicit function theorem on the variational problem,
            `structift.variational.regularized_argmax`).
        normalize: Structured kind only: divide the marginals by their sum, so the weights
            sum to one like the other kinds.

    Returns:
        Weights with the shape of ``scores``, zero on padded keys.

    Raises:
        ValueError: Bad shapes, lengths out of range, NaN/+inf scores, unknown kind/gradient.
        TypeError: Non-float scores, non-integer (or bool) lengths, dtype or device mismatch.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}.")
    weigh = weights_for(kind, binary, gradient, normalize)
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape [B, T] or [B, M, T], got {tuple(scores.shape)}.")
    lengths, valid = valid_mask(tuple(scores.shape), scores.device, lengths, mask)
    return weigh(scores, lengths, valid)


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    weights: AbstractWeights | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Attention:
    """Score ``query`` against ``key``, turn the scores into ``weights``, sum the values.

    Scores are s_t = scale · ⟨q, k_t⟩ (+ ``bias``), ``scale`` defaulting to 1/√D; the
    context is Σ_t w_t v_t. Padded keys (beyond ``lengths`` for every query of their sequence)
    never influence an output or a gradient, even if their key or value rows hold NaN or inf:
    those rows are selected away (``torch.where``) before any product, and their gradients are
    exactly 0.

    Args:
        query: ``[B, D]`` (one query per sequence) or ``[B, M, D]``.
        key: ``[B, T, D]``.
        value: ``[B, T, Dv]``; defaults to ``key``.
        lengths: LongTensor ``[B]`` of valid keys per sequence (or ``[B, M]``).
        mask: BoolTensor ``[B, T]`` (or ``[B, M, T]``) prefix mask, instead of ``lengths``.
        weights: a weights object (``SoftmaxWeights()`` by default, ``SparsemaxWeights()``,
            ``SelectionWeights(binary, gradient, normalize)``,
            ``SparseMAPWeights(binary, temperature, normalize)``).
        scale: Multiplier of the dot products; defaults to ``D ** -0.5``.
        bias: added to every score (broadcast to ``[B, M, T]``).

    Returns:
        `Attention` ``(context [B, M, Dv], weights [B, M, T])`` (no M axis for a
        ``[B, D]`` query).
    """
    weigh = SoftmaxWeights() if weights is None else weights
    if not isinstance(weigh, AbstractWeights):
        raise TypeError(
            "weights must be a structift.layers.weights object (SoftmaxWeights(), "
            f"SparsemaxWeights(), SelectionWeights(...), SparseMAPWeights(...)); got "
            f"{type(weights).__name__}"
        )
    value = check_query_key_value(query, key, value)
    (B, T, D), single = key.shape, query.dim() == 2
    q = query.unsqueeze(1) if single else query  # shape: (B, M, D)
    M = q.shape[1]
    if single:
        weigh = weigh.for_one_query()
    if isinstance(mask, Tensor) and mask.dim() == 2:
        mask = mask.unsqueeze(1).expand(B, M, T)
    lengths, valid = valid_mask((B, M, T), key.device, lengths, mask)
    # Padded keys and values may hold anything, even NaN or inf: select them away before any
    # product (a 0 weight times NaN is NaN, in the context and in the gradient of the query).
    # A key is padding when no query of its sequence may attend to it.
    used = valid.any(1).unsqueeze(-1)  # shape: (B, T, 1)
    key = torch.where(used, key, 0.0)
    value = torch.where(used, value, 0.0)
    scores = torch.einsum("bmd,btd->bmt", q, key) * ((D**-0.5) if scale is None else scale)
    if bias is not None:
        scores = scores + bias
    w = weigh(scores, lengths, valid)
    context = torch.einsum("bmt,btv->bmv", w, value)
    if single:
        return Attention(context.squeeze(1), w.squeeze(1))
    return Attention(context, w)


def structured_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor | None = None,
    lengths: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    kind: str = "structured",
    binary: Tensor | None = None,
    gradient: str = "autograd",
    normalize: bool = False,
    scale: float | None = None,
) -> Attention:
    """Attend from queries to keys with scaled dot-product scores and the chosen weights.

    Scores are s_t = scale · ⟨q, k_t⟩ (``scale`` defaults to 1/√D); weights come from
    `attention_weights`; the context is Σ_t w_t v_t.

    Padded keys (beyond ``lengths`` for every query of their sequence) never influence an
    output or a gradient, even if their key or value rows hold NaN or inf: those rows are
    selected away (``torch.where``) before any product, and their gradients are exactly 0.

    Args:
        query: ``[B, D]`` (one query per sequence) or ``[B, M, D]``.
        key: ``[B, T, D]``.
        value: ``[B, T, Dv]``; defaults to ``key``.
        lengths: LongTensor ``[B]`` of valid keys per sequence (see
            `attention_weights`).
        mask: BoolTensor ``[B, T]`` prefix mask, instead of ``lengths``.
        kind: one of ``KINDS``: ``"softmax"``, ``"sparsemax"``, ``"structured"``, ``"sparsemap"``.
        binary: Pairwise potentials for ``kind="structured"``, broadcastable to
            ``[B, M, T-1, 2, 2]`` (``[B, T-1, 2, 2]`` for one query).
        gradient: ``"autograd"`` or ``"ift"`` (structured kind).
        normalize: Normalize the structured weights to sum to one.
        scale: Multiplier of the dot products; defaults to ``D ** -0.5``.

    Returns:
        `Attention` ``(context [B, M, Dv], weights [B, M, T])`` (no M axis for a
        ``[B, D]`` query).

    Raises:
        ValueError: As `attention_weights`, plus mismatched query/key/value shapes or
            a feature size D = 0.
        TypeError: As `attention_weights`, plus non-float query/key/value, or
            mismatched dtypes or devices.
    """
    weigh = weights_for(kind, binary, gradient, normalize)
    return attend(query, key, value, lengths, mask=mask, weights=weigh, scale=scale)


class StructuredAttention(nn.Module):
    """Attention layer with softmax, sparsemax or learned structured (CRF) selection.

    Scores are bilinear, s_t = ⟨W q, k_t⟩ / √D (W is the identity when ``query_dim`` is None).
    For ``kind="structured"`` the layer learns the 2×2 pairwise potentials θ [from, to] and a
    scalar bias b added to every score (softmax and sparsemax are shift invariant, the CRF is
    not), both initialized at zero, so a fresh layer starts from independent sigmoid
    selections (Kim et al., arXiv:1702.00887, segmentation attention).

    Args:
        key_dim: D, the key feature size.
        query_dim: Query feature size; if given, a bias-free linear map to D is learned.
        kind: one of ``KINDS``: ``"softmax"``, ``"sparsemax"``, ``"structured"``, ``"sparsemap"``.
        gradient: ``"autograd"`` or ``"ift"`` for the structured kind.
        normalize: Normalize the structured weights to sum to one.
    """

    def __init__(
        self,
        key_dim: int,
        query_dim: int | None = None,
        *,
        kind: str = "structured",
        gradient: str = "autograd",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("gradient", gradient, GRADIENTS)
        chain = kind in ("structured", "sparsemap")
        if (kind != "structured" and gradient != "autograd") or (normalize and not chain):
            raise ValueError(
                f"gradient applies to kind='structured' only and normalize to 'structured' or "
                f"'sparsemap'; got gradient={gradient!r}, normalize={normalize} with {kind!r}."
            )
        check_size("key_dim", key_dim)
        if query_dim is not None:
            check_size("query_dim", query_dim)
        self.key_dim = key_dim
        self.kind, self.gradient, self.normalize = kind, gradient, normalize
        self.query_proj = None if query_dim is None else nn.Linear(query_dim, key_dim, bias=False)
        self.pairwise: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if chain:
            self.pairwise = nn.Parameter(torch.zeros(2, 2))
            self.bias = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        lengths: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Attention:
        """Attend from ``query`` to ``key``; shapes as in `structured_attention`.

        With ``query_dim`` given, ``query`` is ``[B, query_dim]`` or ``[B, M, query_dim]``.

        Raises:
            ValueError: ``query`` or ``key`` whose feature size is not the layer's
                (``query_dim``, else ``key_dim``; ``key_dim``), and as
                `structured_attention`.
            TypeError: As `structured_attention`.
        """
        query_dim = None if self.query_proj is None else self.query_proj.in_features
        check_layer_inputs(query, key, value, self.key_dim, query_dim)
        if self.query_proj is not None:
            query = self.query_proj(query)
        if self.pairwise is None:
            return attend(query, key, value, lengths, mask=mask, weights=weights_for(self.kind))
        assert self.bias is not None
        pairwise = self.pairwise.to(key.dtype)
        weigh: AbstractWeights
        if self.kind == "sparsemap":
            weigh = SparseMAPWeights(pairwise, normalize=self.normalize)
        else:
            weigh = SelectionWeights(pairwise, self.gradient, self.normalize)
        bias = self.bias.to(key.dtype)
        return attend(query, key, value, lengths, mask=mask, weights=weigh, bias=bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, gradient={self.gradient!r}, normalize={self.normalize}"
