"""The README's example, step by step: prepare the digits data and model, `kinfluence run` the
example's job file, `kinfluence inspect` the result, read it with xarray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clitools import cli_env, kinfluence

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits"


@pytest.mark.slow
def test_digits_example(tmp_path: Path) -> None:
    for name in ("job.yaml", "digits_model.py"):  # the job file as shipped; its paths are relative to it
        shutil.copy(EXAMPLE / name, tmp_path / name)
    prepared = subprocess.run([sys.executable, str(EXAMPLE / "prepare.py"), "--out", str(tmp_path / "artifacts")],
                              env=cli_env(), capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    assert "test accuracy" in prepared.stdout

    run = kinfluence("run", "job.yaml", "--workers", "2", cwd=tmp_path, timeout=300).check()
    url = tmp_path / "out" / "influences.zarr"
    assert f"output: {url}" in run.stdout and "most helpful" in run.stdout
    assert run.summary() == (6, 0)  # 100 test digits in chunks of 50 x 1,500 training digits in chunks of 500

    inspect = kinfluence("inspect", str(url), "--test-index", "0", "--plot", "influence.png", cwd=tmp_path).check()
    assert "shape    test 100 x train 1500, float32" in inspect.stdout
    assert "blocks   6/6 (100.0%), complete" in inspect.stdout
    assert "test images beside their most helpful and most harmful training images" in inspect.stdout
    assert (tmp_path / "influence.png").read_bytes()[:4] == b"\x89PNG"

    import xarray as xr

    ds = xr.open_zarr(url, consolidated=False)
    assert ds.influences.shape == (100, 1500) and ds["values"].shape == (1500,)
    helpful = ds.top_k_helpful_indices[0].values
    assert list(helpful) == list(np.argsort(-ds.influences[0].values, kind="stable")[:5])
    assert np.allclose(ds["values"].values, ds.influences.values.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert "kinfluence" in ds.attrs
