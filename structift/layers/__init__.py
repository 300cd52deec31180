"""Differentiable layers: sparsemax, QP layer, structured attention (function + Module pairs)."""

from structift.layers.attention import (
    Attention,
    StructuredAttention,
    attention_weights,
    structured_attention,
)
from structift.layers.sparsemax import Sparsemax, sparsemax

__all__: list[str] = [
    "Attention",
    "Sparsemax",
    "StructuredAttention",
    "attention_weights",
    "sparsemax",
    "structured_attention",
]
