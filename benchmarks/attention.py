"""Time and peak memory of attention weights: structured (autograd vs IFT backward) vs softmax.

All methods run in this one process on the same inputs: scores ``[B, T]`` (one query per
sequence), ragged lengths in [T/2, T], shared 2×2 pairwise potentials, a random cotangent.

* ``structured/autograd``: marginals by forward-backward with ``create_graph=True``; the
  backward is a double backward through the log-partition (Hessian-vector product).
* ``structured/ift``: the variational IFT backward (structift.variational), when available.
* ``softmax`` and ``sparsemax``: for scale.

"fwd" times the weights without gradient tracking; "fwd+bwd" times weights + backward of
⟨cotangent, weights⟩ to the scores and pairwise potentials. Peak memory is that of fwd+bwd
above what was allocated before (CUDA: the caching allocator's peak; CPU: the profiler's
allocation trace). Times are medians over --repeats after one warm-up.

Run:
    python benchmarks/attention.py                       # CPU, default shapes
    python benchmarks/attention.py --device cuda --shapes 256x128 64x512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from structift.layers import attention_weights

METHODS: dict[str, dict[str, str]] = {
    "softmax": {"kind": "softmax"},
    "sparsemax": {"kind": "sparsemax"},
    "structured/autograd": {"kind": "structured", "gradient": "autograd"},
    "structured/ift": {"kind": "structured", "gradient": "ift"},
}


def sync(device: torch.device) -> None:
    """Wait for queued device work so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each event's self memory is what it allocated (+) or freed (−); replaying them in order
    # of start time gives the running total of live bytes.
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def make_inputs(B: int, T: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Scores [B, T], pairwise [2, 2], lengths [B], cotangent [B, T] (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    binary = torch.randn(2, 2, generator=g, dtype=dtype).to(device)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g).to(device)
    cotangent = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    return scores, binary, lengths, cotangent


def bench_one(method: str, B: int, T: int, args: argparse.Namespace) -> dict[str, float] | str:
    """Measure one method on one shape; return its numbers or why it could not run."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scores, binary, lengths, cotangent = make_inputs(B, T, device, dtype)
    options = dict(METHODS[method])
    structured = options["kind"] == "structured"

    def forward() -> torch.Tensor:
        with torch.no_grad():
            extra = {"binary": binary} if structured else {}
            return attention_weights(scores, lengths, **options, **extra)  # type: ignore[arg-type]

    def forward_backward() -> None:
        s = scores.detach().requires_grad_(True)
        p = binary.detach().requires_grad_(True)
        extra = {"binary": p} if structured else {}
        w = attention_weights(s, lengths, **options, **extra)  # type: ignore[arg-type]
        inputs = (s, p) if structured else (s,)
        torch.autograd.grad((w * cotangent).sum(), inputs)

    try:
        forward_backward()
    except (NotImplementedError, ImportError) as err:
        return f"not available ({str(err).split(';')[0]})"
    return {
        "fwd_ms": 1e3 * median_seconds(forward, device, args.repeats),
        "fwdbwd_ms": 1e3 * median_seconds(forward_backward, device, args.repeats),
        "peak_mib": peak_bytes(forward_backward, device) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every method on every shape and print a table with ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--shapes", nargs="+", default=["64x64", "256x128", "32x512"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}, {args.dtype}, torch {torch.__version__}, threads {args.threads}")
    base = "structured/autograd"
    print("| B×T | method | fwd ms | fwd+bwd ms | peak MiB | time / autograd | memory / autograd |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        rows = {m: bench_one(m, B, T, args) for m in METHODS}
        ref = rows[base]
        for method, r in rows.items():
            if isinstance(r, str):
                print(f"| {B}×{T} | {method} | {r} | | | | |")
                continue
            assert isinstance(ref, dict)
            t_ratio = r["fwdbwd_ms"] / ref["fwdbwd_ms"]
            m_ratio = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else float("nan")
            print(
                f"| {B}×{T} | {method} | {r['fwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
                f"{r['peak_mib']:.2f} | {t_ratio:.3g} | {m_ratio:.3g} |"
            )


if __name__ == "__main__":
    main()
