"""Argument checks for `qp_solve`: types, shapes, devices, finiteness, convexity, rank."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _as_tensor_arg(name: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"qp_solve: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def validate(
    Q: Any, q: Any, G: Any, h: Any, A: Any, b: Any
) -> tuple[dict[str, Tensor], torch.Size, int, int, int]:
    """Check types, dtypes, devices, shapes and finiteness; fill in absent constraints."""
    Q, q = _as_tensor_arg("Q", Q), _as_tensor_arg("q", q)
    if Q.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"qp_solve: Q must be float32 or float64, got {Q.dtype}")
    if Q.dim() < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"qp_solve: Q must have shape [*B, n, n], got {tuple(Q.shape)}")
    n = Q.shape[-1]
    if n == 0:
        raise ValueError("qp_solve: Q must have at least one variable (n ≥ 1), got n = 0")
    for pair, (M, v) in {"G, h": (G, h), "A, b": (A, b)}.items():
        if (M is None) != (v is None):
            raise ValueError(f"qp_solve: give both of {pair} or neither")
    args = {"Q": Q, "q": q}
    for mname, vname, M, v in (("G", "h", G, h), ("A", "b", A, b)):
        if M is None:
            M, v = Q.new_zeros(0, n), Q.new_zeros(0)
        args[mname], args[vname] = _as_tensor_arg(mname, M), _as_tensor_arg(vname, v)
    for name, x in args.items():
        if x.dtype != Q.dtype:
            raise TypeError(
                f"qp_solve: {name} has dtype {x.dtype} but Q has {Q.dtype}; use one dtype"
            )
        if x.device != Q.device:
            raise ValueError(
                f"qp_solve: {name} is on {x.device} but Q is on {Q.device}; move all to one device"
            )
    if q.dim() < 1 or q.shape[-1] != n:
        raise ValueError(f"qp_solve: q must have shape [*B, n] with n = {n}, got {tuple(q.shape)}")
    sizes = {}
    for mname, vname, what in (("G", "h", "m"), ("A", "b", "p")):
        M, v = args[mname], args[vname]
        if M.dim() < 2 or M.shape[-1] != n:
            raise ValueError(
                f"qp_solve: {mname} must have shape [*B, {what}, n] with n = {n}, "
                f"got {tuple(M.shape)}"
            )
        if v.dim() < 1 or v.shape[-1] != M.shape[-2]:
            raise ValueError(
                f"qp_solve: {vname} must have shape [*B, {what}] with {what} = {M.shape[-2]} "
                f"(rows of {mname}), got {tuple(v.shape)}"
            )
        sizes[what] = M.shape[-2]
    try:
        batch = torch.broadcast_shapes(
            *(x.shape[: x.dim() - (2 if name in "QGA" else 1)] for name, x in args.items())
        )
    except RuntimeError as e:
        shapes = {name: tuple(x.shape) for name, x in args.items()}
        raise ValueError(f"qp_solve: the batch dimensions do not broadcast: {shapes}") from e
    for name, x in args.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"qp_solve: {name} contains NaN or inf")
    return args, batch, n, sizes["m"], sizes["p"]


def factor_Q(Q: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Symmetrize Q, add the ridge, and factor it; raise a clear error if it is not PD."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    Qs = 0.5 * (Q + Q.mT) + ridge * eye
    L, info = torch.linalg.cholesky_ex(Qs)
    if bool((info == 0).all()):
        return Qs, L
    eig = torch.linalg.eigvalsh(Qs)  # only on the failure path
    lo, hi = eig[..., 0], eig[..., -1].abs().clamp(min=1.0)
    tol = torch.finfo(Q.dtype).eps ** 0.5
    if bool((lo < -tol * hi).any()):
        raise ValueError(
            "qp_solve: Q is not positive semidefinite (smallest eigenvalue "
            f"{lo.min().item():.3g}): the QP is non-convex and cannot be solved here"
        )
    raise ValueError(
        "qp_solve: Q is singular (positive semidefinite but not definite, smallest eigenvalue "
        f"{lo.min().item():.3g}), e.g. an LP with Q = 0. Its solution may sit at a vertex where "
        "the gradient is zero or undefined. Pass ridge=ε > 0 to solve with Q + εI instead "
        "(this biases z by O(ε) and makes it unique and differentiable)"
    )


def rank_deficient(A: Tensor) -> Tensor:
    """Return a BoolTensor [*B_A]: where A [*B_A, p, n] lacks full row rank numerically.

    The test is on A itself, σ_min(A) ≤ max(p, n) · eps · σ_max(A) (the tolerance of
    `numpy.linalg.matrix_rank`), not on A Q⁻¹ Aᵀ, whose condition number is cond(A)² cond(Q):
    in float32 that would reject an A with cond(A) ≈ 1e3. A with p > n rows never has full row
    rank.
    """
    p, n = A.shape[-2], A.shape[-1]
    if p == 0:
        return torch.zeros(A.shape[:-2], dtype=torch.bool, device=A.device)
    if p > n:
        return torch.ones(A.shape[:-2], dtype=torch.bool, device=A.device)
    sv = torch.linalg.svdvals(A)  # descending, shape: (*B_A, p)
    tol = max(p, n) * torch.finfo(A.dtype).eps * sv[..., 0]
    return ~(sv[..., -1] > tol)
