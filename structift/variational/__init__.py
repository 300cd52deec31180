"""structift.variational: the marginal-polytope view, μ*(θ) = argmax ⟨θ, μ⟩ + τ H(μ), by the IFT."""

from structift.variational.argmax import (
    Exact,
    Iterative,
    KKTResidual,
    Structured,
    kkt_residual,
    regularized_argmax,
)
from structift.variational.chain_kkt import ChainKKTPoint, chain_duals, chain_kkt_residual
from structift.variational.check import IFTCheck, check_ift
from structift.variational.covariance import chain_covariance_vector_product
from structift.variational.message_passing import chain_message_passing, simplex_mirror_descent
from structift.variational.normal import NormalEquations
from structift.variational.structured import StructuredChainSolve

__all__ = [
    "ChainKKTPoint",
    "Exact",
    "IFTCheck",
    "Iterative",
    "KKTResidual",
    "NormalEquations",
    "Structured",
    "StructuredChainSolve",
    "chain_covariance_vector_product",
    "chain_duals",
    "chain_kkt_residual",
    "chain_message_passing",
    "check_ift",
    "kkt_residual",
    "regularized_argmax",
    "simplex_mirror_descent",
]
