"""Small problems and comparisons shared by the influence tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def small_classifier(n: int = 120, batch_size: int = 50) -> tuple[nn.Module, Tensor, Tensor, DataLoader]:
    """A tanh MLP 5 -> 8 -> 3 (p = 75) in float64 with n random points of 3 classes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=batch_size)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two tensors' entries."""
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def relative(got: Tensor, expected: Tensor) -> float:
    """Largest absolute error relative to the largest expected magnitude."""
    return float((got - expected).abs().max() / expected.abs().max())
