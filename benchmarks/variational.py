"""Time and peak memory of the IFT backward of regularized_argmax on a linear chain.

Same inputs for every method: unary [B, T, Z], binary [B, T-1, Z, Z], full lengths, a random
cotangent g on the marginals (float32 by default). Methods:

* ``forward-backward``: one log-partition forward + backward (the marginals): the unit.
* ``structured solve alone``: the covariance recursions at given marginals (what the
  structured linear solver costs without the custom_root plumbing and the residual VJP).
* ``ift/structured``: exact forward (forward-backward at θ/τ) + IFT backward through
  custom_root with the structured solve (covariance recursions).
* ``ift/minres``: the same with MINRES on the diagonally scaled KKT system (matrix-free).
* ``autograd double-backward``: μ = ∇A(θ) with create_graph, then the backward of ⟨g, μ⟩.
* ``unrolled message passing (K)``: K damped message-passing iterations under autograd, then
  the backward of ⟨g, μ_K⟩ (memory grows with K).
* ``ift/structured, iterative forward (K)``: K message-passing iterations under no_grad, then
  the structured IFT backward (memory must not grow with K).

"bwd" is the backward call alone; "fwd+bwd" the whole differentiable computation. Peak memory
is that of fwd+bwd above what was allocated before (CUDA: the caching allocator's peak; CPU: the
profiler's allocation trace replayed in time order). Times are medians over --repeats after one
warm-up (MINRES: one run after the warm-up); the machine is shared and noisy. Ratios are to one
forward-backward (its fwd+bwd time and peak memory).

Run:
    python benchmarks/variational.py                         # CPU: B=32, T=128, Z=32 and larger
    python benchmarks/variational.py --shapes 32x128x32 --iters 8 32 128
    python benchmarks/variational.py --device cuda --shapes 32x128x32 32x512x64
    python benchmarks/variational.py --curve --figure docs/variational/tolerance.png
    python benchmarks/variational.py --errors                # check_ift error table
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _memory import peak_bytes, sync

import structift as sf
from structift.implicit import MINRES, ConvergenceWarning
from structift.structures import chain
from structift.variational import (
    Iterative,
    Structured,
    chain_covariance_vector_product,
    chain_message_passing,
    check_ift,
    regularized_argmax,
)


def make_inputs(B: int, T: int, Z: int, device: torch.device, dtype: torch.dtype):
    """Potentials, lengths and a cotangent (reproducible)."""
    g = torch.Generator().manual_seed(0)
    unary = torch.randn(B, T, Z, generator=g, dtype=dtype).to(device)
    binary = torch.randn(B, T - 1, Z, Z, generator=g, dtype=dtype).to(device)
    lengths = torch.full((B,), T, dtype=torch.long, device=device)
    g_unary = torch.randn(B, T, Z, generator=g, dtype=dtype).to(device)
    g_binary = torch.randn(B, T - 1, Z, Z, generator=g, dtype=dtype).to(device)
    return unary, binary, lengths, g_unary, g_binary


def methods(args: argparse.Namespace, inputs) -> dict[str, Callable[[], Callable[[], object]]]:
    """Each entry builds the differentiable forward and returns its backward as a closure."""
    unary, binary, lengths, g_unary, g_binary = inputs
    minres = MINRES(rtol=args.minres_rtol, max_iter=args.minres_iters, on_failure="warn")

    def leaves():
        return unary.detach().requires_grad_(True), binary.detach().requires_grad_(True)

    def backward_of(mu_u, mu_b, u, w):
        def run() -> object:
            loss = (mu_u * g_unary).sum() + (mu_b * g_binary).sum()
            return torch.autograd.grad(loss, (u, w))

        return run

    def forward_backward():
        u, w = leaves()
        logz = chain.log_partition(u, w, lengths)
        return lambda: torch.autograd.grad(logz.sum(), (u, w))

    def ift(linear, solver="exact"):
        def build():
            u, w = leaves()
            crf = sf.LinearChainCRF(u, w, lengths, validate_args=False)
            mu = regularized_argmax(crf, 1.0, solver=solver, linear_solver=linear)
            return backward_of(mu.unary, mu.binary, u, w)

        return build

    def double_backward():
        u, w = leaves()
        logz = chain.log_partition(u, w, lengths)
        mu_u, mu_b = torch.autograd.grad(logz.sum(), (u, w), create_graph=True)
        return backward_of(mu_u, mu_b, u, w)

    def unrolled(K: int):
        def build():
            u, w = leaves()
            res = chain_message_passing(u, w, lengths, 1.0, tol=0.0, max_iter=K)
            return backward_of(res.mu_unary, res.mu_binary, u, w)

        return build

    def solve_alone():
        # The structured solve by itself: one covariance-vector product at exact marginals.
        with torch.no_grad():
            mu_u, mu_b = chain.marginals(unary, binary, lengths)
        return lambda: chain_covariance_vector_product(mu_u, mu_b, lengths, g_unary, g_binary)

    table: dict[str, Callable[[], Callable[[], object]]] = {
        "forward-backward": forward_backward,
        "structured solve alone (covariance product)": solve_alone,
        "ift/structured": ift("structured"),
        "autograd double-backward": double_backward,
    }
    if not args.skip_minres:
        table["ift/minres"] = ift(minres)
    for K in args.iters:
        table[f"unrolled message passing (K={K})"] = unrolled(K)
        solver = Iterative(tol=0.0, max_iter=K)
        table[f"ift/structured, iterative fwd (K={K})"] = ift(Structured(check=False), solver)
    return table


def bench_shape(B: int, T: int, Z: int, args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs = make_inputs(B, T, Z, device, dtype)
    print(f"\n### B={B}, T={T}, Z={Z} ({args.dtype}, {device.type})\n")
    print("| method | bwd (ms) | fwd+bwd (ms) | peak fwd+bwd (MiB) | bwd / fb | peak / fb |")
    print("|---|---|---|---|---|---|")
    base_time = base_mem = None
    for name, build in methods(args, inputs).items():
        try:
            # One warm-up, then medians; MINRES is slow on CPU, so it runs once.
            reps = 1 if "minres" in name else args.repeats
            fwd_times, bwd_times = [], []
            for _ in range(reps + 1):
                sync(device)
                start = time.perf_counter()
                run = build()
                sync(device)
                mid = time.perf_counter()
                run()
                sync(device)
                fwd_times.append(mid - start)
                bwd_times.append(time.perf_counter() - mid)
            bwd = statistics.median(bwd_times[1:])
            total = statistics.median([f + b for f, b in zip(fwd_times[1:], bwd_times[1:])])
            mem = peak_bytes(lambda b=build: b()(), device)
        except (RuntimeError, ValueError) as err:  # e.g. out of memory, no convergence
            print(f"| {name} | failed: {type(err).__name__}: {str(err)[:80]} | | | | |")
            continue
        if base_time is None:
            base_time, base_mem = total, mem
        print(
            f"| {name} | {bwd * 1e3:.1f} | {total * 1e3:.1f} | {mem / 2**20:.1f} | "
            f"{bwd / base_time:.2f} | {mem / max(base_mem, 1):.2f} |"
        )


def tolerance_curve(args: argparse.Namespace) -> None:
    """Gradient error of the IFT vs the forward solver's tolerance (float64), and a figure."""
    torch.manual_seed(0)
    B, T, Z = 4, 32, 8
    crf = sf.LinearChainCRF(
        torch.randn(B, T, Z, dtype=torch.float64) * 2,
        torch.randn(B, T - 1, Z, Z, dtype=torch.float64) * 2,
        torch.tensor([32, 30, 20, 7]),
    )
    tols = [10.0**-k for k in range(1, 14)]
    rows = []
    for tol in tols:
        gen = torch.Generator().manual_seed(0)
        solver = Iterative(tol=tol, damping=0.5)
        res = check_ift(crf, 1.0, solver, Structured(check=False), generator=gen)
        gen = torch.Generator().manual_seed(0)
        minres = MINRES(rtol=1e-11, max_iter=20_000, on_failure="warn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            dense = check_ift(crf, 1.0, solver, minres, generator=gen)
        rows.append(
            (tol, res.forward_error, res.forward_residual, res.max_rel_error, dense.max_rel_error)
        )
    print(f"\n### gradient error vs forward tolerance (B={B}, T={T}, Z={Z}, float64)\n")
    print(
        "| forward tol | forward max err | KKT residual | rel. grad err (structured) | rel. grad err (MINRES) |"
    )
    print("|---|---|---|---|---|")
    for tol, ferr, fres, gerr, merr in rows:
        print(f"| {tol:.0e} | {ferr:.2e} | {fres:.2e} | {gerr:.2e} | {merr:.2e} |")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.0, 3.4), dpi=110)
        ax.loglog([r[2] for r in rows], [r[3] for r in rows], "o-", label="IFT, structured solve")
        ax.loglog([r[2] for r in rows], [r[4] for r in rows], "s--", label="IFT, MINRES", alpha=0.8)
        ax.set_xlabel("KKT residual of the forward solution")
        ax.set_ylabel("rel. error vs autograd through A(θ)")
        ax.set_title("A loose forward gives a loose gradient")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure)
        print(f"\nfigure written to {args.figure}")


def error_table(args: argparse.Namespace) -> None:
    """check_ift's relative errors per family, linear solver, forward solver, dtype and τ."""
    g = torch.Generator().manual_seed(0)
    B, T, Z, V = 4, 12, 5, 7
    lengths = torch.tensor([12, 9, 5, 1])
    unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64) * 3
    binary = torch.randn(B, T - 1, Z, Z, generator=g, dtype=torch.float64) * 3
    binary[:, :, 0, 1] = float("-inf")  # hard constraints: the transition 0 -> 1 is forbidden
    logits = torch.randn(B, 10, generator=g, dtype=torch.float64) * 3
    logits[:, 3] = float("-inf")
    obs = torch.randint(0, V, (B, T), generator=g)
    hmm_params = [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((Z,), (Z, Z), (Z, V))]

    def family(name: str, dtype: torch.dtype):
        if name == "Categorical [4, 10]":
            return sf.Categorical(logits.to(dtype))
        if name == "LinearChainCRF [4, 12, 5]":
            return sf.LinearChainCRF(unary.to(dtype), binary.to(dtype), lengths)
        return sf.HMM(*(p.to(dtype) for p in hmm_params), obs, lengths)

    taus = (0.1, 1.0, 10.0)
    configs = [
        ("exact", "structured"),
        ("exact", "dense"),
        ("exact", MINRES(rtol=1e-12, max_iter=20_000)),
        (Iterative(tol=1e-13), "structured"),
    ]
    names = ["Categorical [4, 10]", "LinearChainCRF [4, 12, 5]", "HMM [4, 12, 5], V=7"]
    print("\n### check_ift: max relative error of the IFT VJP vs autograd through A(θ)\n")
    header = " | ".join(f"τ={t}" for t in taus)
    print(f"| family | dtype | forward | linear solver | {header} | max KKT residual |")
    print("|---|---|---|---|" + "---|" * len(taus) + "---|")
    for name in names:
        for dtype in (torch.float64, torch.float32):
            for solver, linear in configs:
                if dtype == torch.float32 and not (solver == "exact" and linear == "structured"):
                    continue
                errs, res = [], 0.0
                for tau in taus:
                    gen = torch.Generator().manual_seed(1)
                    out = check_ift(family(name, dtype), tau, solver, linear, 4, gen)
                    errs.append(f"{out.max_rel_error:.1e}")
                    res = max(res, out.forward_residual)
                fwd = "exact" if solver == "exact" else "iterative"
                lin = linear if isinstance(linear, str) else "minres"
                dt = str(dtype).replace("torch.", "")
                print(f"| {name} | {dt} | {fwd} | {lin} | {' | '.join(errs)} | {res:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--shapes", nargs="+", default=["32x128x32", "32x256x32", "32x128x64"])
    parser.add_argument("--iters", nargs="*", type=int, default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--minres-rtol", type=float, default=1e-4)
    parser.add_argument("--minres-iters", type=int, default=2000)
    parser.add_argument("--skip-minres", action="store_true")
    parser.add_argument("--curve", action="store_true", help="only the tolerance curve")
    parser.add_argument("--errors", action="store_true", help="only the check_ift error table")
    parser.add_argument("--figure", default="", help="write the curve's PNG here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.curve:
        tolerance_curve(args)
        return
    if args.errors:
        error_table(args)
        return
    if args.smoke:
        args.shapes, args.iters, args.repeats = ["2x8x3"], [4], 1
    for shape in args.shapes:
        B, T, Z = (int(x) for x in shape.split("x"))
        bench_shape(B, T, Z, args)


if __name__ == "__main__":
    main()
