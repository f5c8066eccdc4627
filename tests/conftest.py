"""Shared test fixtures: device parametrization and seeding.

Every test that touches a tensor takes the `device` fixture (or parametrizes over `DEVICES` itself), so
the same test runs on CPU and, where a GPU is present, on CUDA; without one the CUDA cases skip with a
reason instead of failing. Create tensors with `device=device` and nothing else needs to change.
"""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu", "cuda"]
# The dtypes every native op supports. Half types accumulate in float32 inside the kernels.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def skip_unless_available(device) -> None:
    """pytest.skip for a device this machine does not have."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs on: "cpu", and "cuda" where a GPU is present (skipped otherwise)."""
    skip_unless_available(request.param)
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so a failure reproduces on its own."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch: Dynamo's per-code-object recompile limit (8) counts across tests
    otherwise, and a test that compiles the ninth Bridge would fail for what earlier tests did."""
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """Skips summarized by reason, one line each (pytest's -rs would print a line per skipping test
    location: ~200 lines of 'CUDA is not available' on a machine without a GPU)."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    terminalreporter.section("skipped, by reason")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.line(f"{n:6d}  {reason}")
