"""Benchmark the QP layer against qpth 0.0.18 (and cvxpylayers when installed).

Forward + backward of a batch of strictly convex QPs with n variables, m = n inequalities and
p equalities (default 0), built from a chosen primal-dual solution so the exact z* is known.
Every library gets the same inputs in the same process. Reported per library: time (best of
--repeats), peak memory, max |z − z*| and the relative error of the directional derivative
⟨∇_q ℓ, v⟩ + ⟨∇_h ℓ, v'⟩ against central finite differences of a float64 structift solve.

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the peak resident-set growth of
one forward + backward (sampled every 0.5 ms from /proc/self/statm) in a fresh child process
per library and size that loads the very same inputs: in one shared process the allocator's
reuse of memory freed by an earlier run would hide it.

Run (one thread by default):
    .venv/bin/python benchmarks/qp.py                       # n ∈ {10, 50, 100}, float32/64
    .venv/bin/python benchmarks/qp.py --n 100 --dtype float64 --repeats 5
    .venv/bin/python benchmarks/qp.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from structift.layers import qp_solve


def known_qp(B: int, n: int, m: int, p: int, seed: int) -> dict[str, torch.Tensor]:
    """Random strictly convex QPs with known solution (float64, see tests/layers/qp_problems)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.float64
    L = torch.randn(B, n, n, generator=g, dtype=f)
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=f)
    G, A = torch.randn(B, m, n, generator=g, dtype=f), torch.randn(B, p, n, generator=g, dtype=f)
    z, nu = torch.randn(B, n, generator=g, dtype=f), torch.randn(B, p, generator=g, dtype=f)
    # About half of the n - p degrees of freedom pinned by active constraints (LICQ holds).
    active = torch.rand(B, m, generator=g) < min(0.5, 0.5 * (n - p) / max(m, 1))
    lam = torch.where(active, 0.2 + torch.rand(B, m, generator=g, dtype=f), 0.0)
    s = torch.where(active, 0.0, 0.2 + torch.rand(B, m, generator=g, dtype=f))
    h = (G @ z[..., None])[..., 0] + s
    b = (A @ z[..., None])[..., 0]
    q = -(Q @ z[..., None] + G.mT @ lam[..., None] + A.mT @ nu[..., None])[..., 0]
    return {"Q": Q, "q": q, "G": G, "h": h, "A": A, "b": b, "z": z}


Solver = Callable[..., torch.Tensor]


def structift_solver(Q, q, G, h, A, b):
    return qp_solve(Q, q, G, h, A, b) if A.shape[-2] else qp_solve(Q, q, G, h)


def qpth_solver(Q, q, G, h, A, b):
    from qpth.qp import QPFunction

    if A.shape[-2] == 0:
        A = b = torch.empty(0, dtype=Q.dtype, device=Q.device)
    return QPFunction(verbose=-1)(Q, q, G, h, A, b)


def cpu_peak_memory(library: str, data: dict[str, torch.Tensor], w: torch.Tensor) -> int:
    """Return the peak RSS growth (bytes) of one forward + backward in a fresh process.

    The child loads the very inputs (saved here) so that nothing but the solve raises its
    high-water mark after the baseline.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.pt")
        torch.save({"data": data, "w": w}, path)
        cmd = [sys.executable, __file__, "--memory-probe", library, "--inputs", path]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def memory_probe(library: str, path: str) -> None:
    """Child process: warm up on a tiny problem, load the inputs, print the RSS growth."""
    torch.set_num_threads(1)
    solve = {"structift": structift_solver, "qpth": qpth_solver}[library]
    saved = torch.load(path)
    data, w = saved["data"], saved["w"]
    tiny = {k: v.to(w.dtype) for k, v in known_qp(2, 3, 3, 0, seed=0).items()}
    run_once(solve, tiny, torch.ones(2, 3, dtype=w.dtype), torch.device("cpu"))
    # ru_maxrss keeps the transient peak of importing torch; sample the current RSS instead.
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_once(solve, data, w, torch.device("cpu"))
    done.set()
    thread.join()
    print(max(peak[0], rss()) - base)


def run_once(solve: Solver, data: dict[str, torch.Tensor], w: torch.Tensor, device: torch.device):
    q = data["q"].clone().requires_grad_()
    h = data["h"].clone().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    z = solve(data["Q"], q, data["G"], h, data["A"], data["b"])
    (z * w).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    assert q.grad is not None and h.grad is not None
    return elapsed, mem, z.detach(), q.grad, h.grad


def bench(
    name: str,
    solve: Solver,
    data: dict[str, torch.Tensor],
    w: torch.Tensor,
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    run_once(solve, data, w, device)  # warm-up
    times, mems = [], []
    for _ in range(repeats):
        t, mem, z, gq, gh = run_once(solve, data, w, device)
        times.append(t)
        mems.append(mem)
    return {"time": min(times), "mem": max(mems), "z": z, "gq": gq, "gh": gh}


def directional_loss(
    base: dict[str, torch.Tensor], w: torch.Tensor, vq: torch.Tensor, vh: torch.Tensor, t: float
) -> float:
    """Return ⟨w, z*(q + t vq, h + t vh)⟩ by a float64 structift solve."""
    z = qp_solve(base["Q"], base["q"] + t * vq, base["G"], base["h"] + t * vh, base["A"], base["b"])
    return float((z * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--p", type=int, default=0, help="equality constraints (default 0); m = n")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: leave torch's default)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.inputs)
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peers: dict[str, Solver] = {"structift": structift_solver, "qpth": qpth_solver}
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}"
    )
    if importlib.util.find_spec("cvxpylayers") is None:
        print("cvxpylayers is not installed: not benchmarked")
    print(
        "| n | m | p | dtype | library | time (s) | peak mem (MiB) | max abs z err | dir. deriv. rel err |"
        " time ratio (qpth / structift) | mem ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        base = known_qp(args.batch, n, n, args.p, seed=n)
        g = torch.Generator().manual_seed(n + 1)
        w64 = torch.randn(args.batch, n, generator=g, dtype=torch.float64)
        vq = torch.randn(args.batch, n, generator=g, dtype=torch.float64)
        vh = torch.randn(args.batch, n, generator=g, dtype=torch.float64)
        # Reference directional derivative: central differences of a float64 structift solve.
        eps = 1e-6

        fd = (
            directional_loss(base, w64, vq, vh, eps) - directional_loss(base, w64, vq, vh, -eps)
        ) / (2 * eps)
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            data = {k: v.to(device=device, dtype=dtype) for k, v in base.items()}
            w = w64.to(device=device, dtype=dtype)
            results = {
                name: bench(name, fn, data, w, args.repeats, device) for name, fn in peers.items()
            }
            if device.type == "cpu":
                for name in results:
                    results[name]["mem"] = cpu_peak_memory(name, data, w)
            for name, r in results.items():
                zerr = (r["z"].double().cpu() - base["z"]).abs().max().item()
                dd = float(
                    (r["gq"].double().cpu() * vq).sum() + (r["gh"].double().cpu() * vh).sum()
                )
                derr = abs(dd - fd) / max(abs(fd), 1e-12)
                ratio_t = results["qpth"]["time"] / r["time"]
                small = min(results["qpth"]["mem"], r["mem"]) < 2**20  # below RSS resolution
                ratio_m = "—" if small else f"{results['qpth']['mem'] / r['mem']:.2f}"
                print(
                    f"| {n} | {n} | {args.p} | {dtype_name} | {name} | {r['time']:.4f} | {r['mem'] / 2**20:.1f} |"
                    f" {zerr:.1e} | {derr:.1e} | {ratio_t:.2f} | {ratio_m} |"
                )


if __name__ == "__main__":
    main()
