"""Benchmark: linear-chain log Z + marginals (forward + backward) against torch-struct and pytorch-crf.

All implementations get the same model in one process: emissions ``U`` [B, T, Z] and one
transition matrix ``W`` [Z, Z] (pytorch-crf's model; its start/end transitions are set to 0),
all lengths = T, float32. Each one receives it in its own native layout, built before timing:

* ``structift``      ``chain.log_partition(U, W, lengths)``: ``W`` passed as [Z, Z] (broadcast).
* ``structift-full`` ``chain.log_partition(U, B_full, lengths)``: ``B_full`` = ``W`` copied to a
  [B, T-1, Z, Z] leaf (the general per-position case, same math).
* ``structift-scaled``, ``structift-full-scaled``: the same two with
  ``backend 'scaled'`` (on CUDA the default is the fused Triton kernel; on CPU the
  two are the same kernel, so these rows are skipped there).
* ``pytorch-crf``    ``CRF._compute_normalizer`` (its log Z) with ``transitions = W``.
* ``torch-struct``   ``LinearChainCRF(phi, lengths).partition`` where
  ``phi[b, n, to, from] = W[from, to] + U[b, n+1, to] + [n == 0] U[b, 0, from]``
  (its [to, from] layout with the first emission folded into the first edge).

Timed: log Z of the batch, ``.sum().backward()`` to every input leaf (the backward of log Z
is the marginals). Reported: median over interleaved repeats, extra peak memory during
forward + backward (gradients included; CPU: peak RSS of a fresh subprocess per
implementation, measured from after the inputs exist; CUDA: ``max_memory_allocated``), ratios
``peer / structift`` and the max |log Z - log Z_structift|.

Usage::

    python benchmarks/chain.py --quick            # B=32, T=128, Z=32 only
    python benchmarks/chain.py                    # the grid B in {32,256}, T in {32,128,512}, Z in {8,32,128}
    python benchmarks/chain.py -B 256 -T 128 -Z 32 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _peers import pytorch_crf, torch_struct_potentials, with_kernel

from structift.structures import chain

IMPLS = [
    "structift",
    "structift-full",
    "structift-scaled",
    "structift-full-scaled",
    "pytorch-crf",
    "torch-struct",
]


def make_inputs(B: int, T: int, Z: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, T, Z, generator=g).to(device)
    W = (0.5 * torch.randn(Z, Z, generator=g)).to(device)
    return {"U": U, "W": W, "lengths": torch.full((B,), T, device=device)}


def build(impl: str, inp: dict) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """Return ``run() -> log Z (detached)`` doing forward + backward, and its input leaves."""
    U0, W0, lengths = inp["U"], inp["W"], inp["lengths"]
    B, T, Z = U0.shape
    if impl.endswith("-scaled"):
        base_run, leaves = build(impl.removesuffix("-scaled"), inp)

        return with_kernel("scaled", base_run), leaves
    if impl in ("structift", "structift-full"):
        U = U0.clone().requires_grad_(True)
        if impl == "structift":
            Wl = W0.clone().requires_grad_(True)
        else:
            Wl = W0.expand(B, T - 1, Z, Z).contiguous().requires_grad_(True)
        leaves = [U, Wl]

        def run() -> torch.Tensor:
            log_z = chain.log_partition(U, Wl, lengths)
            log_z.sum().backward()
            return log_z.detach()

        return run, leaves
    if impl == "pytorch-crf":
        crf = pytorch_crf(W0)
        emissions = U0.transpose(0, 1).contiguous().requires_grad_(True)  # (T, B, Z)
        mask = torch.ones(T, B, dtype=torch.bool, device=U0.device)

        def run() -> torch.Tensor:
            log_z = crf._compute_normalizer(emissions, mask)
            log_z.sum().backward()
            return log_z.detach()

        return run, [emissions, *crf.parameters()]
    if impl == "torch-struct":
        import torch_struct

        phi = torch_struct_potentials(U0, W0).requires_grad_(True)  # shape: (B, T-1, to, from)

        def run() -> torch.Tensor:
            log_z = torch_struct.LinearChainCRF(phi, lengths).partition
            log_z.sum().backward()
            return log_z.detach()

        return run, [phi]
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def estimated_bytes(impl: str, B: int, T: int, Z: int) -> float:
    """Rough peak bytes, to skip what would not fit (float32)."""
    full = 4.0 * B * (T - 1) * Z * Z
    impl = impl.removesuffix("-scaled")
    return {
        "structift": 4.0 * B * T * Z * 6,
        "structift-full": 2.2 * full,
        "pytorch-crf": 2.5 * full,  # autograd keeps a [B, Z, Z] score per step
        "torch-struct": 12.0 * full,
    }[impl]


def skip_reason(impl: str, B: int, T: int, Z: int, args: argparse.Namespace) -> str | None:
    if impl.endswith("-scaled") and args.device == "cpu":
        return f"{impl} skipped: on CPU it is the same kernel as {impl.removesuffix('-scaled')}"
    if impl == "torch-struct" and B * T * Z**3 > args.ts_work:
        return f"torch-struct skipped: B*T*Z^3 = {B * T * Z**3:.1e} > --ts-work {args.ts_work:.1e}"
    need = estimated_bytes(impl, B, T, Z)
    if need > args.max_bytes:
        return f"{impl} skipped: needs about {need / 2**30:.1f} GiB > --max-bytes"
    return None


Built = tuple[Callable[[], torch.Tensor], list[torch.Tensor]]


def time_impls(runs: dict[str, Built], repeats: int, cuda: bool) -> dict:
    """Median seconds per implementation, rounds interleaved so drift hits all alike.

    Gradients are cleared (untimed) before every call, so no call pays for accumulation.
    """
    for run, _ in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, (run, leaves) in runs.items():
            for leaf in leaves:
                leaf.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_memory(impl: str, B: int, T: int, Z: int, threads: int) -> None:
    """In a fresh process: extra peak RSS of one forward + backward, printed as JSON."""
    torch.set_num_threads(threads)
    small, _ = build(impl, make_inputs(2, 4, 3, "cpu"))
    small()  # load libraries and lazy state before measuring
    run, _leaves = build(impl, make_inputs(B, T, Z, "cpu"))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM)
    base = _rss_bytes("VmRSS:")
    run()
    print(json.dumps({"extra": _rss_bytes("VmHWM:") - base}))


def memory(impl: str, B: int, T: int, Z: int, args: argparse.Namespace) -> float:
    """Extra peak bytes of forward + backward (see module docstring)."""
    if args.device == "cuda":
        run, leaves = build(impl, make_inputs(B, T, Z, "cuda"))
        run()
        for leaf in leaves:
            leaf.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    cmd = [sys.executable, __file__, "--child", impl, str(B), str(T), str(Z), str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


def copy_bandwidth(device: str) -> float:
    """Device copy bandwidth in bytes/s (read + write of a 256 MiB buffer, best of 5)."""
    x = torch.empty(64 * 2**20, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * x.element_size() / best


def run_config(B: int, T: int, Z: int, args: argparse.Namespace) -> list[dict]:
    inp = make_inputs(B, T, Z, args.device)
    runs, notes = {}, []
    for impl in args.impls:
        reason = skip_reason(impl, B, T, Z, args)
        if reason:
            notes.append(reason)
            continue
        try:
            runs[impl] = build(impl, inp)
        except ImportError as err:  # a peer that is not installed (e.g. on a bare GPU image)
            notes.append(f"{impl} skipped: {err}")
    values = {k: r() for k, (r, _) in runs.items()}
    secs = time_impls(runs, args.repeats, args.device == "cuda")
    ref = values.get("structift")
    rows = []
    for impl in runs:
        mem = memory(impl, B, T, Z, args) if not args.no_memory else float("nan")
        diff = (values[impl] - ref).abs().max().item() if ref is not None else float("nan")
        rows.append(
            {"B": B, "T": T, "Z": Z, "impl": impl, "s": secs[impl], "mem": mem, "diff": diff}
        )
    del runs, values, inp
    gc.collect()
    for n in notes:
        print(f"{B:>4} {T:>4} {Z:>4}  note: {n}")
    return rows


HEADER = (
    f"{'B':>4} {'T':>4} {'Z':>4}  {'implementation':<15} {'time ms':>9} {'extra MiB':>10}"
    f" {'x potentials':>12} {'time / structift':>16} {'mem / structift':>15} {'|dlogZ|':>9}"
)


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    by_cfg: dict[tuple, dict] = {}
    for r in rows:
        by_cfg.setdefault((r["B"], r["T"], r["Z"]), {})[r["impl"]] = r
    for (B, T, Z), impls in by_cfg.items():
        pot = 4.0 * B * (T - 1) * Z * Z
        base = impls.get("structift")
        for name, r in impls.items():
            tr = r["s"] / base["s"] if base else float("nan")
            mr = r["mem"] / base["mem"] if base and base["mem"] > 0 else float("nan")
            print(
                f"{B:>4} {T:>4} {Z:>4}  {name:<15} {1e3 * r['s']:>9.2f} {r['mem'] / 2**20:>10.1f}"
                f" {r['mem'] / pot:>12.2f} {tr:>16.2f} {mr:>15.2f} {r['diff']:>9.1e}"
            )
        if args.floor and "structift-full" in impls:
            floor = 3 * pot / args.bandwidth
            ratios = ", ".join(
                f"{name} {impls[name]['s'] / floor:.1f}x"
                for name in ("structift-full", "structift-full-scaled")
                if name in impls
            )
            print(
                f"{'':>14}  bandwidth floor (3 x {pot / 2**20:.1f} MiB / {args.bandwidth / 1e9:.0f} GB/s)"
                f" = {1e3 * floor:.3f} ms; the floor times: {ratios}"
            )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-B", type=int, nargs="*", default=[32, 256])
    p.add_argument("-T", type=int, nargs="*", default=[32, 128, 512])
    p.add_argument("-Z", type=int, nargs="*", default=[8, 32, 128])
    p.add_argument("--quick", action="store_true", help="only the target point B=32, T=128, Z=32")
    p.add_argument(
        "--impls", nargs="*", default=None, choices=IMPLS, help="default: all (CPU: no -scaled)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats (median reported)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--floor", action="store_true", help="print the bandwidth-floor line")
    p.add_argument(
        "--ts-work",
        type=float,
        default=4 * 32 * 128 * 32**3,
        help="skip torch-struct above this B*T*Z^3",
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        default=3 * 2**30,
        help="skip an implementation estimated above this",
    )
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        impl, B, T, Z, threads = args.child
        child_memory(impl, int(B), int(T), int(Z), int(threads))
        return
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    if args.quick:
        args.B, args.T, args.Z = [32], [128], [32]
    if args.impls is None:
        cpu = args.device == "cpu"
        args.impls = [i for i in IMPLS if not (cpu and i.endswith("-scaled"))]
    kernel = chain.resolve(None, torch.zeros(1, 2, 1, device=args.device)).name
    args.bandwidth = copy_bandwidth(args.device) if args.floor else float("nan")
    print(
        f"device={args.device} threads={args.threads} torch={torch.__version__} repeats={args.repeats}"
        f" structift kernel={kernel}"
        + (f" copy bandwidth={args.bandwidth / 1e9:.1f} GB/s" if args.floor else "")
    )
    print(HEADER, flush=True)
    for B in args.B:
        for T in args.T:
            for Z in args.Z:
                print_table(run_config(B, T, Z, args), args)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
