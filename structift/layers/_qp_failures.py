"""What `qp_solve` reports: per-problem statistics, and the errors raised when problems fail."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ._qp_infeasible import FarkasCertificate

__all__ = [
    "InfeasibleQPError",
    "QPConvergenceError",
    "QPStatus",
    "infeasible_error",
    "raise_on_failure",
]


class QPStatus(NamedTuple):
    """Per-problem solver statistics, each of batch shape [*B].

    Attributes:
        converged: BoolTensor, the KKT residual reached the accepted tolerance.
        infeasible: BoolTensor, a verified Farkas certificate proved {z : Gz ≤ h, Az = b}
            empty (see `FarkasCertificate`).
        iterations: LongTensor, interior-point iterations taken.
        polished: BoolTensor, z is the exact solution on the identified active set (see
            `qp_solve`); False where the active set is degenerate or the solve failed.
        kkt_residual: the scaled KKT residual max(‖r_dual‖∞/(1 + τ), ‖Gz + s − h‖∞/(1+‖h‖∞),
            ‖Az − b‖∞/(1+‖b‖∞), sᵀλ/(1+|objective|)) at the returned point, where
            r_dual = Qz + q + Gᵀλ + Aᵀν and τ is the modulus of its largest term (of
            q_j, Q_jl z_l, G_ij λ_i, A_ij ν_i): the scale of its rounding error.
    """

    converged: Tensor
    infeasible: Tensor
    iterations: Tensor
    polished: Tensor
    kkt_residual: Tensor


class InfeasibleQPError(ValueError):
    """No z satisfies Gz ≤ h and Az = b for some problems of the batch.

    Raised only where a Farkas certificate λ ≥ 0, ν with Gᵀλ + Aᵀν = 0 and hᵀλ + bᵀν < 0
    was found and verified; ``certificate.check()`` verifies it again from the stored data.

    Attributes:
        status: the `QPStatus` of the whole batch (``status.infeasible`` marks the problems).
        certificate: the `FarkasCertificate` of those problems (``certificate.batch_index`` holds
            their batch indices).
    """

    def __init__(self, message: str, status: QPStatus, certificate: FarkasCertificate) -> None:
        super().__init__(message)
        self.status = status
        self.certificate = certificate


class QPConvergenceError(RuntimeError):
    """The interior-point method stopped before reaching its tolerance.

    Attributes:
        status: the `QPStatus` of the whole batch.
    """

    def __init__(self, message: str, status: QPStatus) -> None:
        super().__init__(message)
        self.status = status


def elements(index: Tensor) -> str:
    """Name up to five batch elements from their indices [K, len(B)]."""
    rows = index[:5].tolist()
    if index.shape[-1] == 0:
        return "the (unbatched) problem"
    if index.shape[-1] == 1:
        return f"batch elements {[r[0] for r in rows]}"
    return f"batch elements {[tuple(r) for r in rows]}"


def _rows(mask: Tensor, names: str) -> list[str]:
    idx = mask.nonzero().reshape(-1).tolist()
    if not idx:
        return []
    shown = ", ".join(map(str, idx[:8])) + (", …" if len(idx) > 8 else "")
    return [f"rows [{shown}] of ({names})"]


def infeasible_error(
    status: QPStatus, certificate: FarkasCertificate, prefix: str = "", note: str | None = None
) -> InfeasibleQPError:
    """Build the error for the certified problems, naming the conflicting constraints.

    ``note`` (after the count) defaults to the number of other problems that failed.
    """
    chk = certificate.check()
    K, B = certificate.batch_index.shape[0], status.infeasible.numel()
    if note is None:
        others = int((~status.converged & ~status.infeasible).sum())
        note = f" ({others} other problems did not converge: see status)" if others else ""
    parts = _rows(certificate.lam[0] > 0, "G, h") + _rows(certificate.nu[0] != 0, "A, b")
    rows = " and ".join(parts) or "the constraints"
    return InfeasibleQPError(
        f"qp_solve: {prefix}{K} of {B} problems are infeasible{note}: no z satisfies Gz ≤ h, "
        f"Az = b, e.g. {elements(certificate.batch_index)}. For the first, {rows} conflict: "
        f"a Farkas certificate (λ ≥ 0, ν) with ‖Gᵀλ + Aᵀν‖₁ ≤ {chk.residual[0].item():.2g} and "
        f"hᵀλ + bᵀν ≤ {-chk.value[0].item():.4g} proves that no z with ‖z‖∞ < "
        f"{chk.radius[0].item():.3g} is feasible (verify with `error.certificate.check()`). "
        "Relax h or b, or drop conflicting constraints, for these elements; pass check=False "
        "to get the status instead of this error",
        status,
        certificate,
    )


def raise_on_failure(
    status: QPStatus, certificate: FarkasCertificate | None, accept_tol: float, max_iter: int
) -> None:
    """Raise `InfeasibleQPError` or `QPConvergenceError` unless every problem converged."""
    if bool(status.converged.all()):
        return
    if certificate is not None and certificate.batch_index.shape[0] > 0:
        raise infeasible_error(status, certificate)
    bad = ~status.converged
    worst = status.kkt_residual[bad].max().item()
    raise QPConvergenceError(
        f"qp_solve: {int(bad.sum())} of {bad.numel()} problems did not converge (worst scaled KKT "
        f"residual {worst:.3g} > {accept_tol:.3g} after at most {max_iter} iterations), e.g. "
        f"{elements(bad.nonzero())}. No Farkas certificate of infeasibility verified for them. "
        "Causes: linearly dependent active constraints, a badly scaled or nearly infeasible "
        "problem, or float32 rounding; try float64, rescaling, a larger max_iter or tol. Pass "
        "check=False to get the status instead of this error",
        status,
    )
