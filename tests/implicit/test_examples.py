"""The implicit-differentiation examples run (--smoke) and reach their stated conclusions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unit_circle_example() -> None:
    out = load("unit_circle").main(["--smoke"])
    assert out["max_error"] < 1e-12
    assert "singular" in out["singular_message"]


def test_neumann_softmax_example() -> None:
    out = load("neumann_softmax").main(["--smoke"])
    curves = out["res"]["curves"]
    for name, (errs, rho) in curves.items():
        if name.startswith("full KKT"):
            assert rho > 1  # a saddle point: diverges for every step size
        elif "2.05" in name:
            assert rho > 1  # step size above 2/λmax
        elif name.startswith("reduced"):
            assert rho < 1 and errs[-1] < errs[0]
    assert "diverges" in out["library_message"]
    assert out["library_error"] < 1e-8
