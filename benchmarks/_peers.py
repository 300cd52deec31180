"""Shared benchmark helpers for the chain peers and kernel selection.

The peers get the model ``emissions U [B, T, Z] + one transition matrix W [Z, Z]`` in their own
layouts: pytorch-crf with start/end transitions set to 0, torch-struct as edge potentials
``phi[b, n, to, from] = W[from, to] + U[b, n+1, to] + [n == 0] U[b, 0, from]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def chain_kernel(name: str | None) -> Iterator[None]:
    """Run the block with ``STRUCTIFT_CHAIN_KERNEL=name`` (``None``: leave it as it is)."""
    old = os.environ.get("STRUCTIFT_CHAIN_KERNEL")
    if name is not None:
        os.environ["STRUCTIFT_CHAIN_KERNEL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STRUCTIFT_CHAIN_KERNEL", None)
        else:
            os.environ["STRUCTIFT_CHAIN_KERNEL"] = old


def with_kernel(name: str | None, run: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``run`` so that every call uses the chain kernel ``name``."""

    def wrapped() -> Any:
        with chain_kernel(name):
            return run()

    return wrapped


def pytorch_crf(W: torch.Tensor) -> Any:
    """A ``torchcrf.CRF`` with transitions ``W`` [Z, Z] and zero start/end transitions."""
    from torchcrf import CRF

    crf = CRF(W.shape[0], batch_first=True).to(W.device)
    with torch.no_grad():
        crf.transitions.copy_(W)
        crf.start_transitions.zero_()
        crf.end_transitions.zero_()
    return crf


def torch_struct_potentials(U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """torch-struct's edge potentials ``[B, T-1, to, from]`` for the same model (detached)."""
    with torch.no_grad():
        phi = W.T[None, None] + U[:, 1:, :, None]
        phi[:, 0] += U[:, 0, None, :]
    return phi.contiguous()
