"""Benchmark: HMM log p(x), forward + backward, per token, as the number of states Z grows.

One model per Z: random init, transition and emission logits (V observation symbols), B
sequences of length T, float32. Implementations (each builds its parameters as leaves and runs
``log p(x).sum().backward()``):

* ``dense``        ``st.HMM(init, W [Z, Z], emission, x)`` (the chain kernel, ``O(T Z^2)``).
* ``lowrank-r``    ``st.HMM(init, st.LowRankTransition(u, v), emission, x)`` with ``u, v``
  ``[Z, r]`` (``O(T Z r)``, hand-written backward, no ``Z x Z``).
* ``blocked-S``    ``st.HMM(init, W, st.BlockedEmission(emission, clusters, Z / S), x)``:
  dense transitions, ``S`` states per cluster (``O(T S^2)`` per sequence after an ``O(Z^2)``
  softmax of ``W`` per call).
* ``blocked-lowrank-r`` ``st.HMM(init, st.LowRankTransition(u, v), st.BlockedEmission(...), x)``:
  128 states per cluster and rank ``r`` (``O(T S^2 r)`` per sequence after ``O(Z r)`` per call
  for the factors: no ``Z x Z`` anywhere).
* ``floor-r``      only the four message products every exact ``O(T Z r)`` forward-backward
  makes per step (``(alpha A) B`` forward, ``(g B^T) A^T`` backward) on ``[B, Z]`` messages,
  nothing else: the floor of the ``lowrank-r`` rows, to tell the algorithm's growth in ``Z``
  from the machine's (the factors leaving the last-level cache).
* ``scaled-loop``  a plain probability-space forward loop with per-step rescaling and torch
  autograd (what one writes by hand; ``O(T Z^2)`` and a per-step graph).
* ``torch-struct`` ``LinearChain.hmm`` edge potentials ``[B, T-1, Z, Z]`` +
  ``LinearChainCRF.partition`` (``O(B T Z^2)`` memory; Z = 2^8 only, with ``--torch-struct``).

The ``O(Z^2)`` rows stop where their time or memory stops being reasonable (``MAX_STATES``).

Reported: the fastest of ``--repeats`` runs in milliseconds per token (time / (B T)), extra peak memory of one forward +
backward (CPU: the profiler's allocation trace; CUDA: ``max_memory_allocated``), the max
|log p(x) − log p(x)_dense| where both run, and time(4Z)/time(Z) of each low-rank rank.

Usage::

    python benchmarks/hmm_scale.py --quick                  # < 2 min on a 2-core CPU
    python benchmarks/hmm_scale.py                          # Z = 2^8 .. 2^14, r in {64, 256, 1024}
    python benchmarks/hmm_scale.py --torch-struct -B 4 -T 16  # adds torch-struct at Z = 2^8
    python benchmarks/hmm_scale.py --device cuda            # skipped cleanly without CUDA
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from _memory import peak_bytes
from _peers import interleaved_times

import structift as st

Run = Callable[[], torch.Tensor]


def make_model(Z: int, V: int, B: int, T: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(Z)
    return {
        "init": torch.randn(Z, generator=g),
        "emission": torch.randn(Z, V, generator=g),
        "x": torch.randint(V, (B, T), generator=g),
        "W": torch.randn(Z, Z, generator=g)
        if fits("scaled-loop", Z, device) or fits("dense", Z, device)
        else None,
        "g": g,
        "device": device,
    }


# The largest Z per device of the O(Z^2) rows (``dense``: st.HMM's chain kernel with the shared
# log P at its broadcast shape, [B, Z, Z] gradient buffers; the scaled loop [Z, Z] and a
# per-step graph). ``--quick`` lowers the scaled loop's.
MAX_STATES = {
    "cpu": {"dense": 2**12, "scaled-loop": 2**12, "blocked": 2**13},
    "cuda": {"dense": 2**14, "scaled-loop": 2**14, "blocked": 2**14},
}


def fits(name: str, Z: int, device: torch.device) -> bool:
    """Whether the O(Z^2) row ``name`` runs at ``Z`` states on ``device``."""
    return Z <= MAX_STATES[device.type][name]


def _leaves(*xs: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    return [x.to(device).requires_grad_(True) for x in xs]


def dense(m: dict) -> Run:
    W = m["W"]
    init, trans, emission = _leaves(m["init"], W, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        log_p = st.HMM(init, trans, emission, x).log_partition
        log_p.sum().backward()
        return log_p.detach()

    return run


def lowrank(m: dict, r: int) -> Run:
    Z = m["init"].shape[0]
    u, v = torch.randn(Z, r, generator=m["g"]), torch.randn(Z, r, generator=m["g"])
    init, u, v, emission = _leaves(m["init"], u, v, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        log_p = st.HMM(init, st.LowRankTransition(u, v), emission, x).log_partition
        log_p.sum().backward()
        return log_p.detach()

    return run


def blocked(m: dict, S: int) -> Run:
    Z, V = m["emission"].shape
    clusters = (torch.arange(V) % (Z // S)).to(m["device"])
    W = torch.randn(Z, Z, generator=m["g"])
    init, trans, logits = _leaves(m["init"], W, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        emission = st.BlockedEmission(logits, clusters, Z // S)
        log_p = st.HMM(init, trans, emission, x).log_partition
        log_p.sum().backward()
        return log_p.detach()

    return run


def blocked_lowrank(m: dict, S: int, r: int) -> Run:
    Z, V = m["emission"].shape
    clusters = (torch.arange(V) % (Z // S)).to(m["device"])
    u, v = torch.randn(Z, r, generator=m["g"]), torch.randn(Z, r, generator=m["g"])
    init, u, v, logits = _leaves(m["init"], u, v, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        emission = st.BlockedEmission(logits, clusters, Z // S)
        log_p = st.HMM(init, st.LowRankTransition(u, v), emission, x).log_partition
        log_p.sum().backward()
        return log_p.detach()

    return run


def matmul_floor(m: dict, r: int) -> Run:
    Z = m["init"].shape[0]
    B, T = m["x"].shape
    a = torch.rand(Z, r, generator=m["g"]).to(m["device"])
    b = torch.rand(r, Z, generator=m["g"]).to(m["device"])
    msg = torch.rand(B, Z, generator=m["g"]).to(m["device"])

    def run() -> torch.Tensor:
        x, y = msg, msg
        for _ in range(T - 1):
            x = (x @ a) @ b
            x = x / x.sum(-1, keepdim=True)
        for _ in range(T - 1):
            y = (y @ b.T) @ a.T
            y = y / y.amax(-1, keepdim=True)
        return x.sum(-1) + y.sum(-1)

    return run


def scaled_loop(m: dict) -> Run:
    W = m["W"]
    init, trans, emission = _leaves(m["init"], W, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        P = torch.softmax(trans, -1)
        log_e = torch.log_softmax(emission, -1).T[x]  # shape: (B, T, Z)
        shift = log_e.detach().amax(-1, keepdim=True)
        e = torch.exp(log_e - shift)
        alpha = torch.softmax(init, -1) * e[:, 0]
        log_p = shift[:, 0, 0]
        for t in range(x.shape[1]):
            if t > 0:
                alpha = (alpha @ P) * e[:, t]
            c = alpha.sum(-1, keepdim=True)
            alpha = alpha / c
            log_p = log_p + torch.log(c[:, 0]) + (shift[:, t, 0] if t > 0 else 0.0)
        log_p.sum().backward()
        return log_p.detach()

    return run


def torch_struct(m: dict) -> Run:
    from torch_struct import LinearChain, LinearChainCRF

    W = m["W"]
    init, trans, emission = _leaves(m["init"], W, m["emission"], device=m["device"])
    x = m["x"].to(m["device"])

    def run() -> torch.Tensor:
        # torch-struct lays potentials out [to, from] and emissions [V, Z].
        edges = LinearChain.hmm(
            torch.log_softmax(trans, -1).T,
            torch.log_softmax(emission, -1).T,
            torch.log_softmax(init, -1),
            x,
        )
        log_p = LinearChainCRF(edges).partition
        log_p.sum().backward()
        return log_p.detach()

    return run


def time_runs(runs: dict[str, Run], repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest seconds per run over ``repeats`` (one warm-up each), rounds interleaved.

    The minimum, not the median: on a shared CPU other processes only ever add time.
    """
    times = interleaved_times(runs, repeats, str(device.type), warmup=True)
    return {k: min(v) for k, v in times.items()}


def grid(
    quick: bool, device: torch.device, torch_struct_rows: bool
) -> tuple[list[int], dict[str, Callable]]:
    zs = [2**8, 2**10, 2**12, 2**14] if quick else [2**k for k in range(8, 15)]
    ranks = [64, 256] if quick else [64, 256, 1024]
    impls: dict[str, Callable] = {
        "dense": lambda m, Z: dense(m) if fits("dense", Z, device) else None,
        "scaled-loop": lambda m, Z: scaled_loop(m) if fits("scaled-loop", Z, device) else None,
        # 128 states per cluster, Z / 128 <= V clusters (word w in cluster w mod Z / 128).
        "blocked-128": lambda m, Z: blocked(m, 128) if fits("blocked", Z, device) else None,
    }
    if torch_struct_rows:  # about 1 s per token at Z = 2^8 on CPU, GiBs of potentials
        impls["torch-struct"] = lambda m, Z: torch_struct(m) if Z <= 2**8 else None
    for r in ranks:
        impls[f"lowrank-{r}"] = lambda m, Z, r=r: lowrank(m, r) if r <= Z else None
    for r in ranks:
        impls[f"floor-{r}"] = lambda m, Z, r=r: matmul_floor(m, r) if r <= Z else None
    for r in ranks:  # 128 states per cluster, as blocked-128
        impls[f"blocked-lowrank-{r}"] = lambda m, Z, r=r: (
            blocked_lowrank(m, 128, r) if r <= Z and Z >= 128 else None
        )
    return zs, impls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Z in {2^8, 2^10, 2^12, 2^14}, r <= 256")
    p.add_argument("-B", type=int, default=None)
    p.add_argument("-T", type=int, default=None)
    p.add_argument("-V", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--torch-struct", action="store_true", help="add torch-struct at Z = 2^8")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("hmm_scale: CUDA is not available; skipping the CUDA rows.")
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    B = args.B or 8
    T = args.T or (16 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    if args.quick:
        MAX_STATES["cpu"]["scaled-loop"] = 2**10
    zs, impls = grid(args.quick, device, args.torch_struct)
    print(f"device {args.device}, B={B}, T={T}, V={args.V}, float32, {args.threads} threads")
    print("| impl | Z | ms / token | peak MiB | max abs Δ log p vs dense |")
    print("|---|---|---|---|---|")
    table: dict[tuple[str, int], float] = {}
    for Z in zs:
        model = make_model(Z, args.V, B, T, device)
        runs = {k: f(model, Z) for k, f in impls.items()}
        runs = {k: v for k, v in runs.items() if v is not None}
        times = time_runs(runs, repeats, device)
        ref = runs["dense"]() if "dense" in runs else None
        for name, run in runs.items():
            mib = float("nan") if args.no_memory else peak_bytes(run, device) / 2**20
            err = float((run() - ref).abs().max()) if ref is not None and name != "dense" else None
            other_model = name.startswith(("lowrank", "blocked", "floor"))
            err_s = "—" if err is None or other_model else f"{err:.1e}"
            ms = 1e3 * times[name] / (B * T)
            table[(name, Z)] = times[name]
            print(f"| {name} | {Z} | {ms:.3f} | {mib:.1f} | {err_s} |", flush=True)
    print("\ntime(4Z) / time(Z) at fixed rank:")
    print("| impl | " + " | ".join(f"{Z}->{4 * Z}" for Z in zs[:-1] if 4 * Z in zs) + " |")
    for name in impls:
        if name.startswith(("lowrank", "blocked", "floor")) or name == "dense":
            ratios = [
                f"{table[(name, 4 * Z)] / table[(name, Z)]:.2f}"
                if (name, Z) in table and (name, 4 * Z) in table
                else "—"
                for Z in zs[:-1]
                if 4 * Z in zs
            ]
            print(f"| {name} | " + " | ".join(ratios) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
