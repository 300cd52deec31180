"""Benchmark: structures against torch-struct 0.5 on the same inputs, one process.

One function per structure (``STRUCTURES``); ``--only NAME`` runs one of them. Each times, in
interleaved rounds (``_peers.interleaved_times``, median reported), log Z + marginals (forward
+ ``.sum().backward()``, the marginals being the gradient of log Z) and argmax, and reports the
peak extra memory of log Z + marginals (``_memory.peak_bytes``) and the ratios
``torch-struct / structift``.

projective: single- and multi-root projective dependency trees, arc scores ``[B, N+1, N+1]``
(``randn``, float32), all lengths = n; torch-struct's ``DependencyCRF`` receives the same scores
in its ``[B, n, n]`` layout (arcs ``[h-1, m-1]``, ROOT -> m on the diagonal) and
``multiroot`` set to match. Its ``argmax`` only runs on a leaf that requires grad (on a plain
tensor its ``_check_potentials`` writes in place into a leaf it has just made require grad),
so it gets one.

nonprojective: single- and multi-root non-projective trees (``-B``, ``--np-n``, default 32,
64) against torch-struct's ``NonProjectiveDependencyCRF`` in the same ``[B, n, n]`` layout;
structift's argmax is Chu–Liu–Edmonds (torch-struct 0.5 has no non-projective argmax: its
property returns ``None``), so that row has no peer. Two "floor" rows time the LAPACK work of
any exact matrix-tree posterior alone (one LU and the inverse from it, float64 and float32):
torch-struct's time over the floor bounds the speed-up an implementation can reach.

semimarkov: semi-Markov CRFs, scores ``[B, N-1, K, C, C]`` (``randn``, float32, all lengths =
N; sizes ``--sm-B/N/K/C``, default 16, 64, 8, 8) against torch-struct's ``SemiMarkovCRF`` on
the same scores transposed to its ``[to, from]`` label layout.

Usage::

    python benchmarks/structures.py                      # every structure, CPU
    python benchmarks/structures.py --only projective -B 32 -n 32
    python benchmarks/structures.py --only nonprojective -B 32 --np-n 64
    python benchmarks/structures.py --only semimarkov --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _memory import peak_bytes
from _peers import interleaved_times

from structift.structures.tree.nonprojective import NonProjectiveTrees
from structift.structures.tree.projective import ProjectiveTrees


def _to_torch_struct(arcs: torch.Tensor) -> torch.Tensor:
    """``[B, n+1, n+1]`` arcs ``[h, m]`` -> torch-struct's ``[B, n, n]`` (ROOT on the diagonal)."""
    n = arcs.shape[-1] - 1
    out = arcs[:, 1:, 1:].clone()
    idx = torch.arange(n, device=arcs.device)
    out[:, idx, idx] = arcs[:, 0, 1:]
    return out


def _report(name: str, runs: dict[str, Callable[[], object]], args, device) -> None:
    times = interleaved_times(runs, args.repeats, args.device, warmup=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        peer = k.replace("structift", "torch-struct")
        ratio = f"{med[peer] / v:5.2f}x" if peer != k and peer in med else ""
        if k.startswith("floor") and "torch-struct logZ+marginals" in med:
            ratio = f"{med['torch-struct logZ+marginals'] / v:5.2f}x (torch-struct / floor)"
        line = f"{name:28s} {k:26s} {1e3 * v:9.2f} ms  {ratio}"
        if k.endswith("logZ+marginals"):
            line += f"  peak {peak_bytes(runs[k], device) / 2**20:7.2f} MiB"
        print(line)


def _tree_runs(
    arcs: torch.Tensor, lengths: torch.Tensor, multi_root: bool, projective: bool
) -> dict[str, Callable[[], object]]:
    """The timed runs on one input, both libraries (torch-struct has no non-projective argmax)."""
    import torch_struct

    kind = ProjectiveTrees if projective else NonProjectiveTrees
    peer = torch_struct.DependencyCRF if projective else torch_struct.NonProjectiveDependencyCRF
    structure = kind(lengths, arcs.shape[-1] - 1, multi_root)
    ts_arcs = _to_torch_struct(arcs)

    def ours_lz() -> None:
        x = arcs.detach().requires_grad_()
        structure.log_partition((x,)).sum().backward()

    def theirs_lz() -> None:
        x = ts_arcs.detach().requires_grad_()
        peer(x, lengths, multiroot=multi_root).partition.sum().backward()

    def theirs_argmax() -> torch.Tensor:
        x = ts_arcs.detach().requires_grad_()
        return peer(x, lengths, multiroot=multi_root).argmax

    runs: dict[str, Callable[[], object]] = {
        "structift logZ+marginals": ours_lz,
        "torch-struct logZ+marginals": theirs_lz,
        "structift argmax": lambda: structure.argmax((arcs,)),
    }
    if projective:
        runs["torch-struct argmax"] = theirs_argmax
    else:
        # The LAPACK work any exact matrix-tree posterior does (one LU, one inverse from it),
        # alone, on a well-conditioned [B, n, n] matrix: torch-struct's time over it bounds
        # the speed-up any implementation of the same algorithm can reach.
        n = arcs.shape[-1] - 1
        eye = torch.eye(n, dtype=torch.float64, device=arcs.device)
        lap = arcs[:, 1:, 1:].double().exp() + n * eye
        for dtype in (torch.float64, torch.float32):
            mat, ident = lap.to(dtype), eye.to(dtype).expand_as(lap)

            def floor(mat: torch.Tensor = mat, ident: torch.Tensor = ident) -> torch.Tensor:
                LU, pivots, _ = torch.linalg.lu_factor_ex(mat)
                return torch.linalg.lu_solve(LU, pivots, ident)

            runs[f"floor LU+inverse {str(dtype)[6:]}"] = floor
    return runs


def projective(args: argparse.Namespace) -> None:
    """Projective trees (Eisner) vs torch-struct ``DependencyCRF`` (its ``deptree.DepTree``)."""
    device = torch.device(args.device)
    B, n = args.B, args.n
    g = torch.Generator().manual_seed(0)
    arcs = torch.randn(B, n + 1, n + 1, generator=g).to(device)
    lengths = torch.full((B,), n, device=device)
    for multi_root in (False, True):
        root = "multi-root" if multi_root else "single-root"
        runs = _tree_runs(arcs, lengths, multi_root, True)
        _report(f"projective B={B} n={n} {root}", runs, args, device)


def semimarkov(args: argparse.Namespace) -> None:
    """Semi-Markov CRFs vs torch-struct ``SemiMarkovCRF`` (scores transposed to ``[to, from]``)."""
    import torch_struct

    import structift as st

    device = torch.device(args.device)
    B, N, K, C = args.sm_B, args.sm_N, args.sm_K, args.sm_C
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(B, N - 1, K, C, C, generator=g).to(device)
    phi_ts = phi.transpose(-1, -2).contiguous()
    lengths = torch.full((B,), N, device=device)

    def ours_lz() -> None:
        x = phi.detach().requires_grad_()
        st.SemiMarkovCRF(x, lengths).log_partition.sum().backward()

    def theirs_lz() -> None:
        x = phi_ts.detach().requires_grad_()
        torch_struct.SemiMarkovCRF(x, lengths).partition.sum().backward()

    runs = {
        "structift logZ+marginals": ours_lz,
        "torch-struct logZ+marginals": theirs_lz,
        "structift argmax": lambda: st.SemiMarkovCRF(phi, lengths).argmax,
        "torch-struct argmax": lambda: torch_struct.SemiMarkovCRF(phi_ts, lengths).argmax,
    }
    _report(f"semimarkov B={B} N={N} K={K} C={C}", runs, args, device)


def nonprojective(args: argparse.Namespace) -> None:
    """Non-projective trees (matrix-tree theorem) vs torch-struct ``NonProjectiveDependencyCRF``."""
    device = torch.device(args.device)
    B, n = args.B, args.np_n
    g = torch.Generator().manual_seed(0)
    arcs = torch.randn(B, n + 1, n + 1, generator=g).to(device)
    lengths = torch.full((B,), n, device=device)
    for multi_root in (False, True):
        root = "multi-root" if multi_root else "single-root"
        _report(
            f"non-projective B={B} n={n} {root}",
            _tree_runs(arcs, lengths, multi_root, False),
            args,
            device,
        )


STRUCTURES: dict[str, Callable[[argparse.Namespace], None]] = {
    "nonprojective": nonprojective,
    "projective": projective,
    "semimarkov": semimarkov,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=sorted(STRUCTURES), help="run one structure")
    p.add_argument("-B", type=int, default=32)
    p.add_argument("-n", type=int, default=32, help="words per tree (projective)")
    p.add_argument("--np-n", type=int, default=64, help="words per tree (nonprojective)")
    p.add_argument("--sm-B", type=int, default=16, help="batch (semimarkov)")
    p.add_argument("--sm-N", type=int, default=64, help="positions N (semimarkov)")
    p.add_argument("--sm-K", type=int, default=8, help="K: segments of 1..K-1 steps (semimarkov)")
    p.add_argument("--sm-C", type=int, default=8, help="labels (semimarkov)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: the CUDA rows are skipped.")
        return
    torch.set_num_threads(args.threads)
    for name, bench in STRUCTURES.items():
        if args.only in (None, name):
            bench(args)


if __name__ == "__main__":
    main()
