"""The network of the operator's end-to-end jobs: a 3-feature, 2-class linear classifier.

E2E_MODEL_SLEEP (seconds, default 0) makes every forward pass wait, so a test can act while a
job is still running (kill its runner, restart the operator, delete it)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn


class SlowLinear(nn.Module):
    """nn.Linear(3, 2) whose forward pass optionally sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("E2E_MODEL_SLEEP", "0") or 0)
        if delay:
            time.sleep(delay)
        return self.lin(x)


def build() -> nn.Module:
    return SlowLinear()
