"""Shared benchmark helpers for the chain peers and backend selection.

The peers get the model ``emissions U [B, T, Z] + one transition matrix W [Z, Z]`` in their own
layouts: pytorch-crf with start/end transitions set to 0, torch-struct as edge potentials
``phi[b, n, to, from] = W[from, to] + U[b, n+1, to] + [n == 0] U[b, 0, from]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def with_kernel(name: str | None, run: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap ``run`` so that every call uses the chain backend ``name`` (``None``: the default)."""
    from structift.structures.chain import use_backend

    def wrapped() -> Any:
        with use_backend(name):
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


def sync(device: str) -> None:
    """Wait for queued device work so timings are honest."""
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_times(
    runs: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: bool = False
) -> dict[str, list[float]]:
    """Seconds of each run in each of ``repeats`` rounds, rounds interleaved (drift hits all);
    ``warmup``: one untimed call of each run first."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    if warmup:
        for run in runs.values():
            run()
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median_times(runs: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict:
    """Median seconds per run over ``repeats`` interleaved rounds (`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(runs, repeats, device).items()}


def chain_parser(doc: str | None, repeats: int, B: int = 32) -> argparse.ArgumentParser:
    """The shared command line: shape ``-B -T -Z``, ``--device``, ``--threads``, ``--repeats``."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-B", type=int, default=B)
    p.add_argument("-T", type=int, default=128)
    p.add_argument("-Z", type=int, default=32)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats (median reported)")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``--threads``, check ``--device`` and make the model: ``U [B,T,Z]``, ``W``, lengths."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    g = torch.Generator().manual_seed(0)
    U = torch.randn(args.B, args.T, args.Z, generator=g).to(args.device)
    W = (0.5 * torch.randn(args.Z, args.Z, generator=g)).to(args.device)
    return U, W, torch.full((args.B,), args.T, device=args.device)
