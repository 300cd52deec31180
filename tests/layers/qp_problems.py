"""Random convex QPs with a known primal-dual solution, for the QP layer tests.

A problem is built backward from a chosen (z*, λ*, ν*): pick Q ≻ 0, G, A, an active set,
λ* > 0 on it and slacks s* > 0 off it, then set h = Gz* + s*, b = Az* and
q = −(Qz* + Gᵀλ* + Aᵀν*). The KKT conditions then hold exactly at (z*, λ*, ν*), and with
strict complementarity and fewer active constraints plus equalities than variables (LICQ)
that point is the unique primal-dual solution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KnownQP(NamedTuple):
    """Problem data [B, ...] and its exact solution."""

    Q: Tensor
    q: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    z: Tensor
    lam: Tensor
    nu: Tensor

    @property
    def theta(self) -> tuple[Tensor, ...]:
        return (self.Q, self.q, self.G, self.h, self.A, self.b)


def known_qp(
    B: int,
    n: int,
    m: int,
    p: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> KnownQP:
    """Return a batch of B strictly convex QPs with n variables, m inequalities, p equalities.

    At most ``n − p − 1`` inequalities are active, so the solution is unique and nondegenerate.
    The data are built in float64 and cast to ``dtype`` (in float32 the rounded problem's exact
    solution differs from z* by about cond · 6e-8).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    f64 = torch.float64

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=f64)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=f64)

    L = randn(B, n, n)
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=f64)
    G, A = randn(B, m, n), randn(B, p, n)
    z, nu = randn(B, n), randn(B, p)
    n_active = min(m, max(n - p - 1, 0))
    order = rand(B, m).argsort(-1)
    active = torch.zeros(B, m, dtype=torch.bool)
    active.scatter_(1, order[:, :n_active], rand(B, n_active) < 0.7)
    lam = torch.where(active, 0.2 + rand(B, m), 0.0)
    s = torch.where(active, 0.0, 0.2 + rand(B, m))
    h = (G @ z[..., None])[..., 0] + s
    b = (A @ z[..., None])[..., 0]
    q = -(
        (Q @ z[..., None])[..., 0]
        + (G.mT @ lam[..., None])[..., 0]
        + (A.mT @ nu[..., None])[..., 0]
    )
    out = KnownQP(Q, q, G, h, A, b, z, lam, nu)
    return KnownQP(*(x.to(dtype=dtype, device=device) for x in out))


def kkt_residual(
    theta: tuple[Tensor, ...], z: Tensor, lam: Tensor, nu: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return the stationarity, primal infeasibility, complementarity and dual sign violations.

    Each is a max-abs per problem [B], computed directly from the definitions.
    """
    Q, q, G, h, A, b = theta
    stat = Q @ z[..., None] + q[..., None] + G.mT @ lam[..., None] + A.mT @ nu[..., None]
    slack = h - (G @ z[..., None])[..., 0]
    prim = torch.cat([(-slack).clamp(min=0), ((A @ z[..., None])[..., 0] - b).abs()], -1)
    comp = (lam * slack).abs()

    def mx(x: Tensor) -> Tensor:
        return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])

    return mx(stat[..., 0]), mx(prim), mx(comp), mx((-lam).clamp(min=0))
