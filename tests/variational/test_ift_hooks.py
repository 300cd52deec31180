"""The chain's custom_root hooks (closed-form θ-VJP, tree-shaped structured solve) change nothing.

Each test computes the IFT gradient of ``regularized_argmax`` twice in float64: as shipped
(``ChainKKT.theta_cotangent``, ``StructuredChainSolve`` a tree solver), and with both switched off
(custom_root then flattens, and differentiates the residual in θ by autograd).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structift as sf
from structift.implicit import AbstractLinearSolver, AbstractResidual
from structift.structures.chain.regularized import ChainKKT
from structift.variational import StructuredChainSolve, regularized_argmax
from tests.seeding import examples, seeded
from tests.variational.cases import CASE_IDS, CASES, Case, temperatures


def _gradient(case: Case, params: dict, tau: float, linear: str, seed: int) -> list[torch.Tensor]:
    p = {
        k: v.clone().requires_grad_(True) if v.is_floating_point() else v for k, v in params.items()
    }
    dist = case.build(p)
    out = regularized_argmax(dist, tau, linear_solver=linear)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    g = seeded(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum() for o in outs)
    inputs = [v for v in p.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


class _FlatView(AbstractLinearSolver):
    """A solver seen through its [B, N] interface only (custom_root then flattens)."""

    def __init__(self, inner: AbstractLinearSolver) -> None:
        self.inner = inner

    def init(self, operator: Any) -> Any:
        return self.inner.init(operator)

    def solve(self, state: Any, rhs: torch.Tensor) -> Any:
        return self.inner.solve(state, rhs)

    def transpose(self, state: Any) -> Any:
        return self.inner.transpose(state)


def _without_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ChainKKT, "theta_cotangent", AbstractResidual.theta_cotangent)
    tree_solver = ChainKKT.structured_solver
    monkeypatch.setattr(
        ChainKKT, "structured_solver", lambda self, *a: _FlatView(tree_solver(self, *a))
    )


def _compare(case: Case, params: dict, tau: float, linear: str, seed: int) -> None:
    hooked = _gradient(case, params, tau, linear, seed)
    with pytest.MonkeyPatch.context() as mp:
        _without_hooks(mp)
        plain = _gradient(case, params, tau, linear, seed)
    for a, b in zip(hooked, plain):
        assert torch.isfinite(a).all()
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * scale)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("linear", ["structured", "dense"])
@settings(max_examples=examples(8))
@given(data=st.data(), tau=temperatures, seed=st.integers(0, 2**16))
def test_hooks_equal_the_plain_custom_root_path(
    case: Case, linear: str, data: st.DataObject, tau: float, seed: int
) -> None:
    """Random families with −inf entries and padding (partial support) and without."""
    params = {
        k: v.to(torch.float64) if v.is_floating_point() else v
        for k, v in data.draw(case.params).items()
    }
    _compare(case, params, tau, linear, seed)


def test_hooks_on_a_full_support_chain() -> None:
    """Full lengths, finite potentials: the θ-VJP skips the support mask."""
    g = seeded(3)
    B, T, Z = 3, 5, 4
    params = {
        "unary": torch.randn(B, T, Z, dtype=torch.float64, generator=g),
        "binary": torch.randn(B, T - 1, Z, Z, dtype=torch.float64, generator=g),
        "lengths": torch.full((B,), T),
    }
    for linear in ["structured", "dense"]:
        _compare(CASES[1], params, 1.0, linear, 0)


def test_structured_solve_returns_the_tree_layout() -> None:
    """The tree and flat right-hand sides give the same solution; custom_root uses the tree."""
    g = seeded(4)
    unary = torch.randn(2, 4, 3, dtype=torch.float64, generator=g)
    binary = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g)
    lengths = torch.tensor([4, 2])
    seen: list[type] = []
    original = StructuredChainSolve.solve_tree

    def spy(self: StructuredChainSolve, state: Any, rhs: Any) -> Any:
        seen.append(type(rhs))
        sol = original(self, state, rhs)
        flat_rhs = torch.cat([r.reshape(2, -1) for r in rhs], -1)
        flat = self.solve(state, flat_rhs).solution
        tree = torch.cat([x.reshape(2, -1) for x in sol.solution], -1)
        torch.testing.assert_close(tree, flat, rtol=0, atol=0)
        return sol

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StructuredChainSolve, "solve_tree", spy)
        u = unary.clone().requires_grad_(True)
        mu = regularized_argmax(sf.LinearChainCRF(u, binary, lengths), 1.0)
        torch.autograd.grad(mu.unary.sum() + mu.binary.sum(), u)
    assert seen and all(t is not torch.Tensor for t in seen)
