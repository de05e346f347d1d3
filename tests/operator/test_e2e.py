"""End to end: kubectl apply an InfluenceJob on the API emulator; the kinfluence operator (kopf, in
process), the real dask-kubernetes controller and the kubelet stand-in (real dask scheduler, worker
and runner processes) take it to Succeeded, with the output on the GCS emulator equal to a local run.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from local_k8s import DASKJOBS_PATH, NAMESPACE, LocalCluster

from kinfluence.job import parse_spec

HERE = pathlib.Path(__file__).resolve().parent
N_TRAIN, N_TEST = 24, 8


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Weights of the e2e model and a small zarr data set on local disk (every process can read it)."""
    import e2e_model

    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    torch.save(e2e_model.build().state_dict(), folder / "weights.pt")
    rng = np.random.default_rng(0)
    group = zarr.open_group(str(folder / "data.zarr"), mode="w")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = rng.normal(size=(n, 3)).astype(np.float32)
        group.create_array(f"x_{split}", data=x)
        group.create_array(f"y_{split}", data=(x[:, 0] > 0).astype(np.int64))
    return folder


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, gcs_emulator: str) -> Iterator[LocalCluster]:
    """One local cluster for the module's jobs (each test uses its own job name)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KINFLUENCE_RECONCILE_INTERVAL", "1")  # read when the handlers are imported
    workdir = tmp_path_factory.mktemp("cluster")
    # stands in for "the image holds the model's code": the pods' processes can import e2e_model
    c = LocalCluster(workdir, extra_env={"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"})
    try:
        yield c
    finally:
        c.close()
        mp.undo()


def make_job(name: str, inputs: pathlib.Path, gcs: str, sleep: float = 0.0, **spec: Any) -> dict[str, Any]:
    """An InfluenceJob writing gs://kinfluence-e2e/<name>.zarr; workers see the GCS emulator."""
    env = [{"name": "STORAGE_EMULATOR_HOST", "value": gcs},
           {"name": "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "value": "false"},
           {"name": "E2E_MODEL_SLEEP", "value": str(sleep)}]
    body = {
        "model": {"entrypoint": "e2e_model:build", "weights": str(inputs / "weights.pt"), "dtype": "float64"},
        "loss": "cross_entropy",
        "data": {"train": {"url": str(inputs / "data.zarr"), "features": "x_train", "targets": "y_train"},
                 "test": {"url": str(inputs / "data.zarr"), "features": "x_test", "targets": "y_test"}},
        "method": {"name": "direct", "regularization": 0.1},
        "chunks": {"train": 4, "test": 4},
        "output": {"url": f"gs://kinfluence-e2e/{name}.zarr", "topK": 3, "storageOptions": {"token": "anon"}},
        "workers": {"replicas": 1, "env": env},
        "runPolicy": {"backoffLimit": 2},
    }
    body.update(spec)
    return {"apiVersion": "kinfluence.dev/v1alpha1", "kind": "InfluenceJob", "metadata": {"name": name}, "spec": body}


def apply(cluster: LocalCluster, job: dict[str, Any]) -> None:
    out = cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(job))
    assert f"influencejob.kinfluence.dev/{job['metadata']['name']} created" in out


def completed_blocks(url: str) -> int:
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    return len(fs.glob(url.removeprefix("gs://") + "/_completion/block-*.json"))


def local_run(spec: dict[str, Any], output: str) -> zarr.Group:
    """The same spec run on a local dask cluster (what `kinfluence run` does), for comparison."""
    from distributed import Client, LocalCluster as DaskLocalCluster

    from kinfluence.job.runner import run_job

    local = parse_spec(dict(spec, output=dict(spec["output"], url=output)))
    env = {"PYTHONPATH": str(HERE), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "OMP_NUM_THREADS": "1"}
    with DaskLocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          env=env, silence_logs=40) as dask_cluster, Client(dask_cluster) as client:
        run_job(local, client, name="local")
    return open_output(output)


def open_output(url: str) -> zarr.Group:
    return zarr.open_group(url, mode="r", storage_options={"token": "anon"})


def assert_same_results(got: zarr.Group, expected: zarr.Group) -> None:
    names = ["influences", "top_k_helpful_indices", "top_k_helpful_values", "top_k_harmful_indices",
             "top_k_harmful_values"]
    for name in names:
        np.testing.assert_allclose(got[name][...], expected[name][...], rtol=1e-10, atol=1e-12, err_msg=name)
    assert got["influences"].shape == (N_TEST, N_TRAIN)


def children(cluster: LocalCluster, job: str) -> dict[str, list[str]]:
    """Names of everything that belongs to a job's attempts (DaskJobs, clusters, pods, ...)."""
    found = {}
    for kind, path in [("daskjobs", DASKJOBS_PATH),
                       ("daskclusters", f"/apis/kubernetes.dask.org/v1/namespaces/{NAMESPACE}/daskclusters"),
                       ("daskworkergroups", f"/apis/kubernetes.dask.org/v1/namespaces/{NAMESPACE}/daskworkergroups"),
                       ("deployments", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
                       ("services", f"/api/v1/namespaces/{NAMESPACE}/services"),
                       ("pods", f"/api/v1/namespaces/{NAMESPACE}/pods")]:
        found[kind] = [o["metadata"]["name"] for o in cluster.items(path) if o["metadata"]["name"].startswith(job + "-")]
    return found


@pytest.fixture(scope="module")
def bucket(gcs_emulator_process: Any) -> str:
    gcs_emulator_process.create_bucket("kinfluence-e2e")
    return "kinfluence-e2e"


@pytest.mark.slow
def test_apply_runs_to_success_like_a_local_run(cluster: LocalCluster, inputs: pathlib.Path, gcs_emulator: str,
                                                bucket: str) -> None:
    job = make_job("happy", inputs, gcs_emulator)
    apply(cluster, job)
    done = cluster.wait_phase("happy", "Succeeded", timeout=180)
    status = done["status"]
    assert status["progress"]["completedBlocks"] == status["progress"]["totalBlocks"] == 2 * 6
    assert status["progress"]["percentage"] == 100
    assert status["attempts"] == 1 and status["output"] == "gs://kinfluence-e2e/happy.zarr"
    assert status["observedGeneration"] == 1 and status["startTime"] <= status["completionTime"]
    assert status["clusterName"] == "happy-1"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True" and conditions["Complete"]["reason"] == "Completed"
    (daskjob,) = cluster.items(DASKJOBS_PATH + "?labelSelector=kinfluence.dev/job=happy")
    assert daskjob["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
    events = [e["reason"] for e in cluster.items(f"/api/v1/namespaces/{NAMESPACE}/events")
              if e.get("involvedObject", {}).get("name") == "happy"]
    assert {"AttemptCreated", "Running", "Completed"} <= set(events)
    table = cluster.kubectl("get", "influencejobs", "happy").splitlines()
    assert table[0].split()[:3] == ["NAME", "PHASE", "PROGRESS"] and table[1].split()[:3] == ["happy", "Succeeded", "100"]
    assert_same_results(open_output(status["output"]), local_run(job["spec"], "gs://kinfluence-e2e/happy-local.zarr"))

    cluster.kubectl("delete", "influencejob", "happy")
    cluster.wait_for("the job and its children to go", lambda: cluster.job("happy") is None
                     and not any(children(cluster, "happy").values()), timeout=60)


def test_invalid_spec_fails_validation(cluster: LocalCluster, inputs: pathlib.Path, gcs_emulator: str) -> None:
    # nothing to write: the CRD schema cannot express this cross-field rule; the spec model can
    job = make_job("invalid", inputs, gcs_emulator)
    job["spec"]["output"] = {"url": "gs://kinfluence-e2e/invalid.zarr", "matrix": False}
    apply(cluster, job)
    failed = cluster.wait_phase("invalid", "Failed", timeout=60)
    (cond,) = [c for c in failed["status"]["conditions"] if c["status"] == "True"]
    assert cond["reason"] == "ValidationFailed" and "spec.output" in cond["message"], cond
    assert "nothing to write" in cond["message"]
    time.sleep(2)  # a few reconcile rounds later: still no attempt
    assert children(cluster, "invalid")["daskjobs"] == []
    warnings = [e for e in cluster.items(f"/api/v1/namespaces/{NAMESPACE}/events")
                if e.get("involvedObject", {}).get("name") == "invalid" and e["reason"] == "ValidationFailed"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"


@pytest.mark.slow
def test_killed_runner_is_retried_and_resumes(cluster: LocalCluster, inputs: pathlib.Path, gcs_emulator: str,
                                              bucket: str) -> None:
    job = make_job("killed", inputs, gcs_emulator, sleep=0.4)
    apply(cluster, job)
    url = job["spec"]["output"]["url"]
    cluster.wait_for("2 finished blocks", lambda: completed_blocks(url) >= 2, timeout=180)
    killed = cluster.kubelet.kill_runner()
    assert killed == "killed-1-runner"
    done = cluster.wait_phase("killed", "Succeeded", timeout=180)
    assert done["status"]["attempts"] == 2
    assert [j["metadata"]["name"] for j in cluster.items(DASKJOBS_PATH + "?labelSelector=kinfluence.dev/job=killed")] \
        == ["killed-2"]
    log = (cluster.workdir / "pods-killed-2-runner.log").read_text()
    resumed = int(log.split(" resumed")[0].rsplit(" ", 1)[-1])
    assert resumed >= 2, log[-2000:]
    reasons = [e["reason"] for e in cluster.items(f"/api/v1/namespaces/{NAMESPACE}/events")
               if e.get("involvedObject", {}).get("name") == "killed"]
    assert "AttemptFailed" in reasons
    assert_same_results(open_output(url), open_output("gs://kinfluence-e2e/happy-local.zarr")
                        if _exists("gs://kinfluence-e2e/happy-local.zarr")
                        else local_run(job["spec"], "gs://kinfluence-e2e/killed-local.zarr"))


def _exists(url: str) -> bool:
    import gcsfs

    return bool(gcsfs.GCSFileSystem(token="anon").exists(url.removeprefix("gs://") + "/zarr.json"))


@pytest.mark.slow
def test_operator_restart_mid_job_keeps_one_daskjob(cluster: LocalCluster, inputs: pathlib.Path,
                                                    gcs_emulator: str, bucket: str) -> None:
    job = make_job("restart", inputs, gcs_emulator, sleep=0.3)
    apply(cluster, job)
    cluster.wait_phase("restart", "Running", timeout=180)
    cluster.stop_operator()
    time.sleep(2)
    cluster.start_operator()
    done = cluster.wait_phase("restart", "Succeeded", timeout=180)
    assert done["status"]["attempts"] == 1
    assert children(cluster, "restart")["daskjobs"] == ["restart-1"]
    assert cluster.kubelet.started_runners.count("restart-1-runner") == 1


@pytest.mark.slow
def test_deleting_a_running_job_removes_everything(cluster: LocalCluster, inputs: pathlib.Path,
                                                   gcs_emulator: str, bucket: str) -> None:
    job = make_job("doomed", inputs, gcs_emulator, sleep=0.5)
    apply(cluster, job)
    cluster.wait_phase("doomed", "Running", timeout=180)
    assert all(children(cluster, "doomed")[k] for k in ("daskjobs", "daskclusters", "deployments", "pods"))
    cluster.kubectl("delete", "influencejob", "doomed", "--wait=false")
    cluster.wait_for("no children of the deleted job", lambda: cluster.job("doomed") is None
                     and not any(children(cluster, "doomed").values()), timeout=60)
    cluster.wait_for("its processes to stop", lambda: not [c for c in cluster.kubelet.containers.values()
                                                          if c.name.startswith("doomed-")], timeout=30)
