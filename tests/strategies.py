"""Hypothesis strategies for the families: tiny shapes, potentials with ``-inf`` masks, lengths.

Shapes stay tiny so that brute-force enumeration is cheap (Z^T <= 243). Every strategy returns
float64 CPU tensors in a plain dict; tests move them to a device. ``-inf`` masks never make a
distribution empty: a random "backbone" structure per batch element is kept finite.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

__all__ = [
    "categorical_params",
    "chain_params",
    "hmm_params",
    "tensors",
]

Params = dict[str, Any]

MAX_STRUCTURES = 243


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    low: float = -4.0,
    high: float = 4.0,
    neg_inf: bool = False,
) -> torch.Tensor:
    """A float64 tensor of ``shape`` with entries in ``[low, high]`` (times a drawn scale).

    With ``neg_inf`` some entries (up to a third) are ``-inf``.
    """
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.floats(low, high, width=64), min_size=n, max_size=n))
    scale = draw(st.sampled_from([1.0, 1.0, 25.0]))  # large spreads stress rescaling paths
    x = torch.tensor(values, dtype=torch.float64).reshape(shape) * scale
    if neg_inf and n > 1:
        hard = draw(st.sets(st.integers(0, n - 1), max_size=n // 3))
        flat = x.reshape(-1)
        flat[sorted(hard)] = float("-inf")
    return x


@st.composite
def _chain_dims(draw: st.DrawFn, max_batch: int = 3) -> tuple[int, int, int]:
    B = draw(st.integers(1, max_batch))
    Z = draw(st.integers(1, 3))
    max_T = 5 if Z <= 3 else 4
    T = draw(st.integers(1, max_T).filter(lambda t: Z**t <= MAX_STRUCTURES))
    return B, T, Z


@st.composite
def chain_params(
    draw: st.DrawFn,
    dims: tuple[int, int, int] | None = None,
    lengths: torch.Tensor | None = None,
    neg_inf: bool = True,
    shared_binary: bool | None = None,
) -> Params:
    """Parameters of a LinearChainCRF: ``unary [B,T,Z]``, ``binary``, ``lengths [B]``.

    Args:
        dims: Fix ``(B, T, Z)`` (e.g. to draw a second distribution on the same space).
        lengths: Fix the lengths.
        neg_inf: Allow ``-inf`` entries.
        shared_binary: ``binary`` as one ``[Z, Z]`` matrix (True), full ``[B,T-1,Z,Z]``
            (False) or either (None).
    """
    B, T, Z = dims if dims is not None else draw(_chain_dims())
    if lengths is None:
        lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    if shared_binary is None:
        shared_binary = draw(st.booleans())
    unary = draw(tensors((B, T, Z), neg_inf=neg_inf))
    binary_shape = (Z, Z) if shared_binary else (B, max(T - 1, 0), Z, Z)
    binary = draw(tensors(binary_shape, neg_inf=neg_inf))
    if neg_inf:
        # Keep one path per element finite so that no distribution is empty.
        for b in range(B):
            path = draw(st.lists(st.integers(0, Z - 1), min_size=T, max_size=T))
            for t in range(T):
                if unary[b, t, path[t]] == float("-inf"):
                    unary[b, t, path[t]] = 0.0
            for t in range(T - 1):
                index = (path[t], path[t + 1]) if shared_binary else (b, t, path[t], path[t + 1])
                if binary[index] == float("-inf"):
                    binary[index] = 0.0
    return {"unary": unary, "binary": binary, "lengths": lengths}


@st.composite
def categorical_params(
    draw: st.DrawFn, dims: tuple[int, int] | None = None, neg_inf: bool = True
) -> Params:
    """Parameters of a Categorical: ``logits [B, n]`` with one finite entry per row at least."""
    B, n = dims if dims is not None else (draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    logits = draw(tensors((B, n), neg_inf=neg_inf))
    for b in range(B):
        if bool((logits[b] == float("-inf")).all()):
            logits[b, draw(st.integers(0, n - 1))] = 0.0
    return {"logits": logits}


@st.composite
def hmm_params(
    draw: st.DrawFn,
    dims: tuple[int, int, int, int] | None = None,
    lengths: torch.Tensor | None = None,
    observations: torch.Tensor | None = None,
    neg_inf: bool = True,
    batched: bool | None = None,
) -> Params:
    """Parameters of an HMM (logits, observations ``[B, T]``, lengths ``[B]``).

    Args:
        dims: Fix ``(B, T, Z, V)``.
        lengths, observations: Fix them (to draw a second HMM posterior on the same space).
        neg_inf: Allow ``-inf`` logits (a backbone path emitting the observations stays finite).
        batched: Give the logits a leading batch dimension B (None: either).
    """
    if dims is None:
        B, T, Z = draw(_chain_dims())
        V = draw(st.integers(1, 3))
    else:
        B, T, Z, V = dims
    if lengths is None:
        lengths = torch.tensor(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    if observations is None:
        rows = st.lists(st.integers(0, V - 1), min_size=T, max_size=T)
        observations = torch.tensor(draw(st.lists(rows, min_size=B, max_size=B)))
    if batched is None:
        batched = draw(st.booleans())
    lead = (B,) if batched else ()
    init = draw(tensors((*lead, Z), neg_inf=neg_inf))
    transition = draw(tensors((*lead, Z, Z), neg_inf=neg_inf))
    emission = draw(tensors((*lead, Z, V), neg_inf=neg_inf))
    if neg_inf:
        # Every row needs a finite logit (rows are softmax-normalised) ...
        for table in (init, transition, emission):
            rows = table.reshape(-1, table.shape[-1])
            for r in range(rows.shape[0]):
                if bool((rows[r] == float("-inf")).all()):
                    rows[r, draw(st.integers(0, rows.shape[1] - 1))] = 0.0
        # ... and one hidden path per sequence must emit the observations with p > 0.
        for b in range(B):
            path = draw(st.lists(st.integers(0, Z - 1), min_size=T, max_size=T))
            at = (b,) if batched else ()
            keep = [(init, (*at, path[0]))]
            keep += [(emission, (*at, path[t], int(observations[b, t]))) for t in range(T)]
            keep += [(transition, (*at, path[t], path[t + 1])) for t in range(T - 1)]
            for table, index in keep:
                if table[index] == float("-inf"):
                    table[index] = 0.0
    return {
        "init_logits": init,
        "transition_logits": transition,
        "emission_logits": emission,
        "observations": observations,
        "lengths": lengths,
    }
