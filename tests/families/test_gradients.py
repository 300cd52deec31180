"""gradcheck / gradgradcheck in float64 through the family API (every family, every device)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.distributions import kl_divergence

from tests.families.cases import CASES, Case
from tests.seeding import seeded

cases = pytest.mark.parametrize("case", CASES, ids=repr)


def _split(case: Case, device) -> tuple[list[str], dict, list[torch.Tensor]]:
    params = {k: v.to(device) for k, v in case.fixed().items()}
    names = [k for k, v in params.items() if v.is_floating_point()]
    return names, params, [params[k] for k in names]


def _other(case: Case, device) -> dict:
    """A second parameter set on the same sample space (finite, perturbed)."""
    g = seeded(7)
    out = {}
    for k, v in case.fixed().items():
        if v.is_floating_point():
            v = v.nan_to_num(neginf=-1.0) + 0.5 * torch.randn(v.shape, generator=g).double()
        out[k] = v.to(device)
    return out


def _fn(case: Case, names, params, quantity: Callable) -> Callable:
    def f(*theta: torch.Tensor) -> torch.Tensor:
        return quantity(case.make({**params, **dict(zip(names, theta))}))

    return f


QUANTITIES = {
    "log_partition": lambda d: d.log_partition,
    "entropy": lambda d: d.entropy(),
    "log_prob": lambda d: d.log_prob(d.argmax),
    "marginals": lambda d: tuple(d._mean_params),
}


@cases
@pytest.mark.parametrize("quantity", list(QUANTITIES), ids=str)
def test_gradcheck_and_gradgradcheck(case: Case, quantity: str, device) -> None:
    names, params, theta = _split(case, device)
    f = _fn(case, names, params, QUANTITIES[quantity])
    inputs = tuple(t.clone().requires_grad_() for t in theta)
    assert gradcheck(f, inputs)
    if quantity != "marginals":  # marginals' second derivative is a third derivative of A
        assert gradgradcheck(f, inputs)


@cases
def test_gradcheck_kl_and_cross_entropy_in_both_arguments(case: Case, device) -> None:
    names, params, theta_p = _split(case, device)
    params_q = _other(case, device)
    theta_q = [params_q[k] for k in names]
    n = len(names)

    def kl(*theta: torch.Tensor) -> torch.Tensor:
        p = case.make({**params, **dict(zip(names, theta[:n]))})
        q = case.make({**params_q, **dict(zip(names, theta[n:]))})
        return kl_divergence(p, q)

    def cross(*theta: torch.Tensor) -> torch.Tensor:
        p = case.make({**params, **dict(zip(names, theta[:n]))})
        q = case.make({**params_q, **dict(zip(names, theta[n:]))})
        return p.cross_entropy(q)

    inputs = tuple(t.clone().requires_grad_() for t in (*theta_p, *theta_q))
    assert gradcheck(kl, inputs)
    assert gradgradcheck(kl, inputs)
    assert gradcheck(cross, inputs)


@cases
def test_kl_gradient_in_p_is_minus_hessian_times_difference(case: Case) -> None:
    """d KL(p‖q) / d θ_p = −∇²A(θ_p) (θ_q − θ_p), which torch's generic KL (p detached) drops."""
    names, params, _theta_p = _split(case, "cpu")
    params = {
        k: v.nan_to_num(neginf=-2.0) if v.is_floating_point() else v for k, v in params.items()
    }
    params_q = _other(case, "cpu")
    leaves = [params[k].clone().requires_grad_() for k in names]
    p = case.make({**params, **dict(zip(names, leaves))})
    q = case.make(params_q)
    ours = torch.autograd.grad(kl_divergence(p, q).sum(), leaves)
    # Hessian-vector product of A along v = θ_q − θ_p (natural parameters, held fixed).
    v = [(tq - tp).detach() for tq, tp in zip(q._natural_params, p._natural_params)]
    directional = sum((m * d).sum() for m, d in zip(p._mean_params, v))
    hvp = torch.autograd.grad(directional, leaves)
    assert sum(float(g.abs().sum()) for g in ours) > 1e-3
    for a, h in zip(ours, hvp):
        torch.testing.assert_close(a, -h, rtol=1e-9, atol=1e-9)
