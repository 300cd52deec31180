"""structift.variational: the marginal-polytope view, μ*(θ) = argmax ⟨θ, μ⟩ + τ H(μ), by the IFT.

Generic over structures: ``regularized_argmax``, ``kkt_residual`` and ``check_ift`` ask a
distribution for its structure's regularized problem (``structift.structures``). The chain's
KKT pieces live with the chain (``structift.structures.chain.kkt``, ``kkt_solve``,
``message_passing``) and are re-exported here under their established names.
"""

from structift.structures.chain.kkt import ChainKKTPoint, chain_duals, chain_kkt_residual
from structift.structures.chain.kkt_solve import StructuredChainSolve
from structift.structures.chain.message_passing import chain_message_passing
from structift.variational.argmax import (
    Exact,
    Iterative,
    KKTResidual,
    Structured,
    kkt_residual,
    regularized_argmax,
)
from structift.variational.check import IFTCheck, check_ift
from structift.variational.covariance import chain_covariance_vector_product
from structift.variational.fenchel_young import sparsemap_loss
from structift.variational.normal import NormalEquations
from structift.variational.regularizers import L2, Entropy
from structift.variational.simplex import simplex_mirror_descent
from structift.variational.sparsemap import ActiveSet, SparseMAPResult, SparseMAPStatus, sparsemap

__all__ = [
    "L2",
    "ActiveSet",
    "ChainKKTPoint",
    "Entropy",
    "Exact",
    "IFTCheck",
    "Iterative",
    "KKTResidual",
    "NormalEquations",
    "SparseMAPResult",
    "SparseMAPStatus",
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
    "sparsemap",
    "sparsemap_loss",
]
