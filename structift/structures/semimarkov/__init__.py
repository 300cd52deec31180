"""Semi-Markov segmentations: the structure behind ``structift.SemiMarkovCRF``."""

from structift.structures.semimarkov.check import check_segmentations
from structift.structures.semimarkov.structure import SemiMarkov

__all__ = ["SemiMarkov", "check_segmentations"]
