"""Models and losses the job tests name by entrypoint (`jobmodels:build`); importable by the
dask workers because pytest puts this folder on sys.path before the session cluster starts."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_FEATURES, N_HIDDEN, N_CLASSES = 4, 3, 2


def build() -> nn.Module:
    """A tiny MLP 4 -> 3 -> 2 (tanh): 23 parameters, small enough for DirectInfluence."""
    return nn.Sequential(nn.Linear(N_FEATURES, N_HIDDEN), nn.Tanh(), nn.Linear(N_HIDDEN, N_CLASSES))


def slow_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """cross entropy that sleeps KINFLUENCE_TEST_DELAY seconds per call: a job slow enough to
    be killed mid-run."""
    time.sleep(float(os.environ.get("KINFLUENCE_TEST_DELAY", "0.1")))
    return F.cross_entropy(out, y)


def trained_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic state_dict for `build()`."""
    torch.manual_seed(seed)
    return build().state_dict()
