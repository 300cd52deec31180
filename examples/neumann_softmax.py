"""Does a truncated Neumann series converge to the right inverse? (seed §6's open question).

For the softmax KKT system K = [[τ diag(1/z), 1], [1ᵀ, 0]] we compare the truncated Neumann
approximation x_k = α Σ_{j<k} (I − αA)ʲ b of A⁻¹b against the exact dz/dθ · v, for:

* A = K, the full KKT matrix: a saddle point, one negative eigenvalue λ₋ < 0, so
  |1 − αλ₋| > 1 for every α > 0: the series diverges, whatever the step size;
* A = the reduced Hessian on the tangent space {d : 1ᵀd = 0} (null-space method), SPD:
  converges iff 0 < α < 2/λ_max, at the rate ρ = max(|1 − αλ_min|, |1 − αλ_max|);
* the same reduced system preconditioned by M = Nᵀ diag(z) N / τ: all but one eigenvalue of
  MR equal 1, so α = 2/(λ_min + λ_max) converges in a few dozen terms;
* A = KᵀK (normal equations), SPD: converges for α < 2/σ_max², but at the slow rate
  1 − (σ_min/σ_max)²;
* the Identity ("Jacobian-free") approximation, for scale.

Run: ``python examples/neumann_softmax.py`` (writes docs/implicit/neumann_softmax.png), or
``--smoke`` for a quick check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from structift.implicit import (
    ConvergenceError,
    FunctionOperator,
    MatrixOperator,
    Neumann,
)
from structift.variational.simplex import kkt_matrix, softmax_jacobian

DT = torch.float64


def spectral_radius(A: torch.Tensor, alpha: float) -> float:
    """ρ(I − αA) from the eigenvalues of A."""
    eig = torch.linalg.eigvals(A)
    return float((1 - alpha * eig).abs().max())


def study(n: int = 8, temperature: float = 1.0, terms: int = 1000, seed: int = 0) -> dict:
    """Compute the error curves and spectral radii for one random softmax problem."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g, dtype=DT)
    z = torch.softmax(theta / temperature, -1)
    v = torch.randn(n, generator=g, dtype=DT)
    exact = softmax_jacobian(z, temperature) @ v  # dz/dθ · v, the target
    K = kkt_matrix(z, temperature)
    H = torch.diag(temperature / z)
    # Orthonormal basis of {d : 1ᵀd = 0}: the null space of the constraint.
    N = torch.linalg.svd(torch.eye(n, dtype=DT) - torch.full((n, n), 1.0 / n, dtype=DT))[0][
        :, : n - 1
    ]
    R = N.T @ H @ N  # reduced Hessian, SPD
    curves: dict[str, tuple[list[float], float]] = {}

    def add(name: str, A: torch.Tensor, b: torch.Tensor, alpha: float, lift) -> None:
        errs = []
        x, r = torch.zeros_like(b), b.clone()
        for _ in range(terms):
            x = x + alpha * r
            r = r - alpha * (A @ r)
            errs.append(float((lift(x) - exact).norm() / exact.norm()))
        curves[name] = (errs, spectral_radius(A, alpha))

    kb = torch.cat([v, torch.zeros(1, dtype=DT)])
    top = lambda x: x[:n]  # noqa: E731
    lam_K = float(torch.linalg.eigvalsh(K).abs().max())
    add("full KKT K, α = 1/|λ|max", K, kb, 1.0 / lam_K, top)
    add("full KKT K, α = 0.1/|λ|max", K, kb, 0.1 / lam_K, top)
    lam_R = torch.linalg.eigvalsh(R)
    add("reduced NᵀHN, α = 1/λmax", R, N.T @ v, 1.0 / float(lam_R.max()), lambda y: N @ y)
    add("reduced NᵀHN, α = 1.9/λmax", R, N.T @ v, 1.9 / float(lam_R.max()), lambda y: N @ y)
    add("reduced NᵀHN, α = 2.05/λmax", R, N.T @ v, 2.05 / float(lam_R.max()), lambda y: N @ y)
    # Preconditioned by M = Nᵀ diag(z) N / τ ≈ R⁻¹ (the inverse of H's diagonal, projected):
    # MR has all but one eigenvalue equal to 1, so the optimal α = 2/(λmin + λmax) converges fast.
    M = N.T @ torch.diag(z / temperature) @ N
    lam_MR = torch.linalg.eigvals(M @ R).real
    alpha_pc = 2.0 / float(lam_MR.min() + lam_MR.max())
    add(
        "reduced, preconditioned MR, α = 2/(λmin+λmax)",
        M @ R,
        M @ (N.T @ v),
        alpha_pc,
        lambda y: N @ y,
    )
    KK = K.T @ K
    add(
        "normal equations KᵀK, α = 1/σ²max",
        KK,
        K.T @ kb,
        1.0 / float(torch.linalg.eigvalsh(KK).max()),
        top,
    )
    identity_err = float((top(kb) - exact).norm() / exact.norm())
    return {
        "curves": curves,
        "identity": identity_err,
        "K_eigs": torch.linalg.eigvalsh(K),
        "R_eigs": lam_R,
        "z": z,
        "K": K,
        "R": R,
        "N": N,
        "v": v,
        "exact": exact,
    }


def check_with_library(res: dict) -> tuple[str, float]:
    """Run structift's Neumann solver: it must raise on K and converge on the reduced system."""
    K, R, N, v, exact = res["K"], res["R"], res["N"], res["v"], res["exact"]
    n = v.shape[0]
    kb = torch.cat([v, torch.zeros(1, dtype=DT)]).unsqueeze(0)
    try:
        Neumann(max_iter=200, alpha=1.0 / float(torch.linalg.eigvalsh(K).abs().max())).solve(
            MatrixOperator(K), kb
        )
        message = "no error (unexpected)"
    except ConvergenceError as err:
        message = str(err).split(". ")[0]
    alpha = 1.0 / float(res["R_eigs"].max())
    # Matrix-free on the reduced system: the operator is y -> Nᵀ H N y.
    op = FunctionOperator(lambda y: y @ R.T, 1, n - 1, DT, symmetric=True)
    sol = Neumann(max_iter=20000, alpha=alpha, rtol=1e-10).solve(op, (N.T @ v).unsqueeze(0))
    err = float((N @ sol.solution[0] - exact).norm() / exact.norm())
    return message, err


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for name, (errs, rho) in res["curves"].items():
        ax.semilogy(range(1, len(errs) + 1), errs, label=f"{name} (ρ = {rho:.3f})")
    ax.axhline(res["identity"], color="gray", ls=":", label="Identity (Jacobian-free)")
    ax.set_ylim(1e-12, 1e6)
    ax.set_xlabel("Neumann terms k")
    ax.set_ylabel("relative error of dz/dθ · v")
    ax.set_title("Truncated Neumann series on the softmax KKT system")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small, fast run (no plot)")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--terms", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("docs/implicit/neumann_softmax.png"))
    args = parser.parse_args(argv)
    terms = 60 if args.smoke else args.terms
    res = study(n=args.n, terms=terms)
    print(f"KKT eigenvalues: {[round(float(e), 3) for e in res['K_eigs']]}")
    print(f"reduced-Hessian eigenvalues: {[round(float(e), 3) for e in res['R_eigs']]}")
    print(f"{'variant':48s} {'rho':>8s} {'err k=10':>10s} {'err k=' + str(terms):>12s}")
    for name, (errs, rho) in res["curves"].items():
        print(f"{name:48s} {rho:8.4f} {errs[9]:10.3g} {errs[-1]:12.3g}")
    print(f"{'Identity (Jacobian-free)':48s} {'':8s} {res['identity']:10.3g}")
    message, err = check_with_library(res)
    print(f"structift Neumann on K: {message}")
    print(f"structift Neumann on the reduced system (rtol 1e-10): relative error {err:.2e}")
    if not args.smoke:
        plot(res, args.out)
        print(f"wrote {args.out}")
    return {"res": res, "library_error": err, "library_message": message}


if __name__ == "__main__":
    main()
