"""Benchmark: Hessian-vector products of the chain log-partition against autograd's double backward.

``H v`` with ``H = d^2 A / d theta^2`` is what entropy gradients, KL gradients, the variational
IFT and second-order methods need. Same model as ``benchmarks/chain.py`` (emissions ``U``
[B, T, Z], one transition matrix ``W`` [Z, Z], lengths = T, float32); the direction ``v`` is on
the unary potentials. Timed, median of interleaved repeats:

* ``structift``       ``grad(<marginals(U, W, create_graph=True).unary, v>, U)``: the marginals'
  backward is the analytic HVP (two tangent sweeps; one fused launch on CUDA);
* ``structift-loop``  the same with ``backend 'scaled'`` (skipped on CPU, where it
  is what ``structift`` runs);
* ``pytorch-crf``     autograd twice through ``CRF._compute_normalizer``: ``mu = grad(A, U,
  create_graph=True)``, then ``grad(<mu, v>, U)``;
* ``torch-struct``    the same through ``LinearChainCRF(phi).partition`` (its potentials fold
  ``U`` in, so ``v`` is applied through the same construction).

The table prints the largest difference of each ``H v`` to structift's.

Usage::

    python benchmarks/hvp.py                        # CPU, B=32 T=128 Z=32
    python benchmarks/hvp.py --device cuda -B 256
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _peers import chain_parser, median_times, pytorch_crf, setup, with_kernel

from structift.structures import chain

IMPLS = ["structift", "structift-loop", "pytorch-crf", "torch-struct"]


def build(
    impl: str, U: torch.Tensor, W: torch.Tensor, v: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """Return ``run() -> H v`` (``[B, T, Z]``, on the unary block) for one implementation."""
    B, T, _ = U.shape
    lengths = torch.full((B,), T, device=U.device)
    u = U.clone().requires_grad_(True)

    if impl in ("structift", "structift-loop"):

        def run() -> torch.Tensor:
            mu_u, _ = chain.marginals(u, W, lengths, create_graph=True)
            return torch.autograd.grad((mu_u * v).sum(), u)[0]

        return with_kernel("scaled" if impl == "structift-loop" else None, run)
    if impl == "pytorch-crf":
        crf = pytorch_crf(W)
        mask = torch.ones(T, B, dtype=torch.bool, device=U.device)

        def run_crf() -> torch.Tensor:
            log_z = crf._compute_normalizer(u.transpose(0, 1), mask)
            (mu,) = torch.autograd.grad(log_z.sum(), u, create_graph=True)
            return torch.autograd.grad((mu * v).sum(), u)[0]

        return run_crf
    if impl == "torch-struct":
        import torch_struct

        def run_ts() -> torch.Tensor:
            phi = W.T[None, None] + u[:, 1:, :, None]  # (B, T-1, to, from), built from u
            phi = torch.cat([phi[:, :1] + u[:, 0, None, None, :], phi[:, 1:]], 1)
            log_z = torch_struct.LinearChainCRF(phi, lengths).partition
            (mu,) = torch.autograd.grad(log_z.sum(), u, create_graph=True)
            return torch.autograd.grad((mu * v).sum(), u)[0]

        return run_ts
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def main() -> None:
    p = chain_parser(__doc__, repeats=7)
    p.add_argument("--impls", nargs="*", default=None, choices=IMPLS)
    p.add_argument("--ts-work", type=float, default=2e8, help="skip torch-struct above B*T*Z^3")
    args = p.parse_args()
    U, W, _ = setup(args)
    B, T, Z = args.B, args.T, args.Z
    impls = args.impls or [i for i in IMPLS if not (args.device == "cpu" and i == "structift-loop")]
    if "torch-struct" in impls and B * T * Z**3 > args.ts_work:
        print(f"torch-struct skipped: B*T*Z^3 = {B * T * Z**3:.1e} > --ts-work")
        impls.remove("torch-struct")
    v = torch.randn(B, T, Z, generator=torch.Generator().manual_seed(1)).to(args.device)
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    for impl in impls:
        try:
            runs[impl] = build(impl, U, W, v)
        except ImportError as err:
            print(f"{impl} skipped: {err}")
    out = {k: r() for k, r in runs.items()}  # warm-up (and Triton compilation)
    secs = median_times(runs, args.repeats, args.device)
    print(
        f"device={args.device} threads={args.threads} B={B} T={T} Z={Z} repeats={args.repeats}"
        f" structift kernel={chain.resolve(None, U).name}"
    )
    print(f"{'H v':<16} {'time ms':>10} {'time / structift':>17} {'max |diff|':>11}")
    base = secs.get("structift", float("nan"))
    ref = out.get("structift")
    for name in runs:
        t = secs[name]
        diff = (out[name] - ref).abs().max().item() if ref is not None else float("nan")
        print(f"{name:<16} {1e3 * t:>10.3f} {t / base:>17.2f} {diff:>11.1e}")


if __name__ == "__main__":
    main()
