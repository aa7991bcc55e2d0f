from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"../shared not found ({p}): real CIFAR-10 data and checkpoints are absent")
    return p


class TinyNet(nn.Module):
    """One layer of every kind the tool handles, at a 12x12 input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True)
        self.pw = nn.Conv2d(12, 16, 1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False)
        self.conv5 = nn.Conv2d(16, 24, (5, 3), stride=(2, 1), padding=(2, 1))
        self.tok = nn.Linear(24, 36)
        self.head = nn.Linear(36, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x))
        x = self.grouped(self.dw(self.pw(x)))
        x = self.conv5(x)  # (B, 24, 3, 6)
        x = self.tok(x.flatten(2).transpose(1, 2))  # (B, 18 tokens, 36)
        return self.head(x.mean(1))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


TINY_INPUT = (3, 12, 12)
