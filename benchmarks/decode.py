"""Benchmark: Viterbi decoding and sampling against pytorch-crf and torch-struct.

Same model as ``benchmarks/chain.py``: emissions ``U`` [B, T, Z], one transition matrix ``W``
[Z, Z], all lengths = T, float32. Timed, median of interleaved repeats, no autograd.

Viterbi (MAP tags):

* ``structift``       ``chain.viterbi(U, W, lengths)`` with the default kernel (fused on CUDA);
* ``structift-loop``  the same with ``backend 'scaled'`` (the log-space torch loop;
  on CPU this is what ``structift`` runs, so the row is skipped there);
* ``pytorch-crf``     ``CRF.decode`` (returns Python lists: its backtrack runs on the host);
* ``torch-struct``    ``LinearChainCRF(phi, lengths).argmax`` (one-hot edges, by autograd
  through the max semiring).

Every implementation's tags are rescored with ``chain.score``; the table prints the largest gap
to structift's best score (0 when all find a MAP path).

Sampling (``--samples S`` sequences per batch element; pytorch-crf cannot sample):
``chain.sample`` on both kernels and ``LinearChainCRF(phi, lengths).sample((S,))``.

Usage::

    python benchmarks/decode.py                         # CPU, B=32 T=128 Z=32
    python benchmarks/decode.py --device cuda -B 256
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _peers import (
    chain_parser,
    median_times,
    pytorch_crf,
    setup,
    torch_struct_potentials,
    with_kernel,
)

from structift.structures import chain

IMPLS = ["structift", "structift-loop", "pytorch-crf", "torch-struct"]


def build(impl: str, U: torch.Tensor, W: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Return ``run() -> tags LongTensor [B, T]`` for one implementation."""
    B, T = U.shape[:2]
    lengths = torch.full((B,), T, device=U.device)
    if impl == "structift":
        return lambda: chain.viterbi(U, W, lengths)[0]
    if impl == "structift-loop":
        return with_kernel("scaled", lambda: chain.viterbi(U, W, lengths)[0])
    if impl == "pytorch-crf":
        crf = pytorch_crf(W)
        return lambda: torch.tensor(crf.decode(U), device=U.device)
    if impl == "torch-struct":
        import torch_struct

        phi = torch_struct_potentials(U, W)  # shape: (B, T-1, to, from)

        def run_ts() -> torch.Tensor:
            edges = torch_struct.LinearChainCRF(phi, lengths).argmax  # (B, T-1, to, from)
            to = edges.sum(-1).argmax(-1)  # shape: (B, T-1)
            first = edges[:, 0].sum(-2).argmax(-1)  # shape: (B,)
            return torch.cat([first[:, None], to], 1)

        return run_ts
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def build_sampler(impl: str, U: torch.Tensor, W: torch.Tensor, n: int) -> Callable[[], object]:
    """Return ``run()`` drawing ``n`` samples per sequence with one implementation."""
    B, T = U.shape[:2]
    lengths = torch.full((B,), T, device=U.device)
    if impl in ("structift", "structift-loop"):
        kernel = "scaled" if impl == "structift-loop" else None
        return with_kernel(kernel, lambda: chain.sample(U, W, lengths, (n,)))
    if impl == "torch-struct":
        import torch_struct

        phi = torch_struct_potentials(U, W)
        return lambda: torch_struct.LinearChainCRF(phi, lengths).sample((n,))
    raise ValueError(f"{impl} cannot sample")


def main() -> None:
    p = chain_parser(__doc__, repeats=9)
    p.add_argument("--impls", nargs="*", default=None, choices=IMPLS)
    p.add_argument("--samples", type=int, default=100, help="sequences drawn per batch element")
    p.add_argument(
        "--ts-work", type=float, default=1e9, help="skip torch-struct sampling above B*T*Z^3*S"
    )
    args = p.parse_args()
    U, W, lengths = setup(args)
    B, T, Z = args.B, args.T, args.Z
    impls = args.impls or [i for i in IMPLS if not (args.device == "cpu" and i == "structift-loop")]
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for impl in impls:
        try:
            runs[impl] = build(impl, U, W)
        except ImportError as err:
            print(f"{impl} skipped: {err}")
    with torch.no_grad():
        tags = {k: r() for k, r in runs.items()}  # warm-up (and Triton compilation)
        best = {k: chain.score(U, W, lengths, t) for k, t in tags.items()}
        secs = median_times(runs, args.repeats, args.device)
    kernel = chain.resolve(None, U).name
    print(
        f"device={args.device} threads={args.threads} B={B} T={T} Z={Z} repeats={args.repeats}"
        f" structift kernel={kernel}"
    )
    print(f"{'Viterbi':<16} {'time ms':>10} {'time / structift':>17} {'max score gap':>14}")
    ref = best.get("structift")
    for name in runs:
        gap = (ref - best[name]).abs().max().item() if ref is not None else float("nan")
        ratio = secs[name] / secs["structift"] if "structift" in secs else float("nan")
        print(f"{name:<16} {1e3 * secs[name]:>10.3f} {ratio:>17.2f} {gap:>14.1e}")
    if args.samples <= 0:
        return
    samplers = {}
    for impl in ("structift", "structift-loop", "torch-struct"):
        if impl not in impls:
            continue
        work = B * T * Z**3 * args.samples
        if impl == "torch-struct" and work > args.ts_work:
            print(f"torch-struct sampling skipped: B*T*Z^3*S = {work:.1e} > --ts-work")
            continue
        try:
            samplers[impl] = build_sampler(impl, U, W, args.samples)
        except ImportError as err:
            print(f"{impl} skipped: {err}")
    for run in samplers.values():  # torch-struct samples through autograd: grad mode stays on
        run()
    secs = median_times(samplers, args.repeats, args.device)
    print(f"{f'sample S={args.samples}':<16} {'time ms':>10} {'time / structift':>17}")
    for name in samplers:
        ratio = secs[name] / secs["structift"] if "structift" in secs else float("nan")
        print(f"{name:<16} {1e3 * secs[name]:>10.3f} {ratio:>17.2f}")


if __name__ == "__main__":
    main()
