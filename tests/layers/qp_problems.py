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

from tests.seeding import seeded


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
    g = generator if generator is not None else seeded(0)
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


def farkas_qp(
    B: int,
    n: int,
    m: int,
    p: int,
    *,
    gap: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    dyadic: bool = False,
) -> tuple[Tensor, ...]:
    """Return B QPs (Q, q, G, h, A, b) that are infeasible for gap > 0 and feasible for gap ≤ 0.

    Built around a chosen Farkas vector: λ ≥ 0 on a random support S ∋ 0 and ν, with row 0 of
    G solved for so that Gᵀλ + Aᵀν = 0. Around a point z0, h = Gz0 + s with
    s_i = −gap·(1 + |G_i z0|) on S and s_i ∈ [0.2, 1.2] off it, and b = Az0, so that

        hᵀλ + bᵀν = sᵀλ = −gap · Σ_S λ_i (1 + |G_i z0|):

    for gap > 0 (λ, ν) is a certificate of infeasibility, each relative violation being `gap`;
    for gap ≤ 0 the point z0 is feasible (gap < 0: a feasible region of width ~|gap| in the
    directions that (λ, ν) pins down, the "near-infeasible" case). Needs m ≥ 1 and p < n.

    In float32 rounding the data moves Gᵀλ + Aᵀν off zero by ~1e-7, which can turn such a
    problem feasible far out. With ``dyadic=True``, G, A, z0, λ, ν are small dyadic rationals
    (quarters, λ_0 = 1; A with 4 added on its leading diagonal, so of full row rank) and s a
    multiple of 2⁻¹², so the construction is exact in float32 too (|gap| ≥ 1e-3 then).
    """
    g = generator
    f64 = torch.float64

    def randn(*shape: int) -> Tensor:
        x = torch.randn(*shape, generator=g, dtype=f64)
        return (4 * x).round() / 4 if dyadic else x

    L = torch.randn(B, n, n, generator=g, dtype=f64)
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=f64)
    G, A, z0, q = randn(B, m, n), randn(B, p, n), randn(B, n), torch.randn(B, n, generator=g)
    if dyadic:
        # Rounding can make A rank deficient: a dominant leading diagonal keeps full row rank.
        A[:, :, :p] += 4 * torch.eye(p, dtype=f64)
    support = torch.rand(B, m, generator=g) < 0.5
    support[:, 0] = True  # row 0 is the one solved for
    weights = torch.randint(1, 3, (B, m), generator=g).to(f64)
    if not dyadic:
        weights = 0.5 + torch.rand(B, m, generator=g, dtype=f64)
    lam = torch.where(support, weights, 0.0)
    lam[:, 0] = 1.0
    nu = torch.randint(-2, 3, (B, p), generator=g).to(f64) if dyadic else randn(B, p)
    G[:, 0] = -(G[:, 1:].mT @ lam[:, 1:, None] + A.mT @ nu[..., None])[..., 0]
    Gz = (G @ z0[..., None])[..., 0]
    off = 0.2 + torch.rand(B, m, generator=g, dtype=f64)
    slack = torch.where(support, -gap * (1 + Gz.abs()), off)
    if dyadic:
        slack = (slack * 2**12).round() / 2**12
    h, b = Gz + slack, (A @ z0[..., None])[..., 0]
    return tuple(x.to(dtype) for x in (Q, q.to(f64), G, h, A, b))


def square_equality_qp(
    B: int,
    n: int,
    m: int,
    *,
    cond: tuple[float, float],
    generator: torch.Generator,
) -> tuple[Tensor, ...]:
    """Return B QPs (float64) whose equalities Az = b are square Gaussian systems (p = n).

    cond(A) lies in [cond[0], cond[1]] (rejection sampling); b is Gaussian, so z = A⁻¹b, and
    the m inequalities hold at z with slacks in [0.2, 1.2]. The multipliers ν = −A⁻ᵀ(Qz + q)
    are then up to cond(A) times larger than q: the case that float32 rounding makes hard.
    """
    g = generator
    f64 = torch.float64
    kept: list[Tensor] = []
    while sum(x.shape[0] for x in kept) < B:
        cand = torch.randn(4 * B, n, n, generator=g, dtype=f64)
        c = torch.linalg.cond(cand)
        kept.append(cand[(c >= cond[0]) & (c <= cond[1])])
    A = torch.cat(kept)[:B]
    L = torch.randn(B, n, n, generator=g, dtype=f64)
    Q = L @ L.mT / n + 0.5 * torch.eye(n, dtype=f64)
    q, b = torch.randn(B, n, generator=g, dtype=f64), torch.randn(B, n, generator=g, dtype=f64)
    z = torch.linalg.solve(A, b)
    G = torch.randn(B, m, n, generator=g, dtype=f64)
    h = (G @ z[..., None])[..., 0] + 0.2 + torch.rand(B, m, generator=g, dtype=f64)
    return Q, q, G, h, A, b


def conditioned_matrix(
    B: int, p: int, n: int, cond: float, *, generator: torch.Generator
) -> Tensor:
    """Return B matrices [B, p, n] (p ≤ n, float64) with singular values log-spaced in
    [1/cond, 1]·√n, so cond(A) = cond exactly (to rounding)."""
    f64 = torch.float64
    U = torch.linalg.qr(torch.randn(B, p, p, generator=generator, dtype=f64))[0]
    V = torch.linalg.qr(torch.randn(B, n, n, generator=generator, dtype=f64))[0]
    s = torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), p, dtype=f64) * n**0.5
    return U @ torch.diag_embed(s.expand(B, p)) @ V[:, :p]
