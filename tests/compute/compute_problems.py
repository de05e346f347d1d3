"""Small, deterministic fitted influence problems shared by the compute tests (and the
subprocess a kill test runs): built only from torch's own modules and losses, so dask
workers unpickle them without importing test code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence import CgInfluence, DirectInfluence, InfluenceFunctionModel

METHODS = ("direct", "cg")


@dataclass
class Problem:
    """A fitted method and its data (float64), with an in-memory reference influence matrix."""

    model: InfluenceFunctionModel
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor

    def loaders(self, test_batch: int, train_batch: int) -> tuple[DataLoader, DataLoader]:
        return (DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=test_batch),
                DataLoader(TensorDataset(self.x, self.y), batch_size=train_batch))

    def dask_arrays(self, test_chunk: int, train_chunk: int) -> tuple[da.Array, ...]:
        xt, yt, x, y = (t.numpy() for t in (self.x_test, self.y_test, self.x, self.y))
        return (da.from_array(xt, chunks=(test_chunk, *xt.shape[1:])), da.from_array(yt, chunks=test_chunk),
                da.from_array(x, chunks=(train_chunk, *x.shape[1:])), da.from_array(y, chunks=train_chunk))

    def reference(self, mode: str = "up") -> np.ndarray:
        """The in-memory influences() of all test points on all training points."""
        return self.model.influences(self.x_test, self.y_test, self.x, self.y, mode=mode).numpy()


def make_problem(method: str = "direct", n_train: int = 40, n_test: int = 11, seed: int = 0, **options: Any) -> Problem:
    """A 3-feature, 2-class tanh MLP (38 parameters) fitted on n_train points."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(n_train + n_test, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n_train + n_test,), generator=g)
    loss = nn.functional.cross_entropy
    if method == "direct":
        model: InfluenceFunctionModel = DirectInfluence(net, loss, regularization=0.1, **options)
    elif method == "cg":
        model = CgInfluence(net, loss, regularization=0.1, rtol=1e-12, atol=1e-14, **options)
    else:
        raise ValueError(f"method: {method!r}")
    model.fit(DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=16))
    return Problem(model, x[:n_train], y[:n_train], x[n_train:], y[n_train:])
