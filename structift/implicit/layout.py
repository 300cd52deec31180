"""The layout of z: a pytree of tensors ``[*batch, *event]`` flattened to ``[B, N]``.

`structift.implicit.custom_root` lets z be any (named) tuple / list / dict of tensors
sharing ``batch_ndim`` leading batch dims; linear solvers see ``[B, N]`` rows, one per
problem. B may be 0 (an empty batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["Layout", "flatten_out"]


class Layout:
    """Flattening of a pytree of tensors ``[*batch, *event]`` to ``[B, N]``."""

    def __init__(self, tree: Any, batch_ndim: int, what: str) -> None:
        leaves, self.spec = pytree.tree_flatten(tree)
        if not leaves or not all(isinstance(x, Tensor) for x in leaves):
            raise TypeError(
                f"{what} must be a tensor or a (named) tuple/list/dict of tensors, got "
                f"{type(tree).__name__} with leaves {[type(x).__name__ for x in leaves]}"
            )
        first = leaves[0]
        if first.ndim < batch_ndim:
            raise ValueError(
                f"{what} has {first.ndim} dims but batch_ndim={batch_ndim} batch dims expected"
            )
        self.batch_shape = first.shape[:batch_ndim]
        self.batch_ndim = batch_ndim
        for x in leaves:
            if x.shape[:batch_ndim] != self.batch_shape:
                raise ValueError(
                    f"every tensor in {what} must share the batch shape "
                    f"{tuple(self.batch_shape)} (batch_ndim={batch_ndim}); got {tuple(x.shape)}"
                )
            if not x.is_floating_point() or x.dtype != first.dtype or x.device != first.device:
                raise TypeError(
                    f"every tensor in {what} must be floating point with one dtype and device; "
                    f"got {x.dtype} on {x.device} and {first.dtype} on {first.device}"
                )
        self.event_shapes = [x.shape[batch_ndim:] for x in leaves]
        self.sizes = [math.prod(s) for s in self.event_shapes]
        self.B = int(torch.Size(self.batch_shape).numel())
        self.N = sum(self.sizes)

    def flatten(self, leaves: Sequence[Tensor]) -> Tensor:
        """Concatenate z's leaves (this layout) into ``[B, N]``."""
        return torch.cat([x.reshape(self.B, n) for x, n in zip(leaves, self.sizes)], dim=-1)

    def unflatten(self, flat: Tensor) -> Any:
        """Split ``flat`` [B, N] back into z's pytree layout."""
        parts = torch.split(flat, self.sizes, dim=-1)
        leaves = [p.reshape((*self.batch_shape, *s)) for p, s in zip(parts, self.event_shapes)]
        return pytree.tree_unflatten(leaves, self.spec)


def flatten_out(out: Any, B: int, what: str = "residual") -> Tensor:
    """Flatten a residual's output (any pytree of tensors, B rows each) to ``[B, -1]``."""
    leaves = pytree.tree_leaves(out)
    if not leaves or not all(isinstance(x, Tensor) for x in leaves):
        raise TypeError(f"{what} must return a tensor or a (named) tuple of tensors")
    return torch.cat([x.reshape(B, -1) for x in leaves], dim=-1)
