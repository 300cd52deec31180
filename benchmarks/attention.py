"""Time and peak memory of attention weights: structured (autograd vs IFT backward) vs softmax.

All methods run in this one process on the same inputs: scores ``[B, T]`` (one query per
sequence), ragged lengths in [T/2, T], shared 2×2 pairwise potentials, a random cotangent.

* ``structured/autograd``: marginals by forward-backward with ``create_graph=True``; the
  backward is a double backward through the log-partition (Hessian-vector product).
* ``structured/ift``: the variational IFT backward (structift.variational), when available.
* ``softmax`` and ``sparsemax``: for scale.

"fwd" times the weights with the autograd graph built; "bwd" times the backward of
⟨cotangent, weights⟩ to the scores and the pairwise potentials. Peak memory is that of fwd+bwd
above what was allocated before (CUDA: the caching allocator's peak; CPU: the profiler's
allocation trace). Times are medians over --repeats after one warm-up; the repeats of all
methods are interleaved so that load from other processes hits them alike.

Run:
    python benchmarks/attention.py                       # CPU, default shapes
    python benchmarks/attention.py --device cuda --shapes 256x128 64x512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _memory import peak_bytes, sync

from structift.layers import attention_weights

METHODS: dict[str, dict[str, str]] = {
    "softmax": {"kind": "softmax"},
    "sparsemax": {"kind": "sparsemax"},
    "structured/autograd": {"kind": "structured", "gradient": "autograd"},
    "structured/ift": {"kind": "structured", "gradient": "ift"},
}


def make_inputs(B: int, T: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Scores [B, T], pairwise [2, 2], lengths [B], cotangent [B, T] (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    binary = torch.randn(2, 2, generator=g, dtype=dtype).to(device)
    lengths = torch.randint(max(1, T // 2), T + 1, (B,), generator=g).to(device)
    cotangent = torch.randn(B, T, generator=g, dtype=dtype).to(device)
    return scores, binary, lengths, cotangent


class Case:
    """One method on one set of inputs: a timed forward (graph built) and a timed backward."""

    def __init__(self, method: str, inputs: tuple[torch.Tensor, ...]) -> None:
        self.options = dict(METHODS[method])
        self.structured = self.options["kind"] == "structured"
        self.scores, self.binary, self.lengths, self.cotangent = inputs

    def forward(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        s = self.scores.detach().requires_grad_(True)
        p = self.binary.detach().requires_grad_(True)
        extra = {"binary": p} if self.structured else {}
        w = attention_weights(s, self.lengths, **self.options, **extra)  # type: ignore[arg-type]
        return (w * self.cotangent).sum(), ((s, p) if self.structured else (s,))

    def backward(self, loss: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
        torch.autograd.grad(loss, inputs)

    def forward_backward(self) -> None:
        self.backward(*self.forward())


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds ``fn`` takes (device work included) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def bench_shape(B: int, T: int, args: argparse.Namespace) -> dict[str, dict[str, float] | str]:
    """Measure every method on one shape, interleaving the repeats so load hits all alike."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    inputs = make_inputs(B, T, device, dtype)
    cases: dict[str, Case] = {}
    results: dict[str, dict[str, float] | str] = {}
    for method in METHODS:
        case = Case(method, inputs)
        try:
            case.forward_backward()  # warm-up, and availability
        except (NotImplementedError, ImportError) as err:
            results[method] = f"not available ({str(err).split(';')[0]})"
            continue
        cases[method] = case
    fwd: dict[str, list[float]] = {m: [] for m in cases}
    bwd: dict[str, list[float]] = {m: [] for m in cases}
    for _ in range(args.repeats):
        for method, case in cases.items():
            seconds, (loss, leaves) = timed(case.forward, device)
            fwd[method].append(seconds)
            seconds, _ = timed(lambda c=case, l=loss, x=leaves: c.backward(l, x), device)
            bwd[method].append(seconds)
    for method, case in cases.items():
        results[method] = {
            "fwd_ms": 1e3 * statistics.median(fwd[method]),
            "bwd_ms": 1e3 * statistics.median(bwd[method]),
            "peak_mib": peak_bytes(case.forward_backward, device) / 2**20,
        }
    return results


def main(argv: list[str] | None = None) -> None:
    """Run every method on every shape and print a table with ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--shapes", nargs="+", default=["64x64", "256x128", "32x512"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}, {args.dtype}, torch {torch.__version__}, threads {args.threads}")
    base = "structured/autograd"
    print(
        "| B×T | method | fwd ms | bwd ms | peak MiB | bwd / autograd | fwd+bwd / autograd "
        "| memory / autograd |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        rows = bench_shape(B, T, args)
        ref = rows[base]
        assert isinstance(ref, dict), ref
        for method, r in rows.items():
            if isinstance(r, str):
                print(f"| {B}×{T} | {method} | {r} | | | | | |")
                continue
            total = (r["fwd_ms"] + r["bwd_ms"]) / (ref["fwd_ms"] + ref["bwd_ms"])
            print(
                f"| {B}×{T} | {method} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                f"{r['peak_mib']:.3g} | {r['bwd_ms'] / ref['bwd_ms']:.3g} | {total:.3g} | "
                f"{r['peak_mib'] / ref['peak_mib']:.3g} |"
            )


if __name__ == "__main__":
    main()
