"""structift: exact structured prediction on graphical models, with IFT gradients.

Re-exports are explicit; each subpackage documents its own API.
"""

__version__ = "0.1.0"

from structift.families import (
    HMM,
    Categorical,
    ChainMarginals,
    ExpFamily,
    LinearChainCRF,
)
from structift.families.blocked import BlockedEmission
from structift.families.lowrank import LowRankTransition
from structift.families.semimarkov import SemiMarkovCRF
from structift.families.tree import DependencyCRF
from structift.layers.crf import CRF

__all__ = [
    "CRF",
    "HMM",
    "BlockedEmission",
    "Categorical",
    "ChainMarginals",
    "DependencyCRF",
    "ExpFamily",
    "LinearChainCRF",
    "LowRankTransition",
    "SemiMarkovCRF",
    "__version__",
]
