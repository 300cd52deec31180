"""Linear solvers: accuracy (residual ~0), transposes, batching, and loud failures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from structift.implicit import (
    CG,
    GMRES,
    MINRES,
    AbstractLinearSolver,
    ConvergenceError,
    ConvergenceWarning,
    Dense,
    FunctionOperator,
    Identity,
    MatrixOperator,
    Neumann,
    SingularSystemError,
    Status,
)

DT = torch.float64


def spd(B: int, n: int, cond: float = 10.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(B, n, n, dtype=DT))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)
    return Q @ torch.diag_embed(eig.expand(B, n)) @ Q.mT


def sym_indefinite(B: int, n: int) -> torch.Tensor:
    """A KKT (saddle-point) matrix [[H, Aᵀ], [A, 0]] with H SPD and A full row rank."""
    m = max(1, n // 3)
    H = spd(B, n - m)
    A = torch.randn(B, m, n - m, dtype=DT)
    top = torch.cat([H, A.mT], -1)
    bottom = torch.cat([A, torch.zeros(B, m, m, dtype=DT)], -1)
    return torch.cat([top, bottom], -2)


def general(B: int, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DT) * 3 + torch.randn(B, n, n, dtype=DT) / n**0.5


@dataclass(frozen=True)
class Case:
    """A solver with the matrix classes it can solve (capability flags, numpyro style)."""

    name: str
    make: Callable[[torch.Tensor], AbstractLinearSolver]
    spd: bool = True
    symmetric: bool = False
    general: bool = False


def _neumann(A: torch.Tensor) -> AbstractLinearSolver:
    lam_max = float(torch.linalg.eigvalsh(A).max())
    return Neumann(max_iter=5000, alpha=1.0 / lam_max, rtol=1e-11)


CASES = [
    Case("dense-lu", lambda A: Dense(), symmetric=True, general=True),
    Case("dense-cholesky", lambda A: Dense(assume="spd")),
    Case("cg", lambda A: CG()),
    Case("minres", lambda A: MINRES(), symmetric=True),
    Case("gmres", lambda A: GMRES(), symmetric=True, general=True),
    Case("gmres-restart3", lambda A: GMRES(restart=3, max_iter=5000), general=True),
    Case("neumann", _neumann),
]

MATRICES = {"spd": spd, "symmetric": sym_indefinite, "general": general}


def _params() -> list:
    out = []
    for case in CASES:
        for kind in MATRICES:
            if getattr(case, kind):
                out.append(pytest.param(case, kind, id=f"{case.name}-{kind}"))
    return out


@pytest.mark.parametrize(("case", "kind"), _params())
def test_solve_matches_direct_and_residual_is_zero(case: Case, kind: str) -> None:
    A = MATRICES[kind](3, 7)
    b = torch.randn(3, 7, dtype=DT)
    solver = case.make(A)
    op = MatrixOperator(A, symmetric=kind != "general", positive_definite=kind == "spd")
    sol = solver.solve(solver.init(op), b)
    assert sol.status == Status.SUCCESS
    assert sol.residual_norm.shape == (3,)
    assert (sol.residual_norm <= 1e-8 * b.norm(dim=-1)).all()
    torch.testing.assert_close(sol.solution, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(("case", "kind"), _params())
def test_transpose_solves_transposed_system(case: Case, kind: str) -> None:
    A = MATRICES[kind](2, 6)
    b = torch.randn(2, 6, dtype=DT)
    solver = case.make(A)
    op = MatrixOperator(A, symmetric=kind != "general", positive_definite=kind == "spd")
    sol = solver.solve(solver.transpose(solver.init(op)), b)
    assert (sol.residual_norm <= 1e-8 * b.norm(dim=-1)).all()
    torch.testing.assert_close(sol.solution, torch.linalg.solve(A.mT, b), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(("case", "kind"), _params())
def test_batched_equals_stacked_singles(case: Case, kind: str) -> None:
    A = MATRICES[kind](4, 5)
    b = torch.randn(4, 5, dtype=DT)
    b[2] = 0.0  # a zero right-hand side has the exact solution 0
    solver = case.make(A)
    batched = solver.solve(solver.init(MatrixOperator(A)), b).solution
    singles = torch.cat(
        [solver.solve(solver.init(MatrixOperator(A[i])), b[i : i + 1]).solution for i in range(4)]
    )
    torch.testing.assert_close(batched, singles, rtol=1e-7, atol=1e-9)
    assert (batched[2] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_empty_batch_returns_empty_solution_without_applying_the_operator(case: Case) -> None:
    def never(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the operator was applied to an empty batch")

    op = FunctionOperator(never, 0, 4, DT, rmv=never, symmetric=True)
    solver = case.make(spd(1, 4))
    for state in (solver.init(op), solver.transpose(solver.init(op))):
        sol = solver.solve(state, torch.zeros(0, 4, dtype=DT))
        assert sol.solution.shape == (0, 4) and sol.residual_norm.shape == (0,)
        assert sol.status == Status.SUCCESS


def test_function_operator_and_identity() -> None:
    A = 2.5 * torch.eye(4, dtype=DT).expand(2, 4, 4)
    op = FunctionOperator(lambda x: 2.5 * x, 2, 4, DT, rmv=lambda x: 2.5 * x)
    b = torch.randn(2, 4, dtype=DT)
    exact = Identity(scale=2.5).solve(op, b)
    torch.testing.assert_close(exact.solution, torch.linalg.solve(A, b))
    assert exact.residual_norm.abs().max() < 1e-14
    approx = Identity().solve(op, b)  # wrong scale: reported, not hidden
    assert approx.status == Status.APPROXIMATE
    torch.testing.assert_close(approx.residual_norm, 1.5 * b.norm(dim=-1))
    with pytest.raises(ValueError, match="rmv"):
        FunctionOperator(lambda x: x, 1, 4, DT).transpose()


# Seeded draws of singular systems, in float32 and float64: tests/implicit/test_singular.py.
SINGULAR_SOLVERS = [Dense(), Dense(assume="spd"), CG(), MINRES(), GMRES()]


@pytest.mark.parametrize("solver", SINGULAR_SOLVERS, ids=lambda s: type(s).__name__)
def test_zero_matrix_raises_singular(solver: AbstractLinearSolver) -> None:
    A = torch.zeros(2, 3, 3, dtype=DT)
    with pytest.raises(SingularSystemError, match="singular"):
        solver.solve(solver.init(MatrixOperator(A, symmetric=True)), torch.ones(2, 3, dtype=DT))


def test_ill_conditioned_dense_raises() -> None:
    A = spd(1, 6, cond=1e20)
    with pytest.raises(SingularSystemError, match="rcond"):
        Dense().init(MatrixOperator(A))


def test_non_convergence_raises_with_advice_or_warns() -> None:
    A = spd(2, 30, cond=1e4)
    b = torch.randn(2, 30, dtype=DT)
    with pytest.raises(ConvergenceError, match="max_iter"):
        CG(max_iter=3).solve(MatrixOperator(A), b)
    with pytest.raises(ConvergenceError, match="did not converge"):
        MINRES(max_iter=3).solve(MatrixOperator(A), b)
    with pytest.raises(ConvergenceError, match="restart"):
        GMRES(max_iter=3).solve(MatrixOperator(A), b)
    with pytest.warns(ConvergenceWarning):
        sol = CG(max_iter=3, on_failure="warn").solve(MatrixOperator(A), b)
    assert sol.status == Status.MAX_ITERS
    assert (sol.solution != 0).any()  # the partial iterate, never silent zeros
    assert (sol.residual_norm > 1e-3).all()


def test_cg_on_indefinite_raises_value_error() -> None:
    A = sym_indefinite(1, 6)
    with pytest.raises(ValueError, match="MINRES"):
        CG().solve(MatrixOperator(A, symmetric=True), torch.randn(1, 6, dtype=DT))


def test_neumann_diverges_on_kkt_matrix_and_raises() -> None:
    A = sym_indefinite(1, 6)
    lam_max = float(torch.linalg.eigvalsh(A).abs().max())
    with pytest.raises(ConvergenceError, match="spectral radius"):
        Neumann(max_iter=200, alpha=1.0 / lam_max).solve(
            MatrixOperator(A), torch.randn(1, 6, dtype=DT)
        )


def test_neumann_truncation_error_is_rho_to_the_k() -> None:
    A = spd(1, 5, cond=4.0)
    b = torch.randn(1, 5, dtype=DT)
    lam = torch.linalg.eigvalsh(A)[0]
    alpha = 1.0 / float(lam.max())
    rho = float((1 - alpha * lam).abs().max())
    for k in (1, 5, 20):
        sol = Neumann(max_iter=k, alpha=alpha).solve(MatrixOperator(A), b)
        assert sol.status == Status.APPROXIMATE and sol.iterations == k
        assert float(sol.residual_norm[0]) <= rho**k * float(b.norm()) * (1 + 1e-9)
    with pytest.raises(ConvergenceError):
        Neumann(max_iter=5, alpha=alpha, rtol=1e-12).solve(MatrixOperator(A), b)


def test_bad_inputs_raise() -> None:
    op = MatrixOperator(spd(2, 3))
    with pytest.raises(ValueError, match="shape"):
        CG().solve(op, torch.ones(3, dtype=DT))
    with pytest.raises(TypeError, match="dtype"):
        CG().solve(op, torch.ones(2, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="NaN"):
        CG().solve(op, torch.full((2, 3), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        MatrixOperator(torch.ones(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="on_failure"):
        CG(on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        Neumann(alpha=0.0)


def test_gmres_stagnation_raises_early() -> None:
    # GMRES(1) on a rotation makes no progress at all: it must stop and raise, not spin.
    A = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=DT)
    b = torch.tensor([[1.0, 0.0]], dtype=DT)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iterations"):
        GMRES(restart=1, max_iter=500).solve(MatrixOperator(A), b)
    sol = GMRES(restart=2).solve(MatrixOperator(A), b)
    torch.testing.assert_close(sol.solution, torch.linalg.solve(A, b[0]).unsqueeze(0))


@pytest.mark.parametrize("make", [Dense, CG, MINRES, GMRES], ids=lambda c: c.__name__)
def test_solvers_on_device(make: Callable[[], AbstractLinearSolver], device: torch.device) -> None:
    A = spd(2, 5).to(device)
    b = torch.randn(2, 5, dtype=DT, device=device)
    solver = make()
    sol = solver.solve(solver.init(MatrixOperator(A, symmetric=True)), b)
    assert sol.solution.device == b.device and (sol.residual_norm < 1e-8).all()
    torch.testing.assert_close(sol.solution, torch.linalg.solve(A, b))
