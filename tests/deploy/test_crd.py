"""The InfluenceJob CRD: the chart's copy, its validity, and the example jobs against its schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate.utils as kv
import pytest
import yaml

from helm_chart import CHART, CHART_CRD_FILE, CRD_FILE, REPO, crd_validator, load_yaml, rbac_rules, render

EXAMPLE_JOBS = sorted((REPO / "examples").glob("**/job.yaml"))


def test_chart_crd_is_a_copy_of_the_generated_crd() -> None:
    assert CHART_CRD_FILE.exists(), f"copy {CRD_FILE.relative_to(REPO)} to {CHART_CRD_FILE.relative_to(REPO)}"
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), (
        f"{CHART_CRD_FILE.relative_to(REPO)} is stale: cp {CRD_FILE.relative_to(REPO)} "
        f"{CHART_CRD_FILE.relative_to(REPO)}"
    )


def test_helm_installs_the_crd_from_the_crds_folder_not_as_a_template() -> None:
    """Helm installs crds/ before the templates (and never upgrades or deletes them)."""
    with helm.Chart.load(CHART) as chart:
        (crd,) = chart.crds
    assert crd["filename"] == f"kinfluence/crds/{CHART_CRD_FILE.name}"
    assert yaml.safe_load(crd["data"]) == load_yaml(CRD_FILE)
    assert "CustomResourceDefinition" not in {o["kind"] for o in render(CHART)}


@pytest.mark.parametrize("kube_version", ["1.27", kv.latest_version()])
def test_crd_is_a_valid_custom_resource_definition(kube_version: str) -> None:
    kv.validate(load_yaml(CRD_FILE), kube_version, strict=True)


def test_crd_serves_every_resource_the_rbac_rules_name() -> None:
    crd = load_yaml(CRD_FILE)
    plural = crd["spec"]["names"]["plural"]
    (version,) = crd["spec"]["versions"]
    served = {plural} | ({f"{plural}/status"} if "status" in version.get("subresources", {}) else set())
    # RBAC-only: the owner's finalizers, checked when a child's ownerReference blocks deletion.
    served.add(f"{plural}/finalizers")
    named = {
        resource
        for rules in [*rbac_rules()["operator"].values(), *(rbac_rules()[k] for k in ("runner", "viewer", "editor"))]
        for rule in rules
        if crd["spec"]["group"] in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert named == served


def test_there_are_example_jobs() -> None:
    assert EXAMPLE_JOBS, "no examples/**/job.yaml"


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=lambda p: str(p.relative_to(REPO)))
def test_example_job_satisfies_the_crd_schema(job: Path) -> None:
    errors = sorted(crd_validator().iter_errors(load_yaml(job)), key=str)
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda j: j["spec"]["method"].update(regularisation=0.1), "spec.method"),
        (lambda j: j["spec"].update(workers={"replicas": 0}), "spec.workers.replicas"),
        (lambda j: j["spec"].pop("output"), "spec"),
        (lambda j: j["spec"].update(mode="sideways"), "spec.mode"),
    ],
    ids=["unknown-field", "out-of-range", "missing-required", "bad-enum"],
)
def test_crd_schema_rejects_a_broken_job(change: Any, field: str) -> None:
    """The schema check above is not vacuous: a broken copy of an example fails where it broke."""
    job = load_yaml(EXAMPLE_JOBS[0])
    change(job)
    paths = {".".join(map(str, e.absolute_path)) for e in crd_validator().iter_errors(job)}
    assert field in paths, paths
