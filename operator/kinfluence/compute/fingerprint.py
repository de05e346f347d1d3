"""Content fingerprints recorded in the output store, so a resumed run can prove it computes
the same thing as the run that started the store."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np
import torch

from ..influence.base import InfluenceFunctionModel
from ..influence.functional import trainable_parameters


def jsonable(value: Any) -> Any:
    """A JSON-compatible copy of nested options (tuples to lists, unknown objects to str)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def model_fingerprint(model: InfluenceFunctionModel) -> str:
    """sha256 of the method, its options and the trainable parameters' names, shapes and values."""
    h = hashlib.sha256()
    h.update(json.dumps(jsonable(model.parameters_summary()), sort_keys=True).encode())
    for name, tensor in trainable_parameters(model.model).items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.to(torch.float32)
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def chunk_digest(chunk: np.ndarray) -> str:
    """sha256 of one array chunk's shape, dtype and bytes."""
    a = np.ascontiguousarray(chunk)
    h = hashlib.sha256(f"{a.shape}:{a.dtype.str}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def combine_digests(digests: Iterable[str]) -> str:
    """One fingerprint from the ordered chunk digests of an array."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
    return "sha256:" + h.hexdigest()
