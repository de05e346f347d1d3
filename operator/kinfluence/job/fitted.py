"""The fitted state of an influence method, persisted next to the output store
(`<output>.fitted.pt`) so a rerun of the same job skips the fit.

The file holds {"fingerprint", "state"}; it is reused only when the fingerprint (model
weights, loss, training data, method options) matches, and it is read with
torch.load(weights_only=True) like every other file kinfluence reads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any, Mapping, Optional

import fsspec
import torch

from .spec import InfluenceJobSpec

logger = logging.getLogger(__name__)
SUFFIX = ".fitted.pt"


def fitted_state_url(output_url: str) -> str:
    """Where the fitted state of the job writing `output_url` lives."""
    return output_url.rstrip("/") + SUFFIX


def fit_fingerprint(spec: InfluenceJobSpec, model_fp: str) -> str:
    """sha256 of what the fit depends on: model weights, loss, training data, method, train chunks."""
    c = spec.computation()
    what = {"model": model_fp, "loss": c["loss"], "train": c["data"]["train"], "method": c["method"],
            "trainChunk": c["chunks"]["train"], "dtype": c["model"]["dtype"]}
    return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def load_fitted(url: str, storage_options: Mapping[str, Any], fingerprint: str) -> Optional[dict[str, Any]]:
    """The saved state if it exists and was fitted for `fingerprint`; None otherwise (a missing,
    unreadable or foreign file just means: fit again)."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        saved = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # a torn write from a killed run: refit
        logger.warning("ignoring unreadable fitted state %s (%s); fitting again", url, err)
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    return saved["state"]


def save_fitted(url: str, storage_options: Mapping[str, Any], fingerprint: str, state: Mapping[str, Any]) -> None:
    """Write the fitted state (one object write; a torn local write is detected on load)."""
    buf = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "state": dict(state)}, buf)
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, buf.getvalue())


def remove_fitted(url: str, storage_options: Mapping[str, Any]) -> None:
    """Delete a saved fitted state (onExisting: overwrite starts over completely)."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options))
    if fs.exists(path):
        fs.rm(path)
