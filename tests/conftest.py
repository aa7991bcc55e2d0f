from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autohybrid.testing import TINY_INPUT, TinyNet  # noqa: F401 - the tests' tiny model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared not found ({p}): real CIFAR-10 data and checkpoints are absent")
    return p


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()

