"""Models and losses the CLI tests name by entrypoint (`climodels:...`); the `kinfluence`
processes and their dask workers import them through PYTHONPATH."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE_SIDE = 4


def build_image_model() -> nn.Module:
    """A linear classifier of 4x4 images given as 16-vectors: 34 parameters."""
    return nn.Linear(IMAGE_SIDE * IMAGE_SIDE, 2)


def not_a_module() -> list[int]:
    """An entrypoint that returns something other than a torch.nn.Module."""
    return [1, 2, 3]


def slow_per_sample_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy that sleeps KINFLUENCE_TEST_DELAY seconds whenever per-sample gradients are
    traced (a batch of one inside a torch.func transform: once per test or train chunk), so the
    fit stays fast and the blocks are slow enough to interrupt a run between them."""
    if out.shape[0] == 1 and torch._C._functorch.maybe_current_level() is not None:
        time.sleep(float(os.environ.get("KINFLUENCE_TEST_DELAY", "0.3")))
    return F.cross_entropy(out, y)


def per_sample_failing_cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Cross entropy that raises when per-sample gradients are traced: a job that passes every
    check, then fails on the workers."""
    if out.shape[0] == 1 and torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError("per-sample losses are not available")
    return F.cross_entropy(out, y)
