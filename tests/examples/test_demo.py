"""The main job (`make run`) runs and its self-checks pass."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def test_demo_runs_and_its_checks_pass(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("structift_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(smoke=True)
    out = capsys.readouterr().out
    for expected in ("log Z (forward algorithm)", "Viterbi path", "a sample", "entropy"):
        assert expected in out
    assert out.rstrip().endswith("checks passed")
