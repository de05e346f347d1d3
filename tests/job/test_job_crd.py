"""The generated CRD: checked in and current, structural, valid for Kubernetes, and agreeing
with the pydantic model on which documents are valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kinfluence.job import SpecError, parse_job
from kinfluence.job.crd import CRD_NAME, crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / f"{CRD_NAME}.yaml"
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def structural_violations(node: dict[str, Any], path: str = "", in_junctor: bool = False) -> Iterator[str]:
    """Kubernetes' structural-schema rules (apiextensions v1), checked node by node."""
    if "$ref" in node or "$defs" in node or "definitions" in node:
        yield f"{path}: $ref/$defs are not allowed"
    if in_junctor:
        for key in ("description", "type", "default", "additionalProperties", "nullable"):
            if key in node:
                yield f"{path}: {key} inside a logical junctor"
    elif not node.get("x-kubernetes-int-or-string") and not node.get("x-kubernetes-preserve-unknown-fields"):
        if "type" not in node:
            yield f"{path}: no type"
    if "properties" in node and "additionalProperties" in node:
        yield f"{path}: properties and additionalProperties together"
    for key in JUNCTORS:
        branches = node.get(key)
        if branches is None:
            continue
        if node.get("x-kubernetes-int-or-string") and key == "anyOf":
            if branches != [{"type": "integer"}, {"type": "string"}]:
                yield f"{path}: int-or-string anyOf must be [integer, string]"
            continue
        for i, b in enumerate(branches if isinstance(branches, list) else [branches]):
            for field in b.get("properties", {}):
                if field not in node.get("properties", {}):
                    yield f"{path}.{key}[{i}].{field}: not also specified outside the junctor"
            yield from structural_violations(b, f"{path}.{key}[{i}]", True)
    for name, sub in node.get("properties", {}).items():
        yield from structural_violations(sub, f"{path}.{name}", in_junctor)
    if isinstance(node.get("items"), dict):
        yield from structural_violations(node["items"], f"{path}[]", in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        yield from structural_violations(node["additionalProperties"], f"{path}{{}}", in_junctor)


def test_checked_in_crd_is_current() -> None:
    assert CRD_FILE.exists(), f"{CRD_FILE} is missing: run `kinfluence crd > {CRD_FILE.relative_to(ROOT)}`"
    assert CRD_FILE.read_text() == crd_yaml(), (
        f"{CRD_FILE.relative_to(ROOT)} is out of date: run `kinfluence crd > {CRD_FILE.relative_to(ROOT)}`"
    )


def test_schema_is_structural() -> None:
    assert list(structural_violations(schema())) == []
    meta = schema()["properties"]["metadata"]
    assert meta == {"type": "object"}


def test_the_checker_catches_non_structural_schemas() -> None:
    bad = {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}, "b": {"$ref": "#/x"}}}
    found = list(structural_violations(bad))
    assert any(".a: no type" in v for v in found) and any("type inside a logical junctor" in v for v in found)
    assert any("$ref" in v for v in found)


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(crd(), "1.32", strict=True)


def test_crd_names_columns_and_status() -> None:
    spec = crd()["spec"]
    assert (spec["group"], spec["names"]["plural"], spec["names"]["kind"]) == ("kinfluence.dev", "influencejobs", "InfluenceJob")
    assert "ij" in spec["names"]["shortNames"] and "kinfluence" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Progress"] == ".status.progress.percentage"
    assert columns["Age"] == ".metadata.creationTimestamp"
    status = schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    for field in ("phase", "conditions", "progress", "output", "clusterName", "dashboardURL", "startTime",
                  "completionTime", "attempts", "observedGeneration"):
        assert field in status["properties"], field
    assert set(status["properties"]["progress"]["properties"]) >= {
        "completedBlocks", "totalBlocks", "percentage", "estimatedRemainingSeconds", "lastUpdateTime"}


def test_descriptions_for_kubectl_explain() -> None:
    spec = schema()["properties"]["spec"]
    assert spec["description"]
    for name, field in spec["properties"].items():
        assert field.get("description"), name
    method = spec["properties"]["method"]["properties"]
    assert "(cg only)" in method["useBlockCg"]["description"] and "Default: false." in method["useBlockCg"]["description"]


# ------------------------------------------------------------------ CRD vs pydantic agreement


def example_jobs() -> list[Path]:
    return sorted(ROOT.glob("examples/**/job*.yaml"))


def validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 follows draft 4/5 semantics (boolean exclusiveMinimum)
    return jsonschema.Draft4Validator(schema())


@pytest.mark.parametrize("path", example_jobs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_example_jobs_are_valid_for_the_crd_and_the_model(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    validator().validate(doc)
    parse_job(doc)


def test_there_is_an_example_job() -> None:
    assert example_jobs()


BASE = yaml.safe_load((ROOT / "examples/digits/job.yaml").read_text())


def with_spec(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(changes)
    return doc


VALID = [
    with_spec(method={"name": "cg", "rtol": 1e-6, "useBlockCg": True, "preconditioner": "nystroem", "preconditionerRank": 3}),
    with_spec(method={"name": "lissa", "maxiter": 10, "dampen": 0.5, "regularization": {"0": 0.1, "2": 0.2}}),
    with_spec(method={"name": "arnoldi", "rank": 3, "blocks": "layer_wise", "secondOrder": "gauss_newton"}),
    with_spec(method={"name": "nystroem", "rank": 3, "seed": 2}),
    with_spec(method={"name": "ekfac", "updateDiagonal": False, "blocks": {"a": ["0.weight"]}}),
    with_spec(workers={"cpu": "500m", "memory": "4Gi", "gpus": 1, "tolerations": [{"operator": "Exists"}]}),
    with_spec(output={"url": "gs://b/o.zarr", "topK": 3, "onExisting": "overwrite", "storageOptions": {"token": "anon"}}),
]
INVALID = [
    with_spec(method={"name": "newton"}),
    with_spec(method={"name": "cg", "rank": 3}),
    with_spec(method={"name": "direct", "maxiter": 3}),
    with_spec(method={"rtol": 1e-3}),
    with_spec(chunks={"train": 0}),
    with_spec(workers={"cpu": "lots"}),
    with_spec(output={"url": "o.zarr", "onExisting": "append"}),
    with_spec(mode="sideways"),
    with_spec(loss="hinge"),
]


@pytest.mark.parametrize("doc", VALID, ids=range(len(VALID)))
def test_crd_accepts_what_the_model_accepts(doc: dict[str, Any]) -> None:
    parse_job(doc)
    validator().validate(doc)


@pytest.mark.parametrize("doc", INVALID, ids=range(len(INVALID)))
def test_crd_refuses_what_the_model_refuses(doc: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        parse_job(doc)
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(doc)
