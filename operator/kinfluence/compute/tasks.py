"""The units of work both calculators run, as plain functions of numpy chunks: the expensive
test factors (once per test chunk), the train representation (once per train chunk) and the
block GEMM. Dask runs them on workers; the sequential calculator calls them in-process."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..influence.base import InfluenceFunctionModel
from ..influence.modes import InfluenceMode
from .converters import NumpyConverter
from .shipping import ShippedModel, live_model
from .store import StoreHandle

#: a task's model: live (sequential calculator) or shipped to a dask worker
ModelArg = Union[InfluenceFunctionModel, ShippedModel]


def factors_chunk(model: ModelArg, converter: NumpyConverter, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """F = (H + lambda)^-1 grad l(z_test) for one test chunk: (n_i, q)."""
    return converter.to_numpy(live_model(model).influence_factors(converter.from_numpy(x), converter.from_numpy(y)))


def representation_chunk(
    model: ModelArg, converter: NumpyConverter, x: np.ndarray, y: np.ndarray, mode: InfluenceMode
) -> Tensor:
    """The train side of the GEMM for one train chunk: (n_j, q[, *features])."""
    return live_model(model).train_representation(converter.from_numpy(x), converter.from_numpy(y), mode)


def block_from(
    model: ModelArg, converter: NumpyConverter, factors: np.ndarray, representation: Tensor,
    mode: InfluenceMode,
) -> np.ndarray:
    """The influence block F_i @ R_j^T: (n_i, n_j[, *features])."""
    f = torch.as_tensor(factors).to(representation.device, representation.dtype)
    return converter.to_numpy(live_model(model).influences_from_representations(f, representation, mode))


# ------------------------------------------------------------------------- store-backed units


def store_factors(
    model: ModelArg, converter: NumpyConverter, handle: StoreHandle, i: int, x: np.ndarray, y: np.ndarray
) -> int:
    """Compute test chunk i's factors and keep them in the store; returns q."""
    f = factors_chunk(model, converter, x, y)
    handle.write_factors(i, f)
    return int(f.shape[1])


def store_block(
    model: ModelArg, converter: NumpyConverter, handle: StoreHandle, i: int, j: int,
    representation: Tensor, mode: InfluenceMode, _after: Optional[object] = None,
) -> tuple[int, int]:
    """Compute block (i, j) from the kept factors of test chunk i and write it; `_after` only
    orders this task after the factor task it depends on."""
    block = block_from(model, converter, handle.read_factors(i), representation, mode)
    handle.write_block(i, j, block)
    return i, j
