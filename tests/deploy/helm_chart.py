"""Paths of the deployment files, and the chart rendered by Helm's own engine (helm-python-sdk)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kinfluence"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CRD_NAME = "influencejobs.kinfluence.dev"
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"
CHART_CRD_FILE = CHART / "crds" / f"{CRD_NAME}.yaml"
RBAC_RULES_FILE = CHART / "files" / "rbac-rules.yaml"
RELEASE = "kinf"
NAMESPACE = "kinfluence-system"
# The dask-kubernetes operator's chart, as the dask-kubernetes package ships it.
DASK_OPERATOR_CHART = (
    Path(importlib.util.find_spec("dask_kubernetes").submodule_search_locations[0])  # type: ignore[union-attr,index]
    / "operator" / "deployment" / "helm" / "dask-kubernetes-operator"
)


def package_version() -> str:
    """The package version from pyproject.toml."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def load_yaml(path: Path) -> Any:
    """One YAML document from a file."""
    return yaml.safe_load(path.read_text())


def ci_values(name: str) -> dict[str, Any]:
    """The values of charts/kinfluence/ci/<name>-values.yaml."""
    return load_yaml(CHART / "ci" / f"{name}-values.yaml") or {}


def vendor_chart(destination: Path) -> Path:
    """Copy the chart to `destination` with its dask-kubernetes-operator dependency in charts/.

    What `helm dependency build` does, from the chart that ships inside the installed
    dask-kubernetes package (no network here); chartpress would set its version to the
    package version, so that is done here too.
    """
    chart = destination / "kinfluence"
    shutil.copytree(CHART, chart)
    sub = chart / "charts" / "dask-kubernetes-operator"
    shutil.copytree(DASK_OPERATOR_CHART, sub)
    version = importlib.metadata.version("dask-kubernetes")
    meta = load_yaml(sub / "Chart.yaml")
    meta["version"] = meta["appVersion"] = version
    (sub / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return chart


def render(
    chart_dir: Path, values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """The objects an install of `chart_dir` with `values` would create (templates, not crds/)."""
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def ours(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects of the kinfluence chart itself (not of a subchart)."""
    return [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "kinfluence"]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single object of a kind (fails if there is not exactly one)."""
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


@cache
def rbac_rules() -> dict[str, Any]:
    """files/rbac-rules.yaml: every RBAC rule of the chart (the one place they are listed)."""
    return load_yaml(RBAC_RULES_FILE)


def permits(rules: list[dict[str, Any]], verb: str, api_group: str, resource: str) -> bool:
    """Whether RBAC `rules` allow `verb` on `resource` ("plural" or "plural/subresource") of `api_group`."""
    return any(
        verb in rule["verbs"] and api_group in rule["apiGroups"] and resource in rule["resources"]
        for rule in rules
    )


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) that `rules` allow."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def strict_schema(node: Any, *, root: bool = True) -> Any:
    """A CRD openAPIV3Schema as a JSON schema that rejects unknown fields.

    The API server drops or (kubectl's default strict field validation) rejects fields a
    structural schema does not declare; jsonschema would accept them, so every declared
    object gets `additionalProperties: false` unless it preserves unknown fields.
    `metadata` at the root is ObjectMeta, validated by the server itself.
    """
    if isinstance(node, list):
        return [strict_schema(n, root=False) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v, root=False) for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {
            name: (sub if root and name == "metadata" else strict_schema(sub, root=False))
            for name, sub in node["properties"].items()
        }
        if (
            node.get("type") == "object"
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
    return out


def crd_validator() -> jsonschema.Draft4Validator:
    """A validator of InfluenceJobs by the CRD's schema (OpenAPI 3.0 is draft-4 style: boolean exclusiveMinimum)."""
    (version,) = load_yaml(CRD_FILE)["spec"]["versions"]
    schema = strict_schema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)
