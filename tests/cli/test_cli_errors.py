"""Bad input to `kinfluence run`: exit status 2, one `kinfluence: error: ...` line naming the field
or file, no traceback, and the output store already there left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from clitools import Finished, assert_exact, error_line, kinfluence, snapshot
from kinfluence.job.fitted import fitted_state_url

#: a change of the finished job's spec (given the test's own folder) -> spec fields replaced
Change = Callable[[Finished, Path], dict[str, Any]]


def model(**fields: Any) -> Change:
    return lambda f, tmp: {"model": {**f.problem.doc["spec"]["model"], **fields}}


def data(which: str, **fields: Any) -> Change:
    def change(f: Finished, tmp: Path) -> dict[str, Any]:
        d = f.problem.doc["spec"]["data"]
        return {"data": {**d, which: {**d[which], **fields}}}

    return change


def weights_of_another_model(f: Finished, tmp: Path) -> dict[str, Any]:
    torch.save({"0.weight": torch.zeros(3, 4), "0.extra": torch.zeros(1)}, tmp / "other.pt")
    return model(weights=str(tmp / "other.pt"))(f, tmp)


CASES: dict[str, tuple[Change, list[str]]] = {
    "unknown-method": (lambda f, tmp: {"method": {"name": "influencer"}},
                       ["spec.method.name", "unknown method 'influencer'", "direct, cg"]),
    "option-not-valid-for-method": (lambda f, tmp: {"method": {"name": "direct", "rank": 4}},
                                    ["spec.method.rank", "not an option of method 'direct'", "maxParameters"]),
    "train-chunk-zero": (lambda f, tmp: {"chunks": {"train": 0, "test": 4}}, ["spec.chunks.train", "greater than 0"]),
    "test-chunk-negative": (lambda f, tmp: {"chunks": {"train": 8, "test": -4}}, ["spec.chunks.test", "greater than 0"]),
    "unsupported-url-scheme": (lambda f, tmp: {"output": {"url": "ftps3://bucket/out.zarr"}},
                               ["spec.output.url", "unsupported URL scheme 'ftps3'"]),
    "missing-weights-file": (model(weights="nope.pt"), ["spec.model.weights", "no such file", "nope.pt"]),
    "weights-of-another-model": (weights_of_another_model,
                                 ["spec.model.weights", "other.pt", "does not match the model",
                                  "missing keys ['0.bias', '2.bias', '2.weight']", "unexpected keys ['0.extra']"]),
    "entrypoint-not-importable": (model(entrypoint="no_such_models:build"),
                                  ["spec.model.entrypoint", "cannot import module 'no_such_models'"]),
    "entrypoint-not-a-module": (model(entrypoint="climodels:not_a_module", weights=None),
                                ["spec.model.entrypoint", "climodels:not_a_module()", "not a torch.nn.Module"]),
    "features-and-targets-differ-in-length": (data("train", targets="y_short"),
                                              ["spec.data.train", "'x'", "'y_short'", "different lengths (40 and 39)"]),
    "array-not-in-store": (data("test", features="x_tset"),
                           ["spec.data.test.features", "no array 'x_tset'", "x_test"]),
    "test-features-differ-from-train": (data("test", features="x_wide"),
                                        ["spec.data.test.features", "feature shape (5,) differs", "(4,)"]),
}


@pytest.mark.parametrize("change, names", CASES.values(), ids=CASES.keys())
def test_bad_job(finished: Finished, tmp_path: Path, change: Change, names: list[str]) -> None:
    job = finished.problem.write_job(tmp_path / "job.yaml", **change(finished, tmp_path))  # same output url
    before = snapshot(finished.problem.root)
    result = kinfluence("run", str(job), "--workers", "1", cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"kinfluence: error: {job}: "), line  # the file, then the field
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    assert snapshot(finished.problem.root) == before


@pytest.mark.parametrize(
    "args, names",
    [
        (["run", "missing.yaml"], ["missing.yaml: no such file"]),
        (["run", "JOB", "--workers", "0"], ["--workers", "expected a positive integer, got 0"]),
        (["run", "JOB", "--output", "nope://out.zarr"], ["--output", "unsupported URL scheme 'nope'"]),
        (["launch", "JOB"], ["invalid choice: 'launch'"]),
    ],
    ids=["job-file-missing", "workers-zero", "output-option-scheme", "unknown-command"],
)
def test_bad_command_line(finished: Finished, tmp_path: Path, args: list[str], names: list[str]) -> None:
    before = snapshot(finished.problem.root)
    result = kinfluence(*(str(finished.job) if a == "JOB" else a for a in args), cwd=tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert all(n in line for n in names), line
    assert snapshot(finished.problem.root) == before


def test_store_of_a_different_job_is_refused_unless_overwrite(finished: Finished, tmp_path: Path) -> None:
    """A copy of the finished store, and a job differing in its regularization that writes there:
    refused (naming the field that differs), nothing changed; with onExisting: overwrite the
    store is replaced by the new job's result."""
    problem, url = finished.problem, str(tmp_path / "out.zarr")
    shutil.copytree(finished.output, url)
    shutil.copy(fitted_state_url(finished.output), fitted_state_url(url))
    other = {"name": "direct", "regularization": 0.5}
    job = problem.write_job(tmp_path / "job.yaml", method=other, output={"url": url})
    before = snapshot(tmp_path)
    refused = kinfluence("run", str(job), "--workers", "1", cwd=tmp_path)
    assert refused.returncode == 2
    line = error_line(refused)
    for name in (str(job), "spec.output.url", url, "job 'small' wrote it", "spec.method.regularization",
                 "onExisting: overwrite"):
        assert name in line, f"{name!r} not in {line!r}"
    assert snapshot(tmp_path) == before

    job = problem.write_job(tmp_path / "job.yaml", method=other, output={"url": url, "onExisting": "overwrite"})
    replaced = kinfluence("run", str(job), "--workers", "1", "--preview", "0", cwd=tmp_path).check()
    assert replaced.summary() == (15, 0)
    assert_exact(problem, url, regularization=0.5)


def test_a_job_that_fails_on_the_workers(finished: Finished, tmp_path: Path) -> None:
    """Every check passes, then a task raises on a worker: exit status 1 and one line saying
    what failed, after the progress lines; no traceback (KINFLUENCE_DEBUG=1 would show it)."""
    job = finished.problem.write_job(tmp_path / "job.yaml", loss="climodels:per_sample_failing_cross_entropy",
                                     output={"url": str(tmp_path / "out.zarr")})
    result = kinfluence("run", str(job), "--workers", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Compute Failed" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["kinfluence: error: run failed: RuntimeError: per-sample losses are not available "
                      "(set KINFLUENCE_DEBUG=1 to see the traceback)"], result.stderr
    assert result.stdout == ""
