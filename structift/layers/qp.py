"""Differentiable batched quadratic programs (OptNet, Amos & Kolter 2017, arXiv:1703.00443).

`qp_solve` solves

    z*(θ) = argmin_z ½ zᵀQz + qᵀz   s.t.   Gz ≤ h,  Az = b,      θ = (Q, q, G, h, A, b)

for a batch of problems with a primal-dual interior-point method (`structift.layers._ipm`), and
differentiates z* (and the multipliers λ*, ν*) through the KKT conditions

    Qz + q + Gᵀλ + Aᵀν = 0,   diag(λ)(Gz − h) = 0,   Az − b = 0,   λ ≥ 0,

by the implicit function theorem, reusing the forward's last factorization.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._ipm import IPMResult, interior_point, merge, polish, refresh_factor
from ._kkt import QPData, kkt_solve, prepare
from ._qp_checks import factor_Q, rank_deficient, validate
from ._qp_failures import (
    InfeasibleQPError,
    QPConvergenceError,
    QPStatus,
    elements,
    infeasible_error,
    raise_on_failure,
)
from ._qp_infeasible import FarkasCertificate, certify

__all__ = [
    "FarkasCertificate",
    "InfeasibleQPError",
    "QPConvergenceError",
    "QPLayer",
    "QPSolution",
    "QPStatus",
    "qp_solve",
]

# Default stopping tolerances on the scaled KKT residual (see `qp_solve`).
_DEFAULT_TOL = {torch.float64: 1e-12, torch.float32: 1e-7}
# The interior point first runs to this residual, then polishes (see `_QPFunction.forward`).
_COARSE_TOL = {torch.float64: 1e-6, torch.float32: 1e-6}
# An element whose progress stalls (rounding) before `tol` still counts as solved within this
# factor of `tol`.
_ACCEPT_FACTOR = 100.0


class QPSolution(NamedTuple):
    """Primal-dual solution of a batch of QPs (returned by ``qp_solve(..., full=True)``).

    Attributes:
        z: [*B, n] primal solution.
        lam: [*B, m] multipliers of Gz ≤ h (nonnegative).
        nu: [*B, p] multipliers of Az = b.
        status: the solver statistics.
    """

    z: Tensor
    lam: Tensor
    nu: Tensor
    status: QPStatus


def _flat(x: Tensor, batch: torch.Size, core: int) -> Tensor:
    """Broadcast x to [*batch, *core dims] and flatten the batch to one dim B."""
    core_shape = x.shape[x.dim() - core :]
    return x.expand(*batch, *core_shape).reshape(batch.numel(), *core_shape)


def _batch_data(opts: dict[str, Any], theta: tuple[Tensor, ...]) -> QPData:
    """Factor Q, [G; A] Q⁻¹ [G; A]ᵀ and its equality block for the flattened batch [B]."""
    Q, q, G, h, A, b = theta
    batch, Qs, Lq = opts["batch"], opts["Qs"], opts["Lq"]
    if Q.dim() == 2 and G.dim() == 2 and A.dim() == 2:
        # One factorization of Q and one Gram matrix serve the whole batch.
        zero = q.new_zeros(1, 1)  # placeholders: prepare ignores q, h, b
        pre = prepare(Qs[None], zero, G[None], zero, A[None], zero, Lq[None])
        data = QPData(*(x.expand(batch.numel(), *x.shape[1:]) for x in pre))
        return data._replace(q=_flat(q, batch, 1), h=_flat(h, batch, 1), b=_flat(b, batch, 1))
    return prepare(
        _flat(Qs, batch, 2),
        _flat(q, batch, 1),
        _flat(G, batch, 2),
        _flat(h, batch, 1),
        _flat(A, batch, 2),
        _flat(b, batch, 1),
        _flat(Lq, batch, 2),
    )


def _solve(data: QPData, tol: float, max_iter: int) -> IPMResult:
    """Interior point to a coarse tolerance, polish, and resume where polishing fails."""
    # Polishing makes z exact once the active set is identified, which a coarser residual
    # already does on most problems: stop there, polish, and resume the interior point
    # only where polishing fails (a misidentified or degenerate active set).
    coarse = max(tol, _COARSE_TOL[data.q.dtype])
    res = polish(data, interior_point(data, coarse, max_iter), _ACCEPT_FACTOR * tol)
    redo = ~res.polished & ~res.suspect & ~res.broke_down
    left = max_iter - int(res.iterations.max())
    if coarse > tol and left > 0 and bool(redo.any()):
        more = interior_point(data, tol, left, start=res, only=redo)
        res = merge(redo, polish(data, more, _ACCEPT_FACTOR * tol), res)
    # Unpolished elements (e.g. degenerate ones) differentiate with their iterate's factor.
    return refresh_factor(data, res)


def _status(
    data: QPData, res: IPMResult, batch: torch.Size, tol: float
) -> tuple[QPStatus, FarkasCertificate | None]:
    """Accept converged elements; search certificates of infeasibility for the others.

    The search (`_qp_infeasible`) runs only where the interior point failed, so feasible
    batches never pay for it.
    """
    converged = res.converged | (res.kkt_residual <= _ACCEPT_FACTOR * tol)
    infeasible, cert = torch.zeros_like(converged), None
    if not bool(converged.all()):
        m = data.h.shape[-1]
        GA, bad = data.GA[~converged], ~converged
        infeasible, cert = certify(bad, batch, GA[:, :m], data.h[bad], GA[:, m:], data.b[bad])
    parts = (converged, infeasible, res.iterations, res.polished, res.kkt_residual)
    return QPStatus(*(x.reshape(batch) for x in parts)), cert


def _reject_rank_deficient(args: dict[str, Tensor], batch: torch.Size) -> None:
    """Raise if A lacks full row rank anywhere: `InfeasibleQPError` where a certificate proves
    the problem infeasible (e.g. Az = b inconsistent), else a ValueError."""
    deficient = rank_deficient(args["A"]).expand(batch).reshape(-1)
    if not bool(deficient.any()):
        return
    G, h, A, b = (_flat(args[k], batch, c)[deficient] for k, c in zip("GhAb", (2, 1, 2, 1)))
    infeasible, cert = certify(deficient, batch, G, h, A, b)
    if bool((infeasible == deficient).all()):
        never = torch.zeros(batch, dtype=torch.bool, device=h.device)
        status = QPStatus(
            never, infeasible.reshape(batch), never.long(), never, h.new_full(batch, float("inf"))
        )
        note = " (nothing was solved: the solver needs A of full row rank)"
        raise infeasible_error(status, cert, "A does not have full row rank and ", note)
    redundant = deficient & ~infeasible
    raise ValueError(
        f"qp_solve: A (shape {tuple(args['A'].shape)}) does not have full row rank "
        f"(σ_min(A) ≤ max(p, n)·eps·σ_max(A)) for {int(deficient.sum())} of {batch.numel()} "
        f"problems; for {int(redundant.sum())} of them, e.g. "
        f"{elements(redundant.reshape(batch).nonzero())}, no certificate of infeasibility was "
        "found, so some equality constraints are redundant: remove them (the solver needs "
        "linearly independent rows of A)"
    )


class _QPFunction(torch.autograd.Function):
    """z, λ, ν = QP(θ) with the KKT adjoint as backward (the forward's factor reused).

    Why this backward does not go through ``structift.implicit.custom_root`` (the one IFT
    mechanism everything else uses): custom_root differentiates a residual F at a root, with
    a linear solve of ∂F/∂z there. The QP layer's adjoint solve instead reuses the interior
    point's *final factorization* of its reduced (Schur-complement, Lq-scaled) Newton matrix,
    in which the complementarity block is the iterate's barrier term W = s/λ (OptNet's choice,
    Amos & Kolter 2017) wherever the solution was not polished. That matrix is not ∂F/∂z of
    any residual at an exact root, so routing it through custom_root would either change the
    gradients (to the polished W = 0 / ∞ everywhere) or need a second factorization (the
    forward's is the cost to amortize). The backward is first order only
    (``once_differentiable``), as OptNet's and qpth's are.
    """

    @staticmethod
    def forward(opts: dict[str, Any], *theta: Tensor) -> tuple[Tensor, ...]:
        # What the backward needs travels through ``opts`` (setup_context takes it from there).
        q, G, A = theta[1], theta[2], theta[4]
        batch, tol = opts["batch"], opts["tol"]
        if batch.numel() == 0:
            # An empty batch: empty results, and zero gradients of the inputs' shapes.
            opts["_res"] = opts["_data"] = None
            empty = q.new_zeros(0)
            never = torch.zeros(batch, dtype=torch.bool, device=q.device)
            status = QPStatus(never, never, never.long(), never, empty.reshape(batch))
            opts["status"], opts["certificate"] = status, None
            sizes = (q.shape[-1], G.shape[-2], A.shape[-2])
            return tuple(q.new_zeros(*batch, k) for k in sizes)
        data = _batch_data(opts, theta)
        res = _solve(data, tol, opts["max_iter"])
        opts["status"], opts["certificate"] = _status(data, res, batch, tol)
        # The backward needs only Q's factor, M = Lq⁻¹[G; A]ᵀ and the equality blocks (see
        # `kkt_solve`): drop the rest so that less is held between forward and backward.
        none = data.q.new_empty(0)
        opts["_data"] = data._replace(
            Q=none, q=none, GA=none, QGAt=none, h=none, b=none, coef=none, Ct=none
        )
        opts["_res"] = res
        z = res.z.reshape(*batch, -1)
        lam = res.lam.reshape(*batch, -1)
        nu = res.nu.reshape(*batch, -1)
        return z, lam, nu

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        opts, *theta = inputs
        ctx.batch, ctx.shapes = opts["batch"], [x.shape for x in theta]
        ctx.data, ctx.res = opts.pop("_data"), opts.pop("_res")

    @staticmethod
    def vmap(info: Any, in_dims: tuple, opts: dict[str, Any], *theta: Tensor) -> Any:
        """Not supported: the QP layer is batched itself (pass the batch dimension instead)."""
        raise NotImplementedError(
            "qp_solve under torch.func.vmap is not supported: it solves batches natively; "
            "stack the problems along a leading batch dimension instead of vmapping"
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, gz: Tensor, glam: Tensor, gnu: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.res is None:  # an empty batch
            empty = [
                gz.new_zeros(s) if need else None
                for s, need in zip(ctx.shapes, ctx.needs_input_grad[1:])
            ]
            return (None, *empty)
        data: QPData = ctx.data
        res: IPMResult = ctx.res
        B = res.z.shape[0]
        # Adjoint KKT system (∂F/∂(z, λ, ν))ᵀ w = (gz, gλ, gν) with ŵλ = λ∘wλ: the matrix of a
        # Newton step, [[Q, Gᵀ, Aᵀ], [G, −W, 0], [A, 0, 0]] (Amos & Kolter 2017).
        # The forward's final factor: where polished, W = 0 / ∞ on the active / inactive
        # constraints (the exact Jacobian at a strictly complementary solution); elsewhere the
        # interior-point iterate's W = s/λ (OptNet's choice).
        wz, wl, wn = kkt_solve(
            data, res.UK, gz.reshape(B, -1), glam.reshape(B, -1), gnu.reshape(B, -1), res.keep
        )
        z, lam, nu = res.z, res.lam, res.nu
        # ∂ℓ/∂θ = −(∂F/∂θ)ᵀ w; Q enters F through its symmetric part, so its gradient is symmetric.
        need = ctx.needs_input_grad[1:]
        grads: list[Tensor | None] = [None] * 6
        # Each sum of two outer products a bᵀ + c dᵀ is one batched [a, c] @ [b, d]ᵀ product:
        # one pass over the [B, r, n] result instead of three.
        zw = torch.stack([-wz, -z], dim=-2)  # shape: (B, 2, n)
        if need[0]:
            grads[0] = torch.stack([0.5 * z, 0.5 * wz], dim=-1) @ zw
        if need[1]:
            grads[1] = -wz
        if need[2]:
            grads[2] = torch.stack([lam, wl], dim=-1) @ zw
        if need[3]:
            grads[3] = wl
        if need[4]:
            grads[4] = torch.stack([nu, wn], dim=-1) @ zw
        if need[5]:
            grads[5] = wn
        out: list[Tensor | None] = [None]
        for g, shape in zip(grads, ctx.shapes):
            if g is None:
                out.append(None)
                continue
            g = g.reshape(*ctx.batch, *g.shape[1:])
            # A parameter shared across the batch gets the sum of per-example gradients.
            out.append(g.sum_to_size(shape))
        return tuple(out)


def qp_solve(
    Q: Tensor,
    q: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    ridge: float = 0.0,
    tol: float | None = None,
    max_iter: int = 50,
    full: bool = False,
    check: bool = True,
) -> Any:
    r"""Solve a batch of convex QPs differentiably.

    Solves, for every batch element,

    $$ z^\star = \arg\min_z \tfrac12 z^\top Q z + q^\top z
       \quad\text{s.t.}\quad Gz \le h,\; Az = b $$

    with a batched primal-dual interior-point method (Mehrotra predictor-corrector), and
    differentiates z⋆, λ⋆, ν⋆ by the implicit function theorem on the KKT conditions
    (Amos & Kolter 2017, arXiv:1703.00443), reusing the forward's last factorization: a
    backward costs a few triangular solves. The forward ends by polishing: one exact solve
    of the equality-constrained QP on the identified active set {i : λ_i > s_i}, kept where
    it is feasible. It removes the interior point's O(μ/λ) slack on constraints with small
    multipliers, so z is exact to rounding and the backward differentiates the KKT system of
    the solution itself (W = 0 on active, rows of inactive constraints dropped) rather than a
    central-path point. Where the active rows are dependent (a degenerate vertex) the
    interior-point iterate and its factor (W = s/λ) are kept.

    Any argument may omit the batch dimensions (it is then shared by every problem); the
    batch shape [*B] is the broadcast of the arguments' batch shapes. A shared argument gets
    the SUM of the per-problem gradients, as autograd's broadcasting rule says.

    Invariants: Q is symmetric positive definite (only its symmetric part ½(Q + Qᵀ) is used,
    so its gradient is symmetric); A has full row rank, tested on A itself:
    σ_min(A) > max(p, n)·eps·σ_max(A). The returned point satisfies the KKT conditions up to
    the scaled residual in ``status.kkt_residual``. An empty batch (some batch dimension 0)
    returns empty results, and zero gradients of the inputs' shapes.

    Infeasibility: where the interior point fails, a Farkas certificate λ ≥ 0, ν with
    Gᵀλ + Aᵀν = 0 and hᵀλ + bᵀν < 0 is searched for (in float64) and verified with bounds on
    its rounding; only a verified one marks a problem infeasible (see `FarkasCertificate`).
    Feasible batches never run this search.

    LPs and singular Q: Q must be positive definite, because where it is singular the solution
    can sit at a vertex of the feasible set, where dz/dθ is zero or undefined. Pass
    ``ridge=ε`` to solve with Q + εI: the solution becomes unique and differentiable and moves
    by O(ε) (for an LP, toward the least-norm optimal point as ε → 0).

    Args:
        Q: [*B, n, n] symmetric positive definite.
        q: [*B, n].
        G: [*B, m, n] inequality matrix, or None (no inequalities).
        h: [*B, m], or None.
        A: [*B, p, n] equality matrix with full row rank, or None.
        b: [*B, p], or None.
        ridge: ε ≥ 0 added to Q's diagonal (see above).
        tol: tolerance on the scaled KKT residual (see `QPStatus`); default 1e-12 in float64
            and 1e-7 in float32. The interior point first runs to max(tol, 1e-6),
            then polishes; a polished point counts as solved when its own residual is at most
            100·tol, and elements whose polishing fails go on to ``tol``. If rounding ends
            progress earlier, a residual up to 100·tol is accepted.
        max_iter: interior-point iteration cap.
        full: return a `QPSolution` (z, λ, ν, status) instead of z alone; λ and ν are
            differentiable too.
        check: raise `InfeasibleQPError` / `QPConvergenceError` if any problem fails; with
            ``check=False`` inspect ``status`` instead (failed elements hold the best iterate).

    Returns:
        z [*B, n], or a `QPSolution` when ``full=True``.

    Raises:
        TypeError: non-tensor arguments or mixed / non-float dtypes.
        ValueError: bad shapes, devices, NaN/inf, Q not positive definite (non-convex or
            singular), A without full row rank (with consistent, redundant equalities).
        InfeasibleQPError: (a ValueError) a verified certificate proves no feasible point,
            when ``check=True``; also with ``check=False`` when A lacks full row rank (the
            batch cannot be solved then), e.g. for inconsistent equalities Az = b.
        QPConvergenceError: (a RuntimeError) not converged, when ``check=True``.

    Example:
        >>> import torch
        >>> from structift.layers import qp_solve
        >>> Q = torch.eye(2, dtype=torch.float64)
        >>> q = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        >>> G = torch.tensor([[1.0, 1.0]], dtype=torch.float64)  # z1 + z2 ≤ 1
        >>> h = torch.tensor([1.0], dtype=torch.float64)
        >>> qp_solve(Q, q, G, h)
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    args, batch, _, _, _ = validate(Q, q, G, h, A, b)
    if not ridge >= 0.0:
        raise ValueError(f"qp_solve: ridge must be ≥ 0, got {ridge}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"qp_solve: max_iter must be a positive int, got {max_iter!r}")
    tol_ = _DEFAULT_TOL[args["Q"].dtype] if tol is None else float(tol)
    if not tol_ > 0.0:
        raise ValueError(f"qp_solve: tol must be > 0, got {tol}")
    with torch.no_grad():
        Qs, Lq = factor_Q(args["Q"], ridge)
        _reject_rank_deficient(args, batch)
    opts: dict[str, Any] = {
        "batch": batch,
        "tol": tol_,
        "max_iter": max_iter,
        "Qs": Qs,
        "Lq": Lq,
    }
    theta = [args[k] for k in ("Q", "q", "G", "h", "A", "b")]
    z, lam, nu = _QPFunction.apply(opts, *theta)
    status: QPStatus = opts["status"]
    if check:
        raise_on_failure(status, opts["certificate"], _ACCEPT_FACTOR * tol_, max_iter)
    if full:
        return QPSolution(z, lam, nu, status)
    return z


class QPLayer(nn.Module):
    """A differentiable QP layer: ``QPLayer(**options)(Q, q, G, h, A, b)`` calls `qp_solve`.

    Solves min ½zᵀQz + qᵀz s.t. Gz ≤ h, Az = b per batch element (OptNet,
    arXiv:1703.00443). The constructor takes `qp_solve`'s keyword options (``ridge``, ``tol``,
    ``max_iter``, ``full``, ``check``); the call takes the problem data with the shapes
    documented there and returns z [*B, n] (or a `QPSolution` when ``full=True``).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = set(options) - {"ridge", "tol", "max_iter", "full", "check"}
        if unknown:
            raise TypeError(f"QPLayer: unknown options {sorted(unknown)}")
        self.options = options

    def forward(
        self,
        Q: Tensor,
        q: Tensor,
        G: Tensor | None = None,
        h: Tensor | None = None,
        A: Tensor | None = None,
        b: Tensor | None = None,
    ) -> Any:
        """Solve the batch of QPs (see `qp_solve`)."""
        return qp_solve(Q, q, G, h, A, b, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
