"""Exponential families: Categorical, LinearChainCRF and HMM on a shared ExpFamily base."""

from structift.families import kl as _kl  # noqa: F401  (registers KL with torch)
from structift.families.base import ExpFamily
from structift.families.categorical import Categorical
from structift.families.crf import ChainMarginals, LinearChainCRF
from structift.families.hmm import HMM
from structift.families.semimarkov import SemiMarkovCRF
from structift.families.tree import DependencyCRF

__all__ = ["HMM", "Categorical", "ChainMarginals", "ExpFamily", "LinearChainCRF"]
__all__ += ["SemiMarkovCRF"]
__all__ += ["DependencyCRF"]
