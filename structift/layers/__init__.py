"""Differentiable layers: sparsemax, QP layer, structured attention (function + Module pairs)."""

from structift.layers.attention import (
    Attention,
    StructuredAttention,
    attention_weights,
    structured_attention,
)
from structift.layers.qp import (
    FarkasCertificate,
    InfeasibleQPError,
    QPConvergenceError,
    QPLayer,
    QPSolution,
    QPStatus,
    qp_solve,
)
from structift.layers.sparsemax import Sparsemax, sparsemax

__all__: list[str] = [
    "Attention",
    "FarkasCertificate",
    "InfeasibleQPError",
    "QPConvergenceError",
    "QPLayer",
    "QPSolution",
    "QPStatus",
    "Sparsemax",
    "StructuredAttention",
    "attention_weights",
    "qp_solve",
    "sparsemax",
    "structured_attention",
]
