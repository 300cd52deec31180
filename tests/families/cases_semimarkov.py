"""The ``SEMI_MARKOV`` test case (``tests.families.cases.Case``) and its hypothesis strategy.

Kept in its own module so the integrator can add it to ``cases.CASES``. Note for the generic
tests: ``is_chain=False`` here, but the marginals of a segmentation do not sum to one over the
last axis and its structures are 2-D (see ``test_semimarkov.py`` for the versions of
``test_marginals_sum_to_one``, the log-prob and the sampling tests that apply).
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

MAX_STRUCTURES = 243


def count(length: int, max_segment: int, num_labels: int) -> int:
    """The number of labelled segmentations of ``length`` positions (segments of 1..K-1)."""
    ways = [num_labels] + [0] * max(length - 1, 0)  # ways[t]: labelled prefixes ending at t
    for t in range(1, length):
        ways[t] = sum(ways[t - k] * num_labels for k in range(1, min(max_segment - 1, t) + 1))
    return ways[length - 1]


@st.composite
def _dims(draw: st.DrawFn) -> tuple[int, int, int, int]:
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, 3))
    K = draw(st.integers(2, 4))
    N = draw(st.integers(1, 5).filter(lambda n: count(n, K, C) <= MAX_STRUCTURES))
    return B, N, K, C


@st.composite
def semi_markov_params(
    draw: st.DrawFn,
    dims: tuple[int, int, int, int] | None = None,
    lengths: torch.Tensor | None = None,
    neg_inf: bool = True,
) -> Params:
    """``scores [B, N-1, K, C, C]`` (float64) and ``lengths [B]``; never an empty distribution.

    With ``neg_inf`` some scores are ``-inf``; a backbone of one-step segments per element is
    kept finite so that every distribution has a structure.
    """
    B, N, K, C = dims if dims is not None else draw(_dims())
    if lengths is None:
        lengths = torch.tensor(draw(st.lists(st.integers(1, N), min_size=B, max_size=B)))
    scores = draw(strategies.tensors((B, N - 1, K, C, C), neg_inf=neg_inf))
    if neg_inf:
        for b in range(B):
            L = int(lengths[b])
            path = draw(st.lists(st.integers(0, C - 1), min_size=L, max_size=L))
            for t in range(L - 1):
                if scores[b, t, 1, path[t], path[t + 1]] == float("-inf"):
                    scores[b, t, 1, path[t], path[t + 1]] = 0.0
    return {"scores": scores, "lengths": lengths}


def brute(p: Params) -> list[brute_force.Enumeration]:
    scores, lengths = p["scores"], p["lengths"]
    return [brute_force.semi_markov(scores[b], int(lengths[b])) for b in range(scores.shape[0])]


def _shift(p: Params, b: int, c: float) -> tuple[Params, torch.Tensor]:
    # Every segmentation with L >= 2 has exactly one segment starting at boundary 0.
    scores = p["scores"].clone()
    delta = torch.zeros(scores.shape[0], dtype=scores.dtype)
    if int(p["lengths"][b]) >= 2:
        scores[b, 0] += c
        delta[b] = c
    return {**p, "scores": scores}, delta


def _ignored(p: Params) -> torch.Tensor:
    """BoolTensor like ``scores``: True at the ignored entries (k = 0 or past the length)."""
    scores, lengths = p["scores"], p["lengths"]
    N1, K = scores.shape[1], scores.shape[2]
    s = torch.arange(N1)[:, None]
    k = torch.arange(K)
    used = (k >= 1) & (s + k <= (lengths - 1)[:, None, None])
    return ~used[..., None, None].expand(scores.shape)


def _pad(p: Params, data: st.DataObject) -> Params:
    junk = data.draw(strategies.tensors(tuple(p["scores"].shape), neg_inf=True))
    return {**p, "scores": torch.where(_ignored(p), junk, p["scores"])}


def fixed() -> Params:
    """B=2, N=4, K=3, C=2 with lengths (4, 3) and two ``-inf`` scores (float64)."""
    g = seeded(11)
    scores = torch.randn(2, 3, 3, 2, 2, generator=g, dtype=torch.float64)
    scores[0, 1, 1, 0, 1] = float("-inf")
    scores[1, 0, 2, 1, 1] = float("-inf")
    return {"scores": scores, "lengths": torch.tensor([4, 3])}


def segment_mass(dist: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every gap t < L-1 (between positions t and t+1) lies in exactly one segment."""
    mu = dist.marginals.sum((-1, -2))  # shape: (B, N-1, K)
    B, N_1, K = mu.shape
    cover = torch.zeros(B, N_1, dtype=mu.dtype, device=mu.device)
    for k in range(1, K):
        for j in range(k):  # a segment of k steps from boundary s covers the gaps s..s+k-1
            cover[:, j:] += mu[:, : N_1 - j, k]
    gaps = torch.arange(N_1, device=mu.device)[None] < (dist.lengths - 1)[:, None]
    return [(cover, gaps.to(mu.dtype))]


SEMI_MARKOV = Case(
    name="semimarkov",
    params=lambda **kw: semi_markov_params(**kw),
    like=lambda p, **kw: semi_markov_params(
        dims=(p["scores"].shape[0], p["scores"].shape[1] + 1, *p["scores"].shape[2:4]),
        lengths=p["lengths"],
        **kw,
    ),
    make=lambda p, **kw: st_.SemiMarkovCRF(p["scores"], p["lengths"], **kw),
    brute=brute,
    shift=_shift,
    pad=_pad,
    select=lambda p, b: {"scores": p["scores"][b : b + 1], "lengths": p["lengths"][b : b + 1]},
    fixed=fixed,
    is_chain=False,
    mass=segment_mass,
)
