"""Structures: the combinatorics of each sample space, behind one protocol.

``AbstractStructure`` (``base``) is the protocol; ``Simplex`` (one of n outcomes) and ``Chain``
(tag sequences, with its backends) are its instances. A family in ``structift.families`` is
natural parameters plus one of these; ``structift.variational`` and ``structift.layers`` only
ever talk to the protocol. See the Design page of the docs for how to add a structure.
"""

from structift.structures.base import AbstractRegularized, AbstractStructure
from structift.structures.chain import Chain
from structift.structures.simplex import Simplex

__all__ = ["AbstractRegularized", "AbstractStructure", "Chain", "Simplex"]
