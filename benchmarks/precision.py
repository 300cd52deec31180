"""Benchmark: float32 error against float64 truth, structift vs torch-struct vs pytorch-crf.

Model: emissions ``U = scale * randn [B, T, Z]`` and one transition matrix
``W = scale * randn [Z, Z]`` (each peer in its own layout, see ``_peers.py``). Every
implementation runs in float32 and again in float64 on the *same rounded* inputs; the error is
float32 against its own float64 result, so only the arithmetic is compared. Columns:

* ``logZ``   relative error of the log-partition;
* ``marg``   max absolute error of the unary marginals (structift, pytorch-crf: ∂A/∂U by
  autograd) or of the edge marginals (torch-struct's ``marginals``);
* ``H``      ``|H32 − H64| / (1 + |H64|)`` of the entropy (pytorch-crf has none);
* ``KL``     the same for ``KL(p ‖ q)`` with q drawn like p (torch-struct's ``kl``);
* ``VJP``    relative error ``‖e‖∞ / ‖ref‖∞`` of ``gᵀ ∂μ/∂θ``: structift through
  ``regularized_argmax`` (the IFT backward, τ = 1), the peers by double backward through A.

Usage::

    python benchmarks/precision.py                  # scale 1 10 30 100, T 100 1000 10000
    python benchmarks/precision.py --T 100 1000 --scales 1 30 --markdown
    python benchmarks/precision.py --device cuda --T 1000 10000   # the fused kernel (float32)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from _peers import pytorch_crf, torch_struct_potentials

import structift as st
from structift.variational import regularized_argmax

Result = dict[str, float]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _abs(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return math.inf if not bool(torch.isfinite(a).all()) else float((a - b).abs().max())


def _value(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float(((a - b).abs() / (1 + b.abs())).max())


def structift_run(U: torch.Tensor, W: torch.Tensor, V: torch.Tensor, g: torch.Tensor) -> dict:
    """log Z, unary marginals, entropy, KL and the IFT VJP of structift."""
    u = U.clone().requires_grad_()
    p, q = st.LinearChainCRF(u, W), st.LinearChainCRF(U, V)
    with torch.no_grad():
        out = {"logZ": p.log_partition, "marg": p.marginals.unary, "H": p.entropy(), "KL": p.kl(q)}
    mu = regularized_argmax(p, 1.0)
    (out["VJP"],) = torch.autograd.grad((mu.unary * g).sum(), u)
    return out


def pytorch_crf_run(U: torch.Tensor, W: torch.Tensor, V: torch.Tensor, g: torch.Tensor) -> dict:
    """log Z, unary marginals (autograd) and the double-backward VJP of pytorch-crf."""
    crf = pytorch_crf(W).to(U.dtype)
    B, T, _ = U.shape
    mask = torch.ones(T, B, dtype=torch.bool, device=U.device)
    u = U.clone().requires_grad_()
    log_z = crf._compute_normalizer(u.transpose(0, 1), mask)
    (mu,) = torch.autograd.grad(log_z.sum(), u, create_graph=True)
    (vjp,) = torch.autograd.grad((mu * g).sum(), u)
    return {"logZ": log_z.detach(), "marg": mu.detach(), "VJP": vjp}


def torch_struct_run(U: torch.Tensor, W: torch.Tensor, V: torch.Tensor, g: torch.Tensor) -> dict:
    """log Z, edge marginals, entropy, KL and the double-backward VJP of torch-struct."""
    import torch_struct

    u = U.clone().requires_grad_()
    phi = W.T[None, None] + u[:, 1:, :, None]
    phi = torch.cat([phi[:, :1] + u[:, :1, None, :], phi[:, 1:]], 1)
    p = torch_struct.LinearChainCRF(phi)
    q = torch_struct.LinearChainCRF(torch_struct_potentials(U, V))
    log_z = p.partition
    (mu,) = torch.autograd.grad(log_z.sum(), u, create_graph=True)
    (vjp,) = torch.autograd.grad((mu * g).sum(), u)
    with torch.no_grad():
        detached = torch_struct.LinearChainCRF(phi.detach())
        out = {"logZ": log_z.detach(), "marg": detached.marginals, "H": detached.entropy}
        out["KL"] = detached.kl(q)
    out["VJP"] = vjp
    return out


IMPLS: dict[str, Callable[..., dict]] = {
    "structift": structift_run,
    "torch-struct": torch_struct_run,
    "pytorch-crf": pytorch_crf_run,
}
METRICS = {"logZ": _rel, "marg": _abs, "H": _value, "KL": _value, "VJP": _rel}


def measure(
    impl: str, B: int, T: int, Z: int, scale: float, seed: int = 0, device: str = "cpu"
) -> Result:
    """float32 errors of one implementation at one (T, scale), on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    U, W, V = (
        (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).float().to(device)
        for s in ((B, T, Z), (Z, Z), (Z, Z))
    )
    g = torch.randn(B, T, Z, generator=gen).to(device)
    low = IMPLS[impl](U, W, V, g)
    high = IMPLS[impl](U.double(), W.double(), V.double(), g.double())
    return {k: METRICS[k](low[k], high[k]) for k in low}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-B", type=int, default=2)
    p.add_argument("-Z", type=int, default=8)
    p.add_argument("--T", type=int, nargs="+", default=[100, 1000, 10_000])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 30.0, 100.0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cols = list(METRICS)
    sep = " | " if args.markdown else "  "
    head = ["scale", "T", "impl", *cols]
    print(("| " if args.markdown else "") + sep.join(f"{h:>12}" for h in head))
    if args.markdown:
        print("|" + "|".join("---:" for _ in head) + "|")
    for scale in args.scales:
        for T in args.T:
            for impl in args.impls:
                try:
                    r = measure(impl, args.B, T, args.Z, scale, device=args.device)
                    cells = [f"{r[c]:.1e}" if c in r else "-" for c in cols]
                except (RuntimeError, MemoryError) as err:  # a peer out of memory or failing
                    cells = [f"error: {type(err).__name__}"] + [""] * (len(cols) - 1)
                row = [f"{scale:g}", str(T), impl, *cells]
                print(
                    ("| " if args.markdown else "") + sep.join(f"{c:>12}" for c in row), flush=True
                )


if __name__ == "__main__":
    main()
