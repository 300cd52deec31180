"""The seed's first worked example: the unit circle F(θ, x) = θ² + x² − 1 = 0.

Near any point with x ≠ 0 the circle is locally the graph of a function x(θ), and the implicit
function theorem gives dx/dθ = −(∂F/∂x)⁻¹ ∂F/∂θ = −θ/x without ever writing x(θ) down. At
x = 0 (θ = ±1) ∂F/∂x = 2x is singular: the circle has a vertical tangent, x(θ) is not
differentiable, and structift refuses with a SingularSystemError instead of returning inf/NaN.

Run: ``python examples/unit_circle.py`` (``--smoke`` for a quick check).
"""

from __future__ import annotations

import argparse

import torch

from structift.implicit import SingularSystemError, custom_root


def residual(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """F(θ, x) = θ² + x² − 1, the invariant the solver keeps at zero."""
    return theta**2 + x**2 - 1


@custom_root(residual, batch_ndim=1)
def upper_branch(theta: torch.Tensor) -> torch.Tensor:
    """Find the root x in [0, 1] by bisection (no closed form used).

    Returns the end of the final bracket with the smaller |F|, so at θ = ±1 it returns the
    exact root x = 0 (a solver that only approaches 0 would return, say, x = 1e-18, whose
    IFT derivative −θ/x = −1e18 is correct for that point but numerically meaningless).
    """
    lo, hi = torch.zeros_like(theta), torch.ones_like(theta)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = residual(mid, theta) < 0
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(residual(lo, theta).abs() <= residual(hi, theta).abs(), lo, hi)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Implicit differentiation of the unit circle.")
    parser.add_argument("--smoke", action="store_true", help="fewer points")
    args = parser.parse_args(argv)
    theta = torch.linspace(-0.9, 0.9, 5 if args.smoke else 13, dtype=torch.float64)
    theta.requires_grad_(True)
    x = upper_branch(theta)
    (dx,) = torch.autograd.grad(x.sum(), theta)
    exact = -theta.detach() / x.detach()
    print(f"{'theta':>8s} {'x':>8s} {'IFT dx/dθ':>12s} {'−θ/x':>12s}")
    for t, xi, d, e in zip(theta.tolist(), x.tolist(), dx.tolist(), exact.tolist()):
        print(f"{t:8.3f} {xi:8.4f} {d:12.6f} {e:12.6f}")
    max_err = float((dx - exact).abs().max())
    print(f"max |IFT − closed form| = {max_err:.2e}")
    at_pole = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    try:
        upper_branch(at_pole).sum().backward()
        message = "no error (unexpected)"
    except SingularSystemError as err:
        message = str(err)
    print(f"at θ = 1 (x = 0): SingularSystemError: {message}")
    return {"max_error": max_err, "singular_message": message}


if __name__ == "__main__":
    main()
