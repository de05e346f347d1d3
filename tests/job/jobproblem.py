"""A small influence job on disk (data zarr, weights, job document) and its exact answer,
computed directly with DirectInfluence — what the runner's output must equal."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
import zarr

import jobmodels
from kinfluence.influence import DirectInfluence, InfluenceMode


@dataclass
class Problem:
    """Paths, arrays and the job document of a small job."""

    root: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    weights: Path
    data_url: str
    doc: dict[str, Any]

    def job(self, **spec: Any) -> dict[str, Any]:
        """The job document with spec fields replaced (output fields merged)."""
        doc = copy.deepcopy(self.doc)
        for k, v in spec.items():
            if k == "output":
                doc["spec"]["output"].update(v)
            else:
                doc["spec"][k] = v
        return doc

    def write_job(self, path: Path, **spec: Any) -> Path:
        path.write_text(yaml.safe_dump(self.job(**spec), sort_keys=False))
        return path

    def direct(self, regularization: float = 0.1, mode: str = "up") -> np.ndarray:
        """The exact influences, by DirectInfluence on the whole data in this process."""
        model = jobmodels.build().double()
        model.load_state_dict(torch.load(self.weights, weights_only=True))
        xt = torch.from_numpy(self.x_train)
        yt = torch.from_numpy(self.y_train)
        method = DirectInfluence(model, F.cross_entropy, regularization=regularization).fit([(xt, yt)])
        return method.influences(torch.from_numpy(self.x_test), torch.from_numpy(self.y_test), xt, yt,
                                 mode=InfluenceMode(mode)).numpy()


def make_problem(root: Path, n_train: int = 40, n_test: int = 12, chunks: Optional[dict[str, int]] = None,
                 output: Optional[str] = None, seed: int = 0) -> Problem:
    """Random data, deterministic weights, and a direct-method job writing float64 results."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, jobmodels.N_FEATURES))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=len(x)) > 0).astype(np.int64)
    data_url = str(root / "data.zarr")
    g = zarr.open_group(data_url, mode="w")
    for name, a in (("x", x[:n_train]), ("y", y[:n_train]), ("x_test", x[n_train:]), ("y_test", y[n_train:])):
        g.create_array(name, data=a, chunks=(16,) + a.shape[1:])
    weights = root / "weights.pt"
    torch.save(jobmodels.trained_weights(seed), weights)
    doc = {
        "apiVersion": "kinfluence.dev/v1alpha1",
        "kind": "InfluenceJob",
        "metadata": {"name": "small"},
        "spec": {
            "model": {"entrypoint": "jobmodels:build", "weights": str(weights), "dtype": "float64"},
            "loss": "cross_entropy",
            "data": {"train": {"url": data_url, "features": "x", "targets": "y"},
                     "test": {"url": data_url, "features": "x_test", "targets": "y_test"}},
            "method": {"name": "direct", "regularization": 0.1},
            "chunks": chunks or {"train": 8, "test": 4},
            "output": {"url": output or str(root / "out.zarr"), "topK": 3, "values": "mean"},
        },
    }
    return Problem(root, x[:n_train], y[:n_train], x[n_train:], y[n_train:], weights, data_url, doc)
