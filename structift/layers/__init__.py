"""Differentiable layers: sparsemax, QP layer, structured attention (function + Module pairs)."""

from structift.layers.attention import (
    Attention,
    StructuredAttention,
    attention_weights,
    structured_attention,
)

__all__: list[str] = [
    "Attention",
    "StructuredAttention",
    "attention_weights",
    "structured_attention",
]
