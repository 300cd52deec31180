"""Shared pytest configuration: hypothesis profiles, devices, seeding."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA = torch.cuda.is_available()

# Without CUDA, Triton kernels (structift/chain/_fused.py) are tested through Triton's CPU
# interpreter. Triton reads this once, when it is first imported, so it is set here, first.
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not CUDA, reason="CUDA is not available"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Run the test on every available device (CUDA skipped cleanly without one)."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed every test so failures reproduce."""
    torch.manual_seed(0)
