"""``check_segmentations``: is a LongTensor ``[*S, B, N]`` a labelled segmentation of the space?"""

from __future__ import annotations

import torch
from torch import Tensor

from structift._checks import check_index_tensor
from structift._ops import lengths_to_mask

__all__ = ["check_segmentations"]


def _first(bad: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_segmentations(
    name: str,
    value: Tensor,
    lengths: Tensor,
    num_positions: int,
    max_segment: int,
    num_labels: int,
    device: torch.device,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` encodes segmentations.

    Checks, at the positions ``t < L = lengths[b]`` (padding is ignored): an integer tensor of
    trailing shape ``[B, N]``; labels in ``[0, C-1]`` or -1 (inside a segment); position 0
    labelled (the initial label); the last position ``L - 1`` labelled (it ends a segment);
    every segment at most ``K - 1`` steps long.
    """
    B, C = lengths.shape[0], num_labels
    N = num_positions
    # dtype, device and the trailing shape (B, N); the ranges are checked below (-1 is valid)
    check_index_tensor(name, value, (B, N), C, device, mask=torch.zeros((), dtype=torch.bool))
    labels = value
    inside = lengths_to_mask(lengths, N)
    bad = inside & ((labels < -1) | (labels >= C))
    if bool(bad.any()):
        i = _first(bad)
        raise ValueError(
            f"{name}[{i}] = {int(labels[i])}: labels must lie in [0, {C - 1}] at segment ends, "
            "or be -1 inside a segment."
        )
    if bool((labels[..., 0] < 0).any()):
        i = _first(labels[..., 0] < 0)
        raise ValueError(
            f"{name}[{(*i, 0)}] = -1: position 0 holds the initial label and must be labelled "
            f"in [0, {C - 1}]."
        )
    last = torch.gather(labels, -1, (lengths - 1).expand(*labels.shape[:-1]).unsqueeze(-1))[..., 0]
    if bool((last < 0).any()):
        i = _first(last < 0)
        t = int(lengths[i[-1]]) - 1
        raise ValueError(
            f"{name}[{(*i, t)}] = -1: the last position L - 1 = {t} must end a segment "
            "(hold its label)."
        )
    pos = torch.arange(N, device=value.device)
    marks = torch.where(inside & (labels >= 0), pos, -1)
    prev = torch.cummax(marks, -1).values
    prev = torch.cat([torch.zeros_like(prev[..., :1]), prev[..., :-1]], -1)
    too_long = inside & (labels >= 0) & (pos >= 1) & (pos - prev > max_segment - 1)
    if bool(too_long.any()):
        i = _first(too_long)
        raise ValueError(
            f"{name}[{i}]: the segment ending here has {int(pos[i[-1]] - prev[i])} steps; "
            f"segments have at most K - 1 = {max_segment - 1} steps."
        )
