"""Kubernetes API access for the operator and the runner: one client per configuration, and the few
calls they make on InfluenceJobs and DaskJobs (missing objects and lost races are not errors)."""

from __future__ import annotations

import os
import threading
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from kinfluence.job.crd import PLURAL
from kinfluence.job.spec import API_GROUP, API_VERSION
from kinfluence.operator.manifests import DASK_GROUP, DASK_VERSION

_lock = threading.Lock()
_clients: dict[str, kubernetes.client.ApiClient] = {}


def api_client() -> kubernetes.client.ApiClient:
    """In-cluster configuration inside a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not os.environ.get("KUBECONFIG")
    key = "in-cluster" if in_cluster else os.environ.get("KUBECONFIG", "~/.kube/config")
    with _lock:
        if key not in _clients:
            config = kubernetes.client.Configuration()
            if in_cluster:
                kubernetes.config.load_incluster_config(client_configuration=config)
            else:
                kubernetes.config.load_kube_config(config_file=os.path.expanduser(key.split(os.pathsep)[0]),
                                                   client_configuration=config)
            _clients[key] = kubernetes.client.ApiClient(config)
        return _clients[key]


def custom_objects() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def get_influencejob(namespace: str, name: str) -> dict[str, Any]:
    """The InfluenceJob as a plain dict."""
    return custom_objects().get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)


def patch_influencejob(namespace: str, name: str, patch: dict[str, Any]) -> None:
    """Merge-patch the InfluenceJob (metadata/spec; the API server ignores status here)."""
    custom_objects().patch_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name, patch)


def patch_influencejob_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    """Merge-patch the InfluenceJob's status subresource."""
    custom_objects().patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status})


def delete_influencejob(namespace: str, name: str) -> None:
    try:
        custom_objects().delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status != 404:
            raise


def list_daskjobs(namespace: str, label_selector: str) -> list[dict[str, Any]]:
    """DaskJobs of one namespace matching a label selector."""
    result = custom_objects().list_namespaced_custom_object(
        DASK_GROUP, DASK_VERSION, namespace, "daskjobs", label_selector=label_selector)
    return list(result.get("items") or [])


def create_daskjob(namespace: str, body: dict[str, Any]) -> bool:
    """Create a DaskJob; False when one of that name exists already (a retried or concurrent create)."""
    try:
        custom_objects().create_namespaced_custom_object(DASK_GROUP, DASK_VERSION, namespace, "daskjobs", body)
    except ApiException as err:
        if err.status == 409:
            return False
        raise
    return True


def delete_daskjob(namespace: str, name: str) -> None:
    """Delete a DaskJob and, in the background, everything it owns; a missing one is fine."""
    try:
        custom_objects().delete_namespaced_custom_object(
            DASK_GROUP, DASK_VERSION, namespace, "daskjobs", name,
            body=kubernetes.client.V1DeleteOptions(propagation_policy="Background"))
    except ApiException as err:
        if err.status != 404:
            raise
