"""The runner on a real LocalCluster (2 single-threaded worker processes): results equal
DirectInfluence computed here directly; reruns resume and reuse the fit; a store of another
job is refused; progress is reported; a gs:// output equals a local one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobproblem import Problem, make_problem
from kinfluence.compute import open_influence_store
from kinfluence.job import OutputConflictError, ProgressReporter, ProgressSnapshot, parse_job
from kinfluence.job.fitted import fitted_state_url
from kinfluence.job.runner import run_job


class Recorder(ProgressReporter):
    """Keeps everything the runner reports."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.snapshots: list[ProgressSnapshot] = []
        self.finished: list[tuple[bool, str]] = []

    def stage(self, snapshot: ProgressSnapshot, detail: str = "") -> None:
        self.stages.append(snapshot.stage)

    def progress(self, snapshot: ProgressSnapshot) -> None:
        self.snapshots.append(snapshot)

    def finish(self, snapshot: ProgressSnapshot, ok: bool, message: str = "") -> None:
        self.finished.append((ok, message))


@pytest.fixture(scope="module")
def client(dask_client: Any) -> Any:
    """The session cluster; its workers must import the test models (jobmodels)."""
    here = str(Path(__file__).parent)
    if not all(dask_client.run(lambda: importlib.util.find_spec("jobmodels") is not None).values()):
        dask_client.run(lambda: __import__("sys").path.insert(0, here))
    return dask_client


def run(problem: Problem, client: Any, reporter: ProgressReporter | None = None, **spec: Any):  # type: ignore[no-untyped-def]
    job = parse_job(problem.job(**spec))
    return run_job(job.spec, client, reporter, name=job.metadata.name)


def read(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    store = open_influence_store(url, storage_options)
    assert store.is_complete
    out = {"influences": np.asarray(store.influences[...]), "values": np.asarray(store.values[...])}
    out.update({k: np.asarray(v[...]) for k, v in store.top_k.items()})
    return out


def check_against_direct(problem: Problem, result: dict[str, np.ndarray], regularization: float = 0.1) -> None:
    exact = problem.direct(regularization)
    np.testing.assert_allclose(result["influences"], exact, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(result["values"], exact.mean(axis=0), rtol=1e-8, atol=1e-10)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(result["helpful_indices"], order)
    np.testing.assert_allclose(result["helpful_values"], np.take_along_axis(exact, order, 1), rtol=1e-8)
    np.testing.assert_array_equal(result["harmful_indices"], np.argsort(exact, axis=1, kind="stable")[:, :3])


def test_run_equals_direct_influence_and_rerun_resumes(tmp_path: Path, client: Any) -> None:
    problem = make_problem(tmp_path)
    rec = Recorder()
    first = run(problem, client, rec)
    assert (first.total_blocks, first.computed_blocks, first.skipped_blocks, first.fitted) == (15, 15, 0, True)
    check_against_direct(problem, read(first.output))
    assert rec.stages[:3] == ["loading", "fitting", "computing"] and rec.finished[-1][0] is True
    done = [s.completed_blocks for s in rec.snapshots]
    assert done == sorted(done) and done[-1] == 15 and rec.snapshots[-1].percentage == 100.0
    assert rec.snapshots[-1].eta_seconds == 0.0

    fitted = fitted_state_url(first.output)
    assert Path(fitted).exists()
    again = run(problem, client)
    assert (again.computed_blocks, again.skipped_blocks, again.fitted) == (0, 15, False)
    check_against_direct(problem, read(first.output))


def test_a_torn_fitted_state_is_refitted(tmp_path: Path, client: Any) -> None:
    problem = make_problem(tmp_path, n_train=16, n_test=4)
    first = run(problem, client)
    Path(fitted_state_url(first.output)).write_bytes(b"torn write")
    Path(first.output, "_completion", "finalized.json").unlink()
    again = run(problem, client)
    assert again.fitted is True and again.computed_blocks == 0
    check_against_direct(problem, read(first.output))


def test_store_of_a_different_job_is_refused(tmp_path: Path, client: Any) -> None:
    problem = make_problem(tmp_path, n_train=16, n_test=4)
    run(problem, client)
    before = read(problem.doc["spec"]["output"]["url"])
    other = {"name": "direct", "regularization": 0.5}
    with pytest.raises(OutputConflictError) as info:
        run(problem, client, method=other)
    msg = str(info.value)
    assert msg.startswith("spec.output.url:") and "job 'small' wrote it" in msg
    assert "spec.method.regularization" in msg and "onExisting: overwrite" in msg
    np.testing.assert_array_equal(read(problem.doc["spec"]["output"]["url"])["influences"], before["influences"])

    with pytest.raises(OutputConflictError, match="onExisting: fail"):
        run(problem, client, output={"onExisting": "fail"})

    replaced = run(problem, client, method=other, output={"onExisting": "overwrite"})
    assert replaced.fitted is True and replaced.computed_blocks == replaced.total_blocks
    check_against_direct(problem, read(replaced.output), regularization=0.5)


def test_a_folder_that_is_not_a_store_is_not_overwritten(tmp_path: Path, client: Any) -> None:
    problem = make_problem(tmp_path, n_train=16, n_test=4)
    precious = tmp_path / "out.zarr" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("keep me")
    with pytest.raises(OutputConflictError, match="spec.output.url: .* is not a kinfluence store"):
        run(problem, client)
    assert precious.read_text() == "keep me"


def test_cg_job_matches_direct(tmp_path: Path, client: Any) -> None:
    """CG keeps the training data for its solves: the runner hands it a picklable loader."""
    problem = make_problem(tmp_path, n_train=24, n_test=8)
    result = run(problem, client, method={"name": "cg", "regularization": 0.1, "rtol": 1e-12, "atol": 1e-14, "maxiter": 200})
    exact = problem.direct(0.1)
    np.testing.assert_allclose(read(result.output)["influences"], exact, rtol=1e-6, atol=1e-9)


def test_gcs_output_equals_local(tmp_path: Path, client: Any, gcs_emulator: str, gcs_emulator_process: Any) -> None:
    gcs_emulator_process.create_bucket("kinfluence-job-tests")
    problem = make_problem(tmp_path, n_train=16, n_test=8)
    local = run(problem, client)
    url = f"gs://kinfluence-job-tests/{tmp_path.name}/out.zarr"
    remote = run(problem, client, output={"url": url, "storageOptions": {"token": "anon"}})
    assert remote.output == url and remote.computed_blocks == remote.total_blocks
    a, b = read(local.output), read(url, {"token": "anon"})
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    import gcsfs

    assert gcsfs.GCSFileSystem(token="anon").exists(fitted_state_url(url))
    again = run(problem, client, output={"url": url, "storageOptions": {"token": "anon"}})
    assert (again.computed_blocks, again.fitted) == (0, False)
