"""Manifest builders: spec in, DaskJob out, checked field by field without any server."""

from __future__ import annotations

from typing import Any

import pytest

from kinfluence.job import parse_spec
from kinfluence.operator import manifests

SPEC: dict[str, Any] = {
    "model": {"entrypoint": "pkg.models:build", "weights": "gs://bucket/weights.pt"},
    "loss": "cross_entropy",
    "data": {"train": {"url": "gs://bucket/data.zarr", "features": "x_train", "targets": "y_train"},
             "test": {"url": "gs://bucket/data.zarr", "features": "x_test", "targets": "y_test"}},
    "method": {"name": "cg", "regularization": 0.1},
    "output": {"url": "gs://bucket/out.zarr"},
    "workers": {
        "replicas": 3, "cpu": "2", "memory": "4Gi", "gpus": 1, "image": "example.com/kinfluence:1",
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "env": [{"name": "A", "value": "1"}],
    },
}


def build(spec: dict[str, Any] = SPEC, attempt: int = 1, name: str = "digits") -> dict[str, Any]:
    return manifests.build_daskjob(job_name=name, namespace="team", job_uid="uid-1", spec=parse_spec(spec),
                                   attempt=attempt, default_image="default/image:0", service_account="runner-sa")


def test_daskjob_is_owned_and_labelled() -> None:
    job = build(attempt=2)
    assert (job["apiVersion"], job["kind"]) == ("kubernetes.dask.org/v1", "DaskJob")
    assert job["metadata"]["name"] == "digits-2" and job["metadata"]["namespace"] == "team"
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "kinfluence.dev/v1alpha1", "kind": "InfluenceJob", "name": "digits", "uid": "uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert job["metadata"]["labels"] == {"kinfluence.dev/job": "digits", "kinfluence.dev/job-uid": "uid-1",
                                         "kinfluence.dev/attempt": "2"}
    assert manifests.children_selector("digits", "uid-1") == "kinfluence.dev/job=digits,kinfluence.dev/job-uid=uid-1"


def test_runner_pod_runs_kinfluence_runner_for_its_job() -> None:
    pod = build()["spec"]["job"]["spec"]
    (runner,) = pod["containers"]
    assert runner["command"] == ["kinfluence", "runner"] and runner["image"] == "example.com/kinfluence:1"
    env = {e["name"]: e["value"] for e in runner["env"]}
    assert env == {"KINFLUENCE_JOB_NAME": "digits", "KINFLUENCE_JOB_NAMESPACE": "team", "KINFLUENCE_ATTEMPT": "1", "A": "1"}
    assert "DASK_SCHEDULER_ADDRESS" not in env  # dask-kubernetes sets it, pointing at the job's cluster
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "runner-sa"


def test_workers_are_single_threaded_with_the_specs_resources() -> None:
    worker = build()["spec"]["cluster"]["spec"]["worker"]
    assert worker["replicas"] == 3
    (container,) = worker["spec"]["containers"]
    args = container["args"]
    assert args[:2] == ["dask", "worker"] and args[args.index("--nthreads") + 1] == "1"
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1},
                                      "requests": {"cpu": "2", "memory": "4Gi"}}
    assert container["image"] == "example.com/kinfluence:1"
    assert container["env"] == [{"name": "A", "value": "1"}]
    assert worker["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert worker["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_scheduler_has_no_gpu_and_a_service() -> None:
    scheduler = build()["spec"]["cluster"]["spec"]["scheduler"]
    (container,) = scheduler["spec"]["containers"]
    assert container["args"][:2] == ["dask", "scheduler"] and "resources" not in container
    assert {p["name"] for p in scheduler["service"]["ports"]} == {"tcp-comm", "http-dashboard"}
    assert scheduler["service"]["selector"]["dask.org/cluster-name"] == "digits-1"  # the cluster is named after the DaskJob


def test_defaults_without_worker_options() -> None:
    spec = {k: v for k, v in SPEC.items() if k != "workers"}
    job = build(spec)
    worker = job["spec"]["cluster"]["spec"]["worker"]
    (container,) = worker["spec"]["containers"]
    assert container["image"] == "default/image:0" and "resources" not in container
    assert "nodeSelector" not in worker["spec"] and "tolerations" not in worker["spec"]
    assert worker["replicas"] == 2  # the spec model's default


def test_names_fit_the_scheduler_service_limit() -> None:
    long_name = "a" * 60
    name = manifests.daskjob_name(long_name, 12)
    assert len(name + "-scheduler") <= 63 and name.endswith("-12")
    assert name != manifests.daskjob_name("a" * 59, 12)
    with pytest.raises(ValueError, match="attempt"):
        manifests.daskjob_name("x", 0)
