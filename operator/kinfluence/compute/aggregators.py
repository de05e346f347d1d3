"""Aggregators: what the sequential calculator does with each influence block as it is
computed. Blocks may arrive in any order; each aggregator keeps only what its result needs.

Write your own by subclassing BlockAggregator (start / add / result).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from .topk import TopK, block_top_k, merge_top_k


@dataclass(frozen=True)
class InfluenceBlock:
    """One computed block: influences of train rows `train_slice` on test rows `test_slice`;
    data has shape (n_test_chunk, n_train_chunk[, *features])."""

    test_index: int
    train_index: int
    test_slice: slice
    train_slice: slice
    data: Tensor


class BlockAggregator(ABC):
    """Consumes influence blocks of an n_test x n_train grid, in any order."""

    @abstractmethod
    def start(self, n_test: int, n_train: int) -> None:
        """Called once before the first block, with the full grid's size."""

    @abstractmethod
    def add(self, block: InfluenceBlock) -> None:
        """Called once per block."""

    @abstractmethod
    def result(self) -> Any:
        """The aggregate, after all blocks were added."""


class ChunkAggregator(ABC):
    """Consumes row chunks of an n-row result (e.g. influence factors), in any order."""

    @abstractmethod
    def start(self, n_rows: int) -> None: ...

    @abstractmethod
    def add(self, index: int, rows: slice, data: Tensor) -> None: ...

    @abstractmethod
    def result(self) -> Any: ...


class TorchCatAggregator(ChunkAggregator):
    """Concatenates row chunks into one tensor (n, ...)."""

    def start(self, n_rows: int) -> None:
        self._n = n_rows
        self._parts: dict[int, tuple[slice, Tensor]] = {}

    def add(self, index: int, rows: slice, data: Tensor) -> None:
        self._parts[index] = (rows, data)

    def result(self) -> Tensor:
        parts = [self._parts[i] for i in sorted(self._parts)]
        if not parts:
            raise ValueError("TorchCatAggregator: received no chunks")
        out = torch.cat([t for _, t in parts], 0)
        if len(out) != self._n:
            raise ValueError(f"TorchCatAggregator: received {len(out)} rows of {self._n}")
        return out


class NestedTorchCatAggregator(BlockAggregator):
    """Assembles all blocks into the full influence tensor (n_test, n_train[, *features])."""

    def start(self, n_test: int, n_train: int) -> None:
        self._shape = (n_test, n_train)
        self._out: Optional[Tensor] = None
        self._seen = 0

    def add(self, block: InfluenceBlock) -> None:
        if self._out is None:
            self._out = torch.empty(*self._shape, *block.data.shape[2:], dtype=block.data.dtype, device=block.data.device)
        self._out[block.test_slice, block.train_slice] = block.data
        self._seen += block.data.shape[0] * block.data.shape[1]

    def result(self) -> Tensor:
        if self._out is None or self._seen != self._shape[0] * self._shape[1]:
            raise ValueError("NestedTorchCatAggregator: not every block of the grid was added")
        return self._out


class _RowReduction(BlockAggregator):
    """Per test point, a reduction over training points (and feature dims)."""

    largest: bool

    def start(self, n_test: int, n_train: int) -> None:
        self._rows: dict[int, tuple[slice, Tensor]] = {}
        self._n_test = n_test

    def add(self, block: InfluenceBlock) -> None:
        flat = block.data.reshape(block.data.shape[0], -1)
        value = flat.max(1).values if self.largest else flat.min(1).values
        key = block.test_slice.start
        if key in self._rows:
            old = self._rows[key][1]
            value = torch.maximum(old, value) if self.largest else torch.minimum(old, value)
        self._rows[key] = (block.test_slice, value)

    def result(self) -> Tensor:
        parts = [self._rows[k][1] for k in sorted(self._rows)]
        out = torch.cat(parts) if parts else torch.empty(0)
        if len(out) != self._n_test:
            raise ValueError(f"{type(self).__name__}: received blocks for {len(out)} of {self._n_test} test points")
        return out


class MaxAggregator(_RowReduction):
    """Per test point, the largest influence over all training points: shape (n_test,)."""

    largest = True


class MinAggregator(_RowReduction):
    """Per test point, the smallest influence over all training points: shape (n_test,)."""

    largest = False


class TopKAggregator(BlockAggregator):
    """Per test point, the k most helpful and most harmful training points (a TopK), streamed:
    holds n_test x k candidates, never the full matrix. Up-weighting mode only."""

    def __init__(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        self.k = k

    def start(self, n_test: int, n_train: int) -> None:
        self._n_test = n_test
        self._rows: dict[int, tuple[slice, TopK]] = {}

    def add(self, block: InfluenceBlock) -> None:
        if block.data.dim() != 2:
            raise ValueError(
                f"TopKAggregator: needs up-weighting blocks (test, train), got shape {tuple(block.data.shape)} "
                "(perturbation mode has feature dimensions)"
            )
        part = block_top_k(block.data, block.train_slice.start, self.k)
        key = block.test_slice.start
        if key in self._rows:
            part = merge_top_k([self._rows[key][1], part], self.k)
        self._rows[key] = (block.test_slice, part)

    def result(self) -> TopK:
        parts = [self._rows[k][1] for k in sorted(self._rows)]
        if sum(len(p.helpful_values) for p in parts) != self._n_test:
            raise ValueError("TopKAggregator: not every test chunk received blocks")
        return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in
                      ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values")))


class ValuesAggregator(BlockAggregator):
    """A data value per training point: the mean (or sum) of its influence over all test
    points, shape (n_train[, *features])."""

    def __init__(self, reduction: Literal["mean", "sum"] = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def start(self, n_test: int, n_train: int) -> None:
        self._n_test, self._n_train = n_test, n_train
        self._sum: Optional[Tensor] = None
        self._seen = 0

    def add(self, block: InfluenceBlock) -> None:
        if self._sum is None:
            self._sum = torch.zeros(self._n_train, *block.data.shape[2:], dtype=block.data.dtype, device=block.data.device)
        self._sum[block.train_slice] += block.data.sum(0)
        self._seen += block.data.shape[0] * block.data.shape[1]

    def result(self) -> Tensor:
        if self._sum is None or self._seen != self._n_test * self._n_train:
            raise ValueError("ValuesAggregator: not every block of the grid was added")
        return self._sum / self._n_test if self.reduction == "mean" else self._sum
