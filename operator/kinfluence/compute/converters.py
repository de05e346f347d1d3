"""Conversions between numpy chunks (what dask and zarr hold) and torch tensors (what the
influence methods take), and torch datasets as dask arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Union

import dask
import dask.array as da
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


class NumpyConverter(ABC):
    """Turns numpy arrays into the tensors a model takes, and tensors back into numpy."""

    @abstractmethod
    def from_numpy(self, x: np.ndarray) -> Tensor: ...

    @abstractmethod
    def to_numpy(self, x: Tensor) -> np.ndarray: ...


class TorchNumpyConverter(NumpyConverter):
    """numpy <-> torch; floating arrays are cast to `dtype` (None: keep), tensors put on `device`.

    Integer arrays (class labels) keep their integer type.
    """

    def __init__(self, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None) -> None:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype: expected a torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None

    def from_numpy(self, x: np.ndarray) -> Tensor:
        t = torch.as_tensor(np.asarray(x))
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device) if self.device is not None else t

    def to_numpy(self, x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchNumpyConverter(dtype={self.dtype}, device={self.device})"


def _items(dataset: Dataset, start: int, stop: int, index: int, dtype: Any) -> np.ndarray:
    rows = []
    for i in range(start, stop):
        item = dataset[i]
        rows.append(item[index] if isinstance(item, (tuple, list)) else item)
    return np.stack([np.asarray(r.numpy() if isinstance(r, Tensor) else r) for r in rows]).astype(dtype)


def torch_dataset_to_dask_array(
    dataset: Dataset,
    chunk_size: int,
    total_size: Optional[int] = None,
    resulting_dtype: Any = None,
) -> tuple[da.Array, ...]:
    """One dask array per element of the dataset's items (e.g. (x, y)), chunked by `chunk_size`
    rows along the first axis; each chunk reads only its own rows when computed.

    The first item fixes the shapes and dtypes (or `resulting_dtype` for every array).
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    n = total_size if total_size is not None else len(dataset)  # type: ignore[arg-type]
    if n <= 0:
        raise ValueError(f"dataset: is empty (total_size={n})")
    first = dataset[0]
    if not isinstance(first, (tuple, list)):
        first = (first,)
    arrays = []
    for index, element in enumerate(first):
        sample = np.asarray(element.numpy() if isinstance(element, Tensor) else element)
        dtype = np.dtype(resulting_dtype) if resulting_dtype is not None else sample.dtype
        chunks = []
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            part = dask.delayed(_items, pure=True)(dataset, start, stop, index, dtype)
            chunks.append(da.from_delayed(part, shape=(stop - start, *sample.shape), dtype=dtype))
        arrays.append(da.concatenate(chunks, axis=0))
    return tuple(arrays)
