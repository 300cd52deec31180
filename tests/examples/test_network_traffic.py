"""examples/network_traffic.py runs in --smoke mode, its finite-difference checks pass."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "network_traffic.py"


def test_network_traffic_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("structift_network_traffic", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    result = module.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert result["worst"] <= 1e-6
    assert "finite-difference checks passed" in out
    assert "bottleneck links:" in out
    assert "is refused" in out  # ε = 0 is an error, not a silent zero gradient
    for name in ("abilene_sensitivity.png", "abilene_tangent.png", "random_0_sensitivity.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # Bottlenecks are exactly the links with a positive throughput sensitivity.
    net, res = result["nets"][0], result["results"][0]
    assert len(res["bottlenecks"]) == int((res["dT"] > 0.5).sum())
    assert res["dT"].shape == (len(net.edges),)
