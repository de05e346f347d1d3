"""Training data as an iterable of torch batches over dask arrays: what `fit` consumes, and what
CG and LiSSA keep for their solves. Picklable; each batch is computed in the calling process
(scheduler='sync'), so it works the same on the client and inside a dask worker task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import dask
import dask.array as da
import numpy as np
import torch
from torch import Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ArrayBatches:
    """(x, y) torch batches, one per chunk of x along the first axis (x and y chunked alike)."""

    x: da.Array
    y: da.Array
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.x.chunks[0] != self.y.chunks[0]:
            raise ValueError(f"x and y: chunks along the first axis differ ({self.x.chunks[0]} and {self.y.chunks[0]})")

    def __len__(self) -> int:
        return len(self.x.chunks[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for k in range(len(self)):
            xb, yb = dask.compute(self.x.blocks[k], self.y.blocks[k], scheduler="sync")
            yield self._tensor(xb), self._tensor(yb)

    def _tensor(self, a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(_DTYPES[self.dtype]) if t.is_floating_point() else t
