"""Registry cases for the dependency-tree CRFs, in the style of ``cases.py``.

``tree_params`` draws arc scores ``[B, N+1, N+1]`` (N <= 4, so at most 125 trees) with ``-inf``
masks that keep one random backbone tree per element finite, and lengths ``< N`` in the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

import structift as st_
from tests import strategies
from tests.families.case import Case
from tests.reference import brute_force
from tests.seeding import seeded

Params = dict[str, Any]

__all__ = [
    "ALL_TREE_CASES",
    "NONPROJECTIVE",
    "NONPROJECTIVE_MULTI",
    "PROJECTIVE",
    "PROJECTIVE_MULTI",
    "TREE_CASES",
    "tree_mass",
    "tree_params",
]


@st.composite
def tree_params(
    draw: st.DrawFn,
    dims: tuple[int, int] | None = None,
    lengths: torch.Tensor | None = None,
    neg_inf: bool = True,
    multi_root: bool = False,
    projective: bool = False,
) -> Params:
    """``{"arc_scores" [B, N+1, N+1], "lengths" [B]}`` (float64); the flags shape the backbone."""
    B, N = dims if dims is not None else (draw(st.integers(1, 3)), draw(st.integers(1, 4)))
    if lengths is None:
        lengths = torch.tensor(draw(st.lists(st.integers(1, N), min_size=B, max_size=B)))
    arcs = draw(strategies.tensors((B, N + 1, N + 1), neg_inf=neg_inf))
    if neg_inf:
        for b in range(B):  # a backbone tree: a random order, each word on the previous one
            n = int(lengths[b])
            words = list(range(1, n + 1))  # in order the backbone is projective
            order = words if projective else draw(st.permutations(words))
            for prev, m in zip([0, *order], order):
                if arcs[b, prev, m] == float("-inf"):
                    arcs[b, prev, m] = 0.0
    return {"arc_scores": arcs, "lengths": lengths}


def _brute(p: Params, projective: bool, multi_root: bool) -> list[brute_force.Enumeration]:
    arcs, lengths = p["arc_scores"], p["lengths"]
    return [
        brute_force.dependency_trees(arcs[b], int(lengths[b]), projective, multi_root)
        for b in range(arcs.shape[0])
    ]


def _shift(p: Params, b: int, c: float) -> tuple[Params, torch.Tensor]:
    arcs = p["arc_scores"].clone()
    m = int(p["lengths"][b])  # a real word: every tree gives it exactly one head
    arcs[b, :, m] += c
    delta = torch.zeros(arcs.shape[0], dtype=arcs.dtype)
    delta[b] = c
    return {**p, "arc_scores": arcs}, delta


def _pad(p: Params, data: st.DataObject) -> Params:
    arcs = p["arc_scores"].clone()
    B, N1, _ = arcs.shape
    junk = data.draw(strategies.tensors((B, N1, N1), neg_inf=True))
    eye = torch.eye(N1, dtype=torch.bool)
    for b in range(B):
        n = int(p["lengths"][b])
        ignored = torch.zeros(N1, N1, dtype=torch.bool)
        ignored[n + 1 :, :] = True
        ignored[:, n + 1 :] = True
        ignored[:, 0] = True
        ignored |= eye
        arcs[b] = torch.where(ignored, junk[b], arcs[b])
    return {**p, "arc_scores": arcs}


def _fixed() -> Params:
    g = seeded(11)
    arcs = torch.randn(2, 5, 5, generator=g, dtype=torch.float64)
    arcs[0, 2, 3] = float("-inf")
    arcs[1, 0, 1] = float("-inf")
    return {"arc_scores": arcs, "lengths": torch.tensor([4, 3])}


def tree_mass(dist: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every word has exactly one head: column sums of the arc marginals are 1 on the words."""
    mu = dist.marginals
    words = dist.structure.word_mask().to(mu.dtype)
    return [(mu.sum(-2), words)]


def _case(multi_root: bool, projective: bool = False) -> Case:
    kind = "projective" if projective else "nonprojective"
    return Case(
        name=f"dependency-{kind}" + ("-multiroot" if multi_root else ""),
        params=lambda **kw: tree_params(multi_root=multi_root, projective=projective, **kw),
        like=lambda p, **kw: tree_params(
            dims=(p["arc_scores"].shape[0], p["arc_scores"].shape[-1] - 1),
            lengths=p["lengths"],
            multi_root=multi_root,
            projective=projective,
            **kw,
        ),
        make=lambda p, **kw: st_.DependencyCRF(
            p["arc_scores"], p["lengths"], projective, multi_root, **kw
        ),
        brute=lambda p: _brute(p, projective, multi_root),
        shift=_shift,
        pad=_pad,
        select=lambda p, b: {
            **p,
            "arc_scores": p["arc_scores"][b : b + 1],
            "lengths": p["lengths"][b : b + 1],
        },
        fixed=_fixed,
        is_chain=False,
        mass=tree_mass,
        kbest=projective,  # non-projective k-best (Camerini et al. 1980) is not implemented
    )


NONPROJECTIVE = _case(False)
NONPROJECTIVE_MULTI = _case(True)
PROJECTIVE = _case(False, projective=True)
PROJECTIVE_MULTI = _case(True, projective=True)
TREE_CASES = [NONPROJECTIVE, NONPROJECTIVE_MULTI]
ALL_TREE_CASES = [*TREE_CASES, PROJECTIVE, PROJECTIVE_MULTI]
