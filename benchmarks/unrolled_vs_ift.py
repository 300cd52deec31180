"""Memory and time of unrolled autograd vs the IFT backward (seed Fig. 1).

The problem: softmax as the entropy-regularized argmax z*(θ) = argmax_{z ∈ Δⁿ} ⟨θ, z⟩ + H(z),
solved by K steps of entropic mirror descent (log z ← (1 − ρ) log z + ρ θ, renormalized; the
error contracts by 1 − ρ per step). Two ways to get ∂⟨w, z_K⟩/∂θ:

* ``unrolled``: autograd through the K steps (memory grows like K · n);
* ``ift``: the same K steps under no_grad, then structift.implicit.custom_root on the KKT
  residual (row-scaled form, GMRES; structift.variational.simplex.solve_kkt): memory flat in K.

Both gradients are compared with the closed form vjp of softmax, z ⊙ (w − ⟨z, w⟩), in float64.
Each (method, n, K) runs in a fresh subprocess so that peak memory is honest: on CPU the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs after setup) minus the RSS
before the run, with glibc told to return every freed buffer of 16 KiB or more to the OS
(MALLOC_MMAP_THRESHOLD_), so the RSS follows the live tensors (times come from a second
subprocess with the default allocator); on CUDA torch.cuda.max_memory_allocated minus the
memory allocated before.
Times are one fwd+bwd after a small warm-up, one thread on CPU.

Run:
    python benchmarks/unrolled_vs_ift.py                      # CPU default grid (~2-4 min)
    python benchmarks/unrolled_vs_ift.py --n 1000000 --K 10 100 1000 --max-gb 16
    python benchmarks/unrolled_vs_ift.py --device cuda --n 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from structift.variational.simplex import mirror_descent, solve_kkt

# Measured on this machine's CPU: unrolled mirror descent keeps one n-vector per step alive
# for the backward (logsumexp's input); used only to skip runs that would exceed --max-gb.
UNROLLED_VECTORS_PER_STEP = 1.05


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_once(method: str, n: int, K: int, rho: float, device: str, dtype: torch.dtype) -> dict:
    """One fwd+bwd; returns time, peak memory above baseline and gradient error."""
    gen = torch.Generator().manual_seed(0)
    theta64 = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    w64 = torch.randn(n, generator=gen, dtype=torch.float64)
    theta = theta64.to(device=device, dtype=dtype)
    w = w64.to(device=device, dtype=dtype)

    def fwd_bwd(t0: torch.Tensor, wv: torch.Tensor, steps: int) -> torch.Tensor:
        t = t0.clone().requires_grad_(True)
        if method == "unrolled":
            z = mirror_descent(t, steps=steps, step_size=rho)
        else:
            z = solve_kkt(t, method="mirror_descent", steps=steps, step_size=rho).z
        (g,) = torch.autograd.grad((wv * z).sum(), t)
        return g

    # Warm-up (lazy imports, first-call overheads) on a tiny problem, so that memory it frees
    # and the allocator keeps is negligible next to the measured run.
    fwd_bwd(theta[:1000].contiguous(), w[:1000].contiguous(), 2)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact_peak = _reset_peak()
        base = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    g = fwd_bwd(theta, w, K)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        exact_peak = True
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    z = torch.softmax(theta64, -1)
    ref = z * (w64 - (z * w64).sum())
    err = float((g.double().cpu() - ref).norm() / ref.norm())
    return {
        "method": method,
        "n": n,
        "K": K,
        "seconds": seconds,
        "peak_bytes": max(peak, 0),
        "peak_exact": exact_peak,
        "grad_rel_error": err,
    }


def _worker(method: str, n: int, K: int, args: argparse.Namespace, for_memory: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(K)]
    cmd += ["--rho", str(args.rho), "--device", args.device, "--dtype", args.dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        if for_memory:
            # A fixed mmap threshold returns every freed buffer >= 16 KiB to the OS, so the
            # peak RSS tracks live tensors instead of what glibc's free lists retain. It slows
            # allocation (fresh pages each time), so times come from a separate default run.
            env.update(MALLOC_MMAP_THRESHOLD_="16384", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {method} n={n} K={K} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spawn(method: str, n: int, K: int, args: argparse.Namespace) -> dict:
    """Memory from one subprocess, time from another (CPU); both from one run on CUDA."""
    row = _worker(method, n, K, args, for_memory=True)
    if args.device == "cpu":
        row["seconds"] = _worker(method, n, K, args, for_memory=False)["seconds"]
    return row


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return f"{b:.1f} GiB"


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=100)
    ns = sorted({r["n"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(ns):
        for method, style in (("unrolled", "-o"), ("ift", "--s")):
            pts = sorted(
                (r["K"], r["peak_bytes"]) for r in rows if r["n"] == n and r["method"] == method
            )
            if pts:
                ks, mem = zip(*pts)
                ax.loglog(
                    ks,
                    [max(m, 1024) / 2**20 for m in mem],
                    style,
                    color=colors[i % len(colors)],
                    label=f"{method}, n = {n:.0e}",
                )
    ax.set_xlabel("mirror-descent iterations K")
    ax.set_ylabel(f"peak memory above baseline (MiB, {device})")
    ax.set_title("Unrolled autograd vs IFT backward (entropic argmax)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "K"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--K", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    p.add_argument("--rho", type=float, default=0.1, help="mirror-descent step ρ")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument(
        "--max-gb", type=float, default=2.0, help="skip unrolled runs estimated above this"
    )
    p.add_argument("--plot", type=Path, default=Path("docs/implicit/unrolled_vs_ift.png"))
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.worker:
        torch.set_num_threads(1) if args.device == "cpu" else None
        method, n, K = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print(json.dumps(run_once(method, n, K, args.rho, args.device, dtype)))
        return []
    rows = []
    header = "| n | K | unrolled peak | IFT peak | ratio | unrolled s | IFT s | unrolled grad err | IFT grad err |"
    print(header)
    print("|" + "---|" * 9)
    for n in args.n:
        for K in args.K:
            est = UNROLLED_VECTORS_PER_STEP * n * K * dtype.itemsize
            un = spawn("unrolled", n, K, args) if est <= args.max_gb * 2**30 else None
            ift = spawn("ift", n, K, args)
            rows += [r for r in (un, ift) if r is not None]
            if un is None:
                print(
                    f"| {n:.0e} | {K} | skipped (~{fmt_bytes(est)}) | {fmt_bytes(ift['peak_bytes'])} | — | — "
                    f"| {ift['seconds']:.3f} | — | {ift['grad_rel_error']:.1e} |",
                    flush=True,
                )
                continue
            ratio = un["peak_bytes"] / max(ift["peak_bytes"], 1)
            print(
                f"| {n:.0e} | {K} | {fmt_bytes(un['peak_bytes'])} | {fmt_bytes(ift['peak_bytes'])} | {ratio:.{1 if ratio < 10 else 0}f}× "
                f"| {un['seconds']:.3f} | {ift['seconds']:.3f} | {un['grad_rel_error']:.1e} "
                f"| {ift['grad_rel_error']:.1e} |",
                flush=True,
            )
    if not all(r["peak_exact"] for r in rows):
        print("note: /proc/self/clear_refs unavailable; peaks include earlier process peaks")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot and rows:
        plot(rows, args.plot, args.device)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
