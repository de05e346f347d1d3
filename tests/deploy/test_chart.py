"""The Helm chart: lint --strict and render with Helm's engine, validate what it renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate.utils as kv
import pytest
from kinfluence.operator import settings

from helm_chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    RELEASE,
    ci_values,
    load_yaml,
    of_kind,
    only,
    ours,
    package_version,
    render,
)

CI_NAMES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema known.
KUBE_VERSIONS = ["1.27", kv.latest_version()]


def test_ci_values_files_cover_the_install_modes() -> None:
    assert set(CI_NAMES) >= {"namespaced", "cluster-wide", "gpus", "custom-image"}


def test_chart_and_app_version_are_the_package_version() -> None:
    meta = load_yaml(CHART / "Chart.yaml")
    assert meta["version"] == package_version()
    assert meta["appVersion"] == package_version()


def test_dask_operator_dependency_is_optional_and_off_by_default(chart_dir: Path) -> None:
    (dep,) = load_yaml(CHART / "Chart.yaml")["dependencies"]
    assert dep["name"] == "dask-kubernetes-operator"
    assert dep["condition"] == "daskOperator.enabled"
    assert load_yaml(CHART / "values.yaml")["daskOperator"] == {"enabled": False}

    default = render(chart_dir)
    assert default == ours(default), "the subchart renders although daskOperator.enabled is false"

    with_dask = render(chart_dir, {"daskOperator": {"enabled": True}})
    images = [
        c["image"] for d in of_kind(with_dask, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert any(i.startswith("ghcr.io/dask/dask-kubernetes-operator:") for i in images), images
    with helm.Chart.load(chart_dir) as chart:
        assert any(c["filename"].endswith("dask-kubernetes-operator/crds/daskjob.yaml") for c in chart.crds)


@pytest.mark.parametrize("name", ["default", *CI_NAMES, "dask-operator"])
def test_lint_strict_passes(chart_dir: Path, name: str) -> None:
    values = {"default": {}, "dask-operator": {"daskOperator": {"enabled": True}}}.get(name)
    report = helm.lint(chart_dir, ci_values(name) if values is None else values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # strict: no warning either (severity 2 = warning, 3 = error); "icon is recommended" is info.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_of_the_checked_in_chart_only_misses_the_optional_subchart() -> None:
    """Without `helm dependency build` the one finding is the absent subchart archive."""
    report = helm.lint(CHART, {}, strict=True, namespace=NAMESPACE)
    assert report["errors"] == ["chart directory is missing these dependencies: dask-kubernetes-operator"]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_rendered_objects_are_valid_kubernetes_objects(chart_dir: Path, name: str, kube_version: str) -> None:
    objects = render(chart_dir, {} if name == "default" else ci_values(name))
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= {o["kind"] for o in objects}
    for obj in objects:
        try:
            kv.validate(obj, kube_version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {list(e.path)}: {e.message}")


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"operator": {"scope": "global"}}, "/operator/scope"),
        ({"operator": {"replicas": 2}}, "'replicas' not allowed"),
        ({"operator": {"healthPort": 0}}, "/operator/healthPort"),
        ({"operator": {"jobNamespaces": ["Not_A_Namespace"]}}, "/operator/jobNamespaces/0"),
        ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
        ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
        ({"securityContext": {"capabilities": {"drop": []}}}, "/securityContext/capabilities/drop"),
        ({"securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, "/securityContext/capabilities/add"),
        ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "/securityContext/seccompProfile/type"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"imagePullPolicy": "Always"}, "'imagePullPolicy' not allowed"),
    ],
)
def test_values_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], complaint: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match=complaint):
            chart.validate_schema(chart.merge_values(values))


def test_ci_values_and_defaults_satisfy_the_schema() -> None:
    with helm.Chart.load(CHART) as chart:
        for name in CI_NAMES:
            chart.validate_schema(chart.merge_values(ci_values(name)))


def _operator(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The operator Deployment and its container."""
    deployment = only(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_operator_deployment_runs_one_kopf_operator_with_liveness() -> None:
    deployment, container = _operator(render(CHART))
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["command"] == ["kinfluence", "operator"]
    assert container["args"] == [
        "--liveness=http://0.0.0.0:8080/healthz",
        f"--namespace={NAMESPACE}",
    ]
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert probe["periodSeconds"] > 0 and probe["failureThreshold"] >= 1
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]


def test_health_port_is_a_value() -> None:
    _, container = _operator(render(CHART, {"operator": {"healthPort": 9443}}))
    assert "--liveness=http://0.0.0.0:9443/healthz" in container["args"]
    assert container["ports"][0]["containerPort"] == 9443


def test_namespaced_mode_watches_each_job_namespace() -> None:
    _, container = _operator(render(CHART, ci_values("namespaced")))
    assert [a for a in container["args"] if a.startswith("--namespace") or a == "--all-namespaces"] == [
        "--namespace=ml-team-a",
        "--namespace=ml-team-b",
    ]


def test_cluster_mode_watches_all_namespaces() -> None:
    _, container = _operator(render(CHART, ci_values("cluster-wide")))
    assert "--all-namespaces" in container["args"]
    assert not [a for a in container["args"] if a.startswith("--namespace")]


@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_operator_pod_is_hardened(name: str) -> None:
    deployment, container = _operator(render(CHART, {} if name == "default" else ci_values(name)))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A writable /tmp on the read-only root filesystem.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
    assert "emptyDir" in tmp
    assert _env(container)["HOME"] == "/tmp"


def test_default_image_is_the_worker_image_at_the_app_version() -> None:
    _, container = _operator(render(CHART))
    image = f"ghcr.io/kinfluence/worker:{package_version()}"
    assert container["image"] == image
    assert _env(container)["KINFLUENCE_DEFAULT_IMAGE"] == image
    assert settings.DEFAULT_IMAGE == image, "the operator's built-in default image differs from the chart's"


@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_operator_reads_the_environment_the_chart_sets(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(CHART, {} if name == "default" else ci_values(name))
    _, container = _operator(objects)
    for var, value in _env(container).items():
        monkeypatch.setenv(var, value)
    config = settings.OperatorConfig.from_env()
    assert config.default_image == _env(container)["KINFLUENCE_DEFAULT_IMAGE"]
    runner_accounts = {o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")
                       if o["metadata"]["labels"]["app.kubernetes.io/component"] == "runner"}
    assert runner_accounts == {config.runner_service_account}


def test_custom_image_by_digest_with_pull_secret() -> None:
    values = ci_values("custom-image")
    deployment, container = _operator(render(CHART, values))
    image = f"{values['image']['repository']}@{values['image']['digest']}"
    assert container["image"] == image
    assert container["imagePullPolicy"] == "Always"
    assert _env(container)["KINFLUENCE_DEFAULT_IMAGE"] == image
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert deployment["metadata"]["name"] == "attribution-operator"
    assert container["args"][-1] == "--verbose"
    assert _env(container)["KINFLUENCE_LOG_FORMAT"] == "json"


def test_gpu_install_sets_the_job_image_and_keeps_the_operator_off_gpu_nodes() -> None:
    values = ci_values("gpus")
    deployment, container = _operator(render(CHART, values))
    assert _env(container)["KINFLUENCE_DEFAULT_IMAGE"] == "ghcr.io/kinfluence/worker:0.1.0-cu128"
    assert container["image"] == f"ghcr.io/kinfluence/worker:{package_version()}"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == values["operator"]["nodeSelector"]
    assert pod["tolerations"] == values["operator"]["tolerations"]
    assert "nvidia.com/gpu" not in str(container["resources"])


@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_runner_service_account_exists_in_every_job_namespace(name: str) -> None:
    values = {} if name == "default" else ci_values(name)
    objects = render(CHART, values)
    _, container = _operator(objects)
    runner_sa = _env(container)["KINFLUENCE_RUNNER_SERVICE_ACCOUNT"]
    job_namespaces = values.get("operator", {}).get("jobNamespaces") or [NAMESPACE]
    runner_sas = {
        (o["metadata"]["namespace"], o["metadata"]["name"])
        for o in of_kind(objects, "ServiceAccount")
        if o["metadata"]["labels"]["app.kubernetes.io/component"] == "runner"
    }
    assert runner_sas == {(ns, runner_sa) for ns in job_namespaces}
    operator_sa = only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert (NAMESPACE, operator_sa) in {
        (o["metadata"]["namespace"], o["metadata"]["name"]) for o in of_kind(objects, "ServiceAccount")
    }


def test_release_name_prefixes_every_object() -> None:
    for obj in render(CHART):
        assert obj["metadata"]["name"].startswith(f"{RELEASE}-kinfluence-")
