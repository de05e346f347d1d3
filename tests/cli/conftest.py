"""Fixtures of the CLI tests: the `kinfluence` console script runs as a subprocess on the small
jobs of tests/job (jobproblem, jobmodels), which this puts on sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "job"))

from clitools import Finished, kinfluence  # noqa: E402
from jobproblem import make_problem  # noqa: E402


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A completed run of the small job (12 test x 40 train points, 15 blocks). Its data group
    also holds arrays that do not fit it (for the bad-input tests): y_short, x_wide."""
    root = tmp_path_factory.mktemp("finished")
    problem = make_problem(root)
    group = zarr.open_group(problem.data_url, mode="a")
    group.create_array("y_short", data=problem.y_train[:-1], chunks=(16,))
    group.create_array("x_wide", data=np.zeros((len(problem.x_test), 5)), chunks=(16, 5))
    job = problem.write_job(root / "job.yaml")
    run = kinfluence("run", str(job), "--workers", "1", cwd=root).check()
    return Finished(problem, job, run, problem.doc["spec"]["output"]["url"])
