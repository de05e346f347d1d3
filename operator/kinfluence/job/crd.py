"""The InfluenceJob CustomResourceDefinition, generated from the pydantic model.

Pydantic emits JSON Schema 2020-12 ($ref, anyOf with null, const, numeric exclusive
bounds, discriminated unions); Kubernetes wants a *structural* OpenAPI v3.0 schema:
every node typed, no $ref, nothing but `enum`/`required`/`properties` inside
oneOf/anyOf/not. `structural_schema` converts one into the other:

* $ref is inlined; Optional (anyOf [X, null]) becomes X;
* const -> enum; numeric exclusiveMinimum/Maximum -> minimum + exclusiveMinimum: true;
* defaults are not applied by the API server (pydantic applies them) but stated in descriptions;
* fields marked x-kubernetes-preserve-unknown-fields (multi-typed, or free maps) stay untyped;
* the discriminated `method` union becomes ONE object holding every option, `name` an enum,
  and a oneOf whose branches tie each name to the options it allows.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import yaml

from .spec import API_GROUP, API_VERSION, KIND, InfluenceJob

PLURAL = "influencejobs"
CRD_NAME = f"{PLURAL}.{API_GROUP}"
_DROP = {"title", "default", "discriminator", "examples"}


def _resolve(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """Inline $ref (siblings win) and unwrap Optional (anyOf with a null branch)."""
    node = dict(node)
    while "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) < len(node["anyOf"]):
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            if len(branches) == 1:
                return _resolve({**_resolve(branches[0], defs), **rest}, defs)
            node = {**rest, "anyOf": branches}
    return node


def _describe(node: Mapping[str, Any]) -> str | None:
    """The description, with the pydantic default appended (the server does not apply it)."""
    text = node.get("description")
    if "default" in node and node["default"] not in (None, {}, []):
        default = node["default"]
        shown = json.dumps(default) if not isinstance(default, str) else default
        if not isinstance(default, Mapping):
            text = f"{text + ' ' if text else ''}Default: {shown}."
    return text


def structural_schema(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node as a structural OpenAPI v3.0 schema node."""
    node = _resolve(node, defs)
    description = _describe(node)
    head: dict[str, Any] = {"description": description} if description else {}

    if "discriminator" in node and "oneOf" in node:
        return {**head, **_union(node, defs)}
    if node.get("x-kubernetes-int-or-string"):
        out = {**head, "x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
        if "pattern" in node:
            out["pattern"] = node["pattern"]
        return out
    if node.get("x-kubernetes-preserve-unknown-fields") and (
        "anyOf" in node or "properties" not in node
    ):
        out = {**head, "x-kubernetes-preserve-unknown-fields": True}
        if node.get("type") == "object":
            out["type"] = "object"
        return out
    if "anyOf" in node:
        raise ValueError(f"not structural: a field with several types needs x-kubernetes-preserve-unknown-fields: {node}")

    out = dict(head)
    for key, value in node.items():
        if key in _DROP or key == "description":
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {k: structural_schema(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = structural_schema(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, Mapping):
                out["additionalProperties"] = structural_schema(value, defs)
            # False: the API server prunes unknown fields; pydantic refuses them
        elif key == "$defs":
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "properties" in out and "additionalProperties" in out:
        del out["additionalProperties"]
    return _ordered(out)


_FIRST = ("type", "description", "required")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, for a readable YAML file."""
    return {**{k: node[k] for k in _FIRST if k in node}, **{k: v for k, v in node.items() if k not in _FIRST}}


def _union(node: Mapping[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """A discriminated union as one object: all options, the tag an enum, a oneOf tying them."""
    tag = node["discriminator"]["propertyName"]
    variants = [_resolve(v, defs) for v in node["oneOf"]]
    merged: dict[str, dict[str, Any]] = {}
    users: dict[str, list[str]] = {}
    allowed: dict[str, set[str]] = {}
    names = []
    for v in variants:
        name = v["properties"][tag]["const"]
        names.append(name)
        allowed[name] = set(v["properties"])
        for field, sub in v["properties"].items():
            if field == tag:
                continue
            schema = structural_schema(sub, defs)
            users.setdefault(field, []).append(name)
            prior = merged.setdefault(field, schema)
            if {k: x for k, x in prior.items() if k != "description"} != {
                k: x for k, x in schema.items() if k != "description"
            }:
                raise ValueError(f"union option {field!r} has different schemas in different variants")
    descriptions = {v["properties"][tag]["const"]: v.get("description", "") for v in variants}
    properties: dict[str, Any] = {
        tag: {
            "type": "string",
            "enum": names,
            "description": "The method: " + "; ".join(f"{n}: {d.rstrip('.')}" for n, d in descriptions.items()) + ".",
        }
    }
    for field, schema in merged.items():
        if len(users[field]) < len(names):
            per = {}
            for v in variants:
                if field in v["properties"]:
                    per[v["properties"][tag]["const"]] = _describe(_resolve(v["properties"][field], defs)) or ""
            texts = set(per.values())
            text = texts.pop() if len(texts) == 1 else " ".join(f"{n}: {t}" for n, t in per.items())
            schema = {**schema, "description": f"({', '.join(users[field])} only) {text}".strip()}
        properties[field] = schema
    every = set(properties) - {tag}
    branches = []
    for name in names:
        branch: dict[str, Any] = {"properties": {tag: {"enum": [name]}}}
        foreign = sorted(every - allowed[name])
        if foreign:
            branch["not"] = {"anyOf": [{"required": [f]} for f in foreign]}
        branches.append(branch)
    return {"type": "object", "required": [tag], "properties": properties, "oneOf": branches}


def open_api_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the InfluenceJob resource."""
    raw = InfluenceJob.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    props = raw["properties"]
    spec = structural_schema(props["spec"], defs)
    status = structural_schema(props["status"], defs)
    status["x-kubernetes-preserve-unknown-fields"] = True
    return {
        "type": "object",
        "description": "InfluenceJob: an influence-function computation (data attribution) run on a dask "
        "cluster; the result is a zarr store of influences n_test x n_train.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kinfluence.dev/v1alpha1"},
            "kind": {"type": "string", "description": "InfluenceJob"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) of InfluenceJob."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ij", "infl"],
                "categories": ["kinfluence", "all"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Progress",
                            "type": "number",
                            "jsonPath": ".status.progress.percentage",
                            "description": "Percent of output blocks done",
                        },
                        {"name": "Method", "type": "string", "jsonPath": ".spec.method.name", "priority": 1},
                        {"name": "Output", "type": "string", "jsonPath": ".status.output", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `kinfluence crd` from kinfluence.job.spec: do not edit by hand.\n"


def crd_yaml() -> str:
    """The CRD as the YAML document checked in under crds/."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)
