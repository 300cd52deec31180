"""Dependency-tree structures (projective and non-projective) over one shared space."""

from structift.structures.tree.nonprojective import NonProjectiveTrees
from structift.structures.tree.projective import ProjectiveTrees
from structift.structures.tree.space import TreeSpace, check_trees, is_projective

__all__ = ["TreeSpace", "check_trees", "is_projective"]
__all__ += ["NonProjectiveTrees"]
__all__ += ["ProjectiveTrees"]
