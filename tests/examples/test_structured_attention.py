"""Smoke test of examples/structured_attention.py and checks of its data generator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.seeding import seeded

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "structured_attention.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("structured_attention_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_generator_makes_the_task_it_describes(example):
    cfg = example.TaskConfig()
    batch = example.make_batch(4000, cfg, seeded(0))
    T = cfg.max_length
    pos = torch.arange(T)
    valid = pos < batch.lengths[:, None]
    assert ((batch.lengths >= cfg.min_length) & (batch.lengths <= cfg.max_length)).all()
    # the span is one contiguous run of an allowed length inside the sequence
    span_len = batch.span.sum(1)
    assert set(span_len.tolist()) <= set(cfg.span_lengths)
    assert (batch.span <= valid).all()
    starts = (batch.span[:, 1:] & ~batch.span[:, :-1]).sum(1) + batch.span[:, 0]
    assert (starts == 1).all()
    # the answer is the majority bit over the span, recomputed independently
    for b in range(50):
        bits = [int(batch.bit[b, t]) for t in range(T) if batch.span[b, t]]
        assert int(batch.answer[b]) == int(sum(bits) > len(bits) / 2)
    # padding is zero; colour statistics follow the noise settings (loose bounds)
    assert (batch.colour[~valid] == 0).all() and (batch.bit[~valid] == 0).all()
    match = batch.colour == batch.query[:, None]
    inside = match[batch.span].float().mean().item()
    outside = match[valid & ~batch.span].float().mean().item()
    assert abs(inside - (1 - cfg.inside_noise)) < 0.03
    assert abs(outside - cfg.distractors) < 0.02
    assert 0.45 < batch.answer.float().mean().item() < 0.55


def test_smoke_run_writes_table_heatmap_and_results(example, tmp_path, capsys):
    results = example.main(["--smoke", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(results) == {"softmax", "sparsemax", "structured", "sparsemap"}
    for kind, metrics in results.items():
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert f"| {kind} |" in out
    assert results["softmax"]["mean_total_weight"] == pytest.approx(1.0, abs=1e-5)
    assert results["sparsemax"]["mean_total_weight"] == pytest.approx(1.0, abs=1e-5)
    png = tmp_path / "attention_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["structured"]["accuracy"] == pytest.approx(results["structured"]["accuracy"])
    assert len(saved["structured"]["runs"][0]["pairwise"]) == 2
    assert saved["structured"]["runs"][0]["gradient"] == "autograd"
    assert 0.0 <= saved["hand_set_reference"]["accuracy"] <= 1.0
    assert "hand-set potentials" in out


def test_smoke_run_with_ift_gradient_and_two_seeds(example, tmp_path):
    # the default run uses gradient="autograd"; this one covers the IFT backward
    args = ["--smoke", "--kinds", "structured", "--gradient", "ift", "--seeds", "0", "1"]
    results = example.main([*args, "--out", str(tmp_path)])
    runs = results["structured"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(r["gradient"] == "ift" for r in runs)
    assert results["structured"]["accuracy_min"] <= results["structured"]["accuracy"]
    assert results["structured"]["accuracy"] <= results["structured"]["accuracy_max"]
