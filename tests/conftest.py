"""Shared pytest configuration: hypothesis profiles, devices, seeding."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.seeding import SEED_OFFSET, node_seed

# `ci` is derandomized (the same examples on every machine) at the default offset; under a seed
# offset (STRUCTIFT_TEST_SEED, see tests/seeding.py) it draws new examples from that seed.
settings.register_profile(
    "ci",
    derandomize=SEED_OFFSET == 0,
    database=None,
    deadline=None,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# `dev` (`make test-deep`): random examples, ten times the CI budget of every property
# (tests/seeding.py: `examples` scales the budgets that tests set themselves).
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA = torch.cuda.is_available()

# Without CUDA, Triton kernels (structures/chain/_fused.py) are tested through Triton's CPU
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


def pytest_configure(config: pytest.Config) -> None:
    if SEED_OFFSET:
        # Hypothesis draws from the offset too (its own `--hypothesis-seed` option).
        from hypothesis import core

        core.global_force_seed = SEED_OFFSET  # type: ignore[attr-defined]


def pytest_report_header() -> str:
    return f"structift test seed offset: {SEED_OFFSET} (STRUCTIFT_TEST_SEED)"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print how many hypothesis examples ran in total (the figure `make test-deep` reports).

    Reads the per-test statistics the hypothesis plugin attaches to each report (they travel
    back from pytest-xdist workers too) and sums the passing test cases of every phase.
    """
    properties, passing = 0, 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = getattr(report, "__dict__", {}).get("_hypothesis_stats")
            if stats:
                properties += 1
                passing += sum(int(n) for n in re.findall(r"- (\d+) passing", stats))
    if properties:
        profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
        terminalreporter.write_line(
            f"hypothesis ({profile} profile, seed offset {SEED_OFFSET}): {passing} passing "
            f"examples over {properties} property tests"
        )


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    """Seed the global generator per test (stable id hash plus the suite's offset)."""
    torch.manual_seed(node_seed(request.node.nodeid))


@pytest.fixture(autouse=True)
def _validation_default() -> None:
    """Start every test with torch's distribution validation on (its default).

    The first ``torch.compile`` in a process turns it off for the whole process (dynamo's
    patch of ``torch.distributions``); a test that compiles must not change later tests.
    """
    torch.distributions.Distribution.set_default_validate_args(True)


@pytest.fixture
def use_chain_backend() -> Iterator[Callable[[object], None]]:
    """``use_chain_backend("scaled")``: chains built from then on in the test use that backend.

    The imperative form of ``structift.structures.chain.use_backend`` (each call enters one
    more block; all are left at teardown, innermost first).
    """
    from structift.structures.chain import use_backend

    with contextlib.ExitStack() as stack:
        yield lambda backend: stack.enter_context(use_backend(backend))  # type: ignore[arg-type]
