"""Benchmark SparseMAP: chains against the enumerated QP, scaling in T and Z; and on trees.

``sparsemap`` (structift.variational) solves max_{μ ∈ M} ⟨θ, μ⟩ − (τ/2)‖μ_U‖² by an active-set
method on the Viterbi oracle, and differentiates by the IFT on the active set. Tables:

1. Small chains, where the Z^T vertices can be enumerated: forward + backward time of
   ``sparsemap``, of ``qp_solve`` on the QP over the weights of every vertex
   (Q = τ Φ_U Φ_Uᵀ + ridge, the backward to θ through q = −Φ θ), and cvxpy's forward
   (CLARABEL, one problem per element; it has no backward here). ``max |Δμ_U|`` is the largest
   difference of the unary marginals from ``sparsemap``'s; ``qp / sparsemap`` the time ratio.
2. Scaling in T and Z: forward and backward times (timed separately within each run), active-set iterations and sizes (mean and
   max over the batch), next to the entropy-regularized argmax (``regularized_argmax``, exact
   forward + structured IFT backward) on the same inputs.
3. Dependency trees (projective: Eisner oracle; non-projective: Chu–Liu–Edmonds), n words:
   the same columns (``--table trees``).

Times are medians over --repeats after a warm-up; the machine may be shared (noisy). Inputs are
standard-normal unary and binary potentials (float64 by default), full lengths, τ = --tau, a
random cotangent on the marginals.

Run:
    python benchmarks/sparsemap.py                     # CPU, both tables
    python benchmarks/sparsemap.py --device cuda       # CUDA rows (skipped without CUDA)
    python benchmarks/sparsemap.py --table scaling --dtype float32 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import structift as sf
from structift.layers import qp_solve
from structift.variational import regularized_argmax, sparsemap


def sync(device: torch.device) -> None:
    """Wait for queued device work so timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(run: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``run`` over ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def inputs(B: int, T: int, Z: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Potentials, full lengths and cotangents (on ``device``)."""
    g = torch.Generator().manual_seed(seed)
    unary = torch.randn(B, T, Z, generator=g, dtype=dtype)
    binary = torch.randn(B, T - 1, Z, Z, generator=g, dtype=dtype)
    cot = (torch.randn(B, T, Z, generator=g, dtype=dtype),)
    cot += (torch.randn(B, T - 1, Z, Z, generator=g, dtype=dtype),)
    lengths = torch.full((B,), T, dtype=torch.long)
    move = lambda x: x.to(device)  # noqa: E731
    return move(unary), move(binary), move(lengths), tuple(move(c) for c in cot)


def sparsemap_run(unary, binary, lengths, cot, tau: float, out: dict):
    """One differentiable sparsemap call and its backward; statistics stored in ``out``."""

    def forward():
        u, w = unary.detach().requires_grad_(True), binary.detach().requires_grad_(True)
        result = sparsemap(sf.LinearChainCRF(u, w, lengths), tau)
        out["result"] = result
        return (u, w), sum((m * c).sum() for m, c in zip(result.marginals, cot))

    def both():
        theta, loss = forward()
        torch.autograd.grad(loss, theta)

    return forward, both


def entropy_run(unary, binary, lengths, cot, tau: float) -> Callable[[], None]:
    """fwd+bwd of the entropy-regularized argmax (exact forward, structured IFT backward)."""

    def run():
        u, w = unary.detach().requires_grad_(True), binary.detach().requires_grad_(True)
        mu = regularized_argmax(sf.LinearChainCRF(u, w, lengths), tau)
        torch.autograd.grad(sum((m * c).sum() for m, c in zip(mu, cot)), (u, w))

    return run


def enumerated_qp(unary, binary, lengths, cot, tau: float, ridge: float):
    """fwd+bwd of qp_solve over every vertex's weight; returns (run, μ_U of the solution)."""
    B, T, Z = unary.shape
    crf = sf.LinearChainCRF(unary, binary, lengths)
    seqs = torch.tensor(list(itertools.product(range(Z), repeat=T)), device=unary.device)
    values = seqs[:, None, :].expand(-1, B, T)  # shape: (N, B, T)
    phi_u, phi_p = (
        f.flatten(2).transpose(0, 1) for f in crf.structure.statistics(values, unary.dtype)
    )
    N = seqs.shape[0]
    Q = tau * phi_u @ phi_u.mT
    f = unary.dtype
    G = -torch.eye(N, dtype=f, device=unary.device)
    h = torch.zeros(N, dtype=f, device=unary.device)
    A, b = (
        torch.ones(1, N, dtype=f, device=unary.device),
        torch.ones(1, dtype=f, device=unary.device),
    )
    phi = torch.cat([phi_u, phi_p], -1)
    g = torch.cat([c.flatten(1) for c in cot], -1)
    box: dict[str, torch.Tensor] = {}

    def run():
        u, w = unary.detach().requires_grad_(True), binary.detach().requires_grad_(True)
        scores = sf.LinearChainCRF(u, w, lengths).structure.score((u, w), values).T
        alpha = qp_solve(Q, -scores, G, h, A, b, ridge=ridge)
        mu = (alpha[:, None, :] @ phi)[:, 0]
        box["mu_u"] = mu[:, : T * Z].detach()
        torch.autograd.grad((mu * g).sum(), (u, w))

    return run, box, (phi_u, seqs)


def cvxpy_forward(unary, binary, lengths, tau: float, phi_u, values) -> Callable[[], None]:
    """cvxpy (CLARABEL) on the same QP, one problem per batch element (forward only)."""
    import cvxpy as cp

    crf = sf.LinearChainCRF(unary.cpu(), binary.cpu(), lengths.cpu())
    vals = values[:, None, :].expand(-1, unary.shape[0], -1).cpu()
    scores = crf.structure.score(crf._natural_params, vals).T.numpy()
    phi = phi_u.cpu().numpy()

    def run():
        for b in range(scores.shape[0]):
            a = cp.Variable(scores.shape[1], nonneg=True)
            obj = scores[b] @ a - 0.5 * tau * cp.sum_squares(phi[b].T @ a)
            cp.Problem(cp.Maximize(obj), [cp.sum(a) == 1]).solve(solver="CLARABEL")

    return run


def table_enumerated(args, device: torch.device, dtype: torch.dtype) -> None:
    has_cvxpy = importlib.util.find_spec("cvxpy") is not None and device.type == "cpu"
    print(
        f"\n### SparseMAP vs the enumerated QP (B={args.B}, τ={args.tau}, {dtype}, {device.type})\n"
    )
    print("| T | Z | vertices | sparsemap fwd+bwd (ms) | iters (mean/max) | active set (mean/max) | "
          "qp_solve fwd+bwd (ms) | cvxpy fwd (ms) | max abs Δμ_U | qp / sparsemap |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for T, Z in [(3, 2), (4, 3), (5, 3), (6, 3), (4, 5)]:
        unary, binary, lengths, cot = inputs(args.B, T, Z, dtype, device)
        out: dict = {}
        _, both = sparsemap_run(unary, binary, lengths, cot, args.tau, out)
        t_ours = median_ms(both, args.repeats, device)
        status, active = out["result"].status, out["result"].active_set.active
        sizes = active.sum(-1).float()
        qp_run, box, (phi_u, seqs) = enumerated_qp(unary, binary, lengths, cot, args.tau, 1e-9)
        t_qp = median_ms(qp_run, max(1, args.repeats // 2), device)
        diff = float((box["mu_u"] - out["result"].marginals.unary.detach().flatten(1)).abs().max())
        t_cvx = "n/a"
        if has_cvxpy:
            t_cvx = f"{median_ms(cvxpy_forward(unary, binary, lengths, args.tau, phi_u, seqs), 1, device):.1f}"
        iters = status.iterations.float()
        print(
            f"| {T} | {Z} | {Z**T} | {t_ours:.1f} | {iters.mean():.1f}/{int(iters.max())} | "
            f"{sizes.mean():.1f}/{int(sizes.max())} | {t_qp:.1f} | {t_cvx} | {diff:.1e} | "
            f"{t_qp / t_ours:.1f} |"
        )


def timed_fwd_bwd(unary, binary, lengths, cot, tau: float, repeats: int, device, out: dict):
    """Median (forward ms, backward ms) of sparsemap, both timed within each run."""
    fwd, bwd = [], []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        u, w = unary.detach().requires_grad_(True), binary.detach().requires_grad_(True)
        result = sparsemap(sf.LinearChainCRF(u, w, lengths), tau)
        loss = sum((m * c).sum() for m, c in zip(result.marginals, cot))
        sync(device)
        t1 = time.perf_counter()
        torch.autograd.grad(loss, (u, w))
        sync(device)
        t2 = time.perf_counter()
        out["result"] = result
        if i:  # the first run is the warm-up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return 1e3 * statistics.median(fwd), 1e3 * statistics.median(bwd)


def table_scaling(args, device: torch.device, dtype: torch.dtype) -> None:
    print(f"\n### SparseMAP scaling on chains (B={args.B}, τ={args.tau}, {dtype}, {device.type})\n")
    print("| T | Z | sparsemap fwd (ms) | sparsemap bwd (ms) | iters (mean/max) | "
          "active set (mean/max) | entropy fwd+bwd (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    shapes = [(16, 8), (32, 8), (64, 8), (128, 8), (32, 4), (32, 16), (32, 32)]
    for T, Z in shapes:
        unary, binary, lengths, cot = inputs(args.B, T, Z, dtype, device)
        out: dict = {}
        t_fwd, t_bwd = timed_fwd_bwd(
            unary, binary, lengths, cot, args.tau, args.repeats, device, out
        )
        status, active = out["result"].status, out["result"].active_set.active
        sizes, iters = active.sum(-1).float(), status.iterations.float()
        t_ent = median_ms(entropy_run(unary, binary, lengths, cot, args.tau), args.repeats, device)
        print(
            f"| {T} | {Z} | {t_fwd:.1f} | {t_bwd:.1f} | {iters.mean():.1f}/{int(iters.max())} "
            f"| {sizes.mean():.1f}/{int(sizes.max())} | {t_ent:.1f} |",
            flush=True,
        )


def table_trees(args, device: torch.device, dtype: torch.dtype) -> None:
    """SparseMAP on dependency trees (its oracle: Eisner / Chu–Liu–Edmonds), scaling in n."""
    print(
        f"\n### SparseMAP on dependency trees (B={args.B}, τ={args.tau}, {dtype}, {device.type})\n"
    )
    print("| trees | n | sparsemap fwd (ms) | sparsemap bwd (ms) | iters (mean/max) | "
          "active set (mean/max) | entropy fwd+bwd (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for projective, n in itertools.product((True, False), (8, 16, 32)):
        g = torch.Generator().manual_seed(0)
        arcs = torch.randn(args.B, n + 1, n + 1, generator=g, dtype=dtype).to(device)
        cot = torch.randn(arcs.shape, generator=g, dtype=dtype).to(device)
        lengths = torch.full((args.B,), n, device=device)
        fwd, bwd, out = [], [], {}
        for i in range(args.repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            x = arcs.detach().requires_grad_()
            out["result"] = sparsemap(sf.DependencyCRF(x, lengths, projective), args.tau)
            loss = (out["result"].marginals * cot).sum()
            sync(device)
            t1 = time.perf_counter()
            torch.autograd.grad(loss, x)
            sync(device)
            if i:
                fwd.append(t1 - t0)
                bwd.append(time.perf_counter() - t1)

        def entropy(arcs=arcs, lengths=lengths, projective=projective, cot=cot) -> None:
            x = arcs.detach().requires_grad_()
            mu = regularized_argmax(sf.DependencyCRF(x, lengths, projective), args.tau)
            torch.autograd.grad((mu * cot).sum(), x)

        status, active = out["result"].status, out["result"].active_set.active
        sizes, iters = active.sum(-1).float(), status.iterations.float()
        kind = "projective" if projective else "non-projective"
        print(
            f"| {kind} | {n} | {1e3 * statistics.median(fwd):.1f} | "
            f"{1e3 * statistics.median(bwd):.1f} | {iters.mean():.1f}/{int(iters.max())} "
            f"| {sizes.mean():.1f}/{int(sizes.max())} | "
            f"{median_ms(entropy, args.repeats, device):.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument(
        "--table", default="both", choices=["both", "enumerated", "scaling", "trees"]
    )
    parser.add_argument("-B", type=int, default=8)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: the CUDA rows are skipped.")
        return
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.table in ("both", "enumerated"):
        table_enumerated(args, device, dtype)
    if args.table in ("both", "scaling"):
        table_scaling(args, device, dtype)
    if args.table in ("both", "trees"):
        table_trees(args, device, dtype)


if __name__ == "__main__":
    main()
