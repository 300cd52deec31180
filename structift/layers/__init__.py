"""Differentiable layers: sparsemax, QP layer, structured attention, the CRF output layer."""

from structift.layers.attention import (
    Attention,
    StructuredAttention,
    attend,
    attention_weights,
    structured_attention,
)
from structift.layers.crf import CRF
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
from structift.layers.tagging import SCHEMES, allowed_transitions
from structift.layers.weights import (
    AbstractWeights,
    SelectionWeights,
    SoftmaxWeights,
    SparseMAPWeights,
    SparsemaxWeights,
    weights_for,
)

__all__: list[str] = [
    "CRF",
    "SCHEMES",
    "AbstractWeights",
    "Attention",
    "FarkasCertificate",
    "InfeasibleQPError",
    "QPConvergenceError",
    "QPLayer",
    "QPSolution",
    "QPStatus",
    "SelectionWeights",
    "SoftmaxWeights",
    "SparseMAPWeights",
    "Sparsemax",
    "SparsemaxWeights",
    "StructuredAttention",
    "allowed_transitions",
    "attend",
    "attention_weights",
    "qp_solve",
    "sparsemax",
    "structured_attention",
    "weights_for",
]
