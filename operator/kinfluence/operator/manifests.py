"""Pure manifest builders: an InfluenceJob (name, uid, spec) in, the DaskJob of one attempt out.

The DaskJob (kubernetes.dask.org/v1, dask-kubernetes' operator) holds a runner pod running
`kinfluence runner` and a DaskCluster of single-threaded workers. dask-kubernetes names the cluster
after the DaskJob, labels the runner pod and cluster with the DaskJob's labels and sets
DASK_SCHEDULER_ADDRESS in the runner; the builders here only say what differs per job.
"""

from __future__ import annotations

import hashlib
from typing import Any

from dask_kubernetes.constants import MAX_CLUSTER_NAME_LEN
from dask_kubernetes.operator.kubecluster.kubecluster import make_scheduler_spec, make_worker_spec

from kinfluence.job.spec import API_GROUP, API_VERSION, KIND, InfluenceJobSpec

DASK_GROUP = "kubernetes.dask.org"
DASK_VERSION = "v1"
JOB_LABEL = f"{API_GROUP}/job"  # the InfluenceJob's name, on every DaskJob attempt
JOB_UID_LABEL = f"{API_GROUP}/job-uid"  # its uid: tells a re-created job's children apart
ATTEMPT_LABEL = f"{API_GROUP}/attempt"
ENV_JOB_NAME = "KINFLUENCE_JOB_NAME"
ENV_JOB_NAMESPACE = "KINFLUENCE_JOB_NAMESPACE"
ENV_ATTEMPT = "KINFLUENCE_ATTEMPT"
RUNNER_COMMAND = ["kinfluence", "runner"]
WORKER_COMMAND = "dask worker --nthreads 1"
DASHBOARD_PORT = 8787


def daskjob_name(job_name: str, attempt: int) -> str:
    """`<job>-<attempt>`, shortened with a hash so the scheduler Service name fits 63 characters."""
    if attempt < 1:
        raise ValueError(f"attempt: expected a number >= 1, got {attempt}")
    suffix = f"-{attempt}"
    name = f"{job_name}{suffix}"
    if len(name) <= MAX_CLUSTER_NAME_LEN:
        return name
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    head = job_name[: MAX_CLUSTER_NAME_LEN - len(suffix) - len(digest) - 1].rstrip("-.")
    return f"{head}-{digest}{suffix}"


def owner_reference(job_name: str, job_uid: str) -> dict[str, Any]:
    """The controller reference that makes a child belong to (and be deleted with) the InfluenceJob."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job_name,
        "uid": job_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(job_name: str, job_uid: str, attempt: int) -> dict[str, str]:
    """Labels by which the operator finds the DaskJobs of one InfluenceJob (also after a restart)."""
    return {JOB_LABEL: job_name, JOB_UID_LABEL: job_uid, ATTEMPT_LABEL: str(attempt)}


def children_selector(job_name: str, job_uid: str) -> str:
    """Label selector matching every attempt of one InfluenceJob."""
    return f"{JOB_LABEL}={job_name},{JOB_UID_LABEL}={job_uid}"


def worker_resources(spec: InfluenceJobSpec) -> dict[str, Any] | None:
    """Requests = limits for cpu/memory; nvidia.com/gpu as a limit (GPUs cannot be overcommitted)."""
    w = spec.workers
    limits: dict[str, Any] = {}
    if w.cpu is not None:
        limits["cpu"] = w.cpu
    if w.memory is not None:
        limits["memory"] = w.memory
    requests = dict(limits)
    if w.gpus:
        limits["nvidia.com/gpu"] = w.gpus
    if not limits:
        return None
    return {"limits": limits, "requests": requests} if requests else {"limits": limits}


def _env(spec: InfluenceJobSpec) -> list[dict[str, Any]]:
    return [e.model_dump(by_alias=True, exclude_none=True, mode="json") for e in spec.workers.env]


def worker_spec(spec: InfluenceJobSpec, image: str) -> dict[str, Any]:
    """The DaskCluster worker group: replicas of single-threaded `dask worker` pods."""
    out = make_worker_spec(
        image=image,
        n_workers=spec.workers.replicas,
        resources=worker_resources(spec),
        env=_env(spec),
        worker_command=WORKER_COMMAND,
    )
    pod = out["spec"]
    if not pod["containers"][0]["resources"]:
        del pod["containers"][0]["resources"]
    if spec.workers.node_selector:
        pod["nodeSelector"] = dict(spec.workers.node_selector)
    if spec.workers.tolerations:
        pod["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in spec.workers.tolerations]
    return out


def scheduler_spec(cluster_name: str, spec: InfluenceJobSpec, image: str) -> dict[str, Any]:
    """The DaskCluster scheduler: a plain `dask-scheduler` pod and its ClusterIP Service."""
    out = make_scheduler_spec(cluster_name=cluster_name, env=_env(spec), image=image)
    del out["spec"]["containers"][0]["resources"]
    container = out["spec"]["containers"][0]
    container["args"] = ["dask", "scheduler", "--host", "0.0.0.0"]
    return out


def runner_pod_spec(
    job_name: str, namespace: str, attempt: int, spec: InfluenceJobSpec, image: str, service_account: str | None
) -> dict[str, Any]:
    """The pod that runs `kinfluence runner` (dask-kubernetes adds DASK_SCHEDULER_ADDRESS)."""
    env = [
        {"name": ENV_JOB_NAME, "value": job_name},
        {"name": ENV_JOB_NAMESPACE, "value": namespace},
        {"name": ENV_ATTEMPT, "value": str(attempt)},
        *_env(spec),
    ]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # a failed runner fails the attempt; the operator decides on retries
        "containers": [{"name": "runner", "image": image, "command": list(RUNNER_COMMAND), "env": env}],
    }
    if service_account:
        pod["serviceAccountName"] = service_account
    return pod


def build_daskjob(
    *,
    job_name: str,
    namespace: str,
    job_uid: str,
    spec: InfluenceJobSpec,
    attempt: int,
    default_image: str,
    service_account: str | None = None,
) -> dict[str, Any]:
    """The DaskJob of one attempt, owned by the InfluenceJob; its cluster carries the DaskJob's name."""
    name = daskjob_name(job_name, attempt)
    image = spec.workers.image or default_image
    return {
        "apiVersion": f"{DASK_GROUP}/{DASK_VERSION}",
        "kind": "DaskJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": child_labels(job_name, job_uid, attempt),
            "ownerReferences": [owner_reference(job_name, job_uid)],
        },
        "spec": {
            "job": {"spec": runner_pod_spec(job_name, namespace, attempt, spec, image, service_account)},
            "cluster": {"spec": {"worker": worker_spec(spec, image), "scheduler": scheduler_spec(name, spec, image)}},
        },
    }


def dashboard_url(cluster_name: str, namespace: str) -> str:
    """The in-cluster address of the dask dashboard of a cluster."""
    return f"http://{cluster_name}-scheduler.{namespace}.svc.cluster.local:{DASHBOARD_PORT}"
