"""Time the fused chain kernel's launch settings on a GPU (warps per program, prefetching).

The defaults of the ``Fused`` backend's fields (``warps``, ``prefetch``) are reasoned, not
measured. This script times log Z + marginals (forward + backward, per-position binary
``[B, T-1, Z, Z]`` and a shared ``[Z, Z]``) for every combination at one shape, checks each
against the default's result, and prints the bandwidth floor for reference.

Usage::

    python benchmarks/tune_fused.py --device cuda            # B=256 T=128 Z=32
    TRITON_INTERPRET=1 python benchmarks/tune_fused.py --device cpu -B 2 -T 8 -Z 4 --repeats 1
"""

from __future__ import annotations

import itertools

import torch
from _peers import chain_parser, median_times, setup

from structift.structures import chain
from structift.structures.chain import Fused


def timed(run, repeats: int, device: str) -> float:
    """Median seconds of ``run`` after one untimed call (which compiles its specialization)."""
    run()
    return median_times({"run": run}, repeats, device)["run"]


def main() -> None:
    p = chain_parser(__doc__, repeats=20, B=256)
    args = p.parse_args()
    cuda = args.device == "cuda"
    U, shared, lengths = setup(args)
    B, T, Z = args.B, args.T, args.Z
    U.requires_grad_(True)
    full = shared.expand(B, T - 1, Z, Z).contiguous().requires_grad_(True)
    shared.requires_grad_(True)

    default = Fused()

    def make(W: torch.Tensor, backend: Fused = default):
        def run() -> torch.Tensor:
            U.grad = W.grad = None
            log_z = chain.log_partition(U, W, lengths, backend=backend)
            log_z.sum().backward()
            return W.grad

        return run

    pot = 4.0 * B * (T - 1) * Z * Z
    print(f"device={args.device} B={B} T={T} Z={Z} repeats={args.repeats}")
    if cuda:
        x = torch.empty(64 * 2**20, device="cuda")
        y = torch.empty_like(x)
        bw = 2 * x.numel() * 4 / timed(lambda: y.copy_(x), 5, "cuda")
        print(
            f"bandwidth floor: 3 x {pot / 2**20:.1f} MiB / {bw / 1e9:.0f} GB/s = {3e3 * pot / bw:.3f} ms"
        )
    print(f"{'warps':>5} {'prefetch':>8} {'full ms':>9} {'shared ms':>10} {'max |dgrad|':>12}")
    ref = make(full)().clone()
    for warps, prefetch in itertools.product((None, 1, 2, 4, 8), (None, True, False)):
        backend = Fused(warps=warps, prefetch=prefetch)  # the knobs are the backend's fields
        try:
            t_full = timed(make(full, backend), args.repeats, args.device)
            t_shared = timed(make(shared, backend), args.repeats, args.device)
            diff = (make(full, backend)() - ref).abs().max().item()
        except Exception as err:  # a setting that does not compile: report it, go on
            print(f"{warps!s:>5} {prefetch!s:>8}  failed: {type(err).__name__}: {err}"[:160])
            continue
        print(
            f"{warps!s:>5} {prefetch!s:>8} {1e3 * t_full:>9.3f} {1e3 * t_shared:>10.3f}"
            f" {diff:>12.1e}"
        )


if __name__ == "__main__":
    main()
