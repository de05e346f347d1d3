"""The Kubernetes API emulator behaves like an API server for kubectl and for a plain HTTP client."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import threading
import time
from typing import Any

import pytest
import requests
from k8s_emulator import EmulatorThread, human_age, json_patch, label_selector_matches, merge_patch

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "color": {"type": "string", "enum": ["red", "blue"], "nullable": True},
                    }},
                    "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            }},
        }],
    },
}
WIDGETS = "/apis/example.dev/v1/namespaces/default/widgets"


class Api:
    """A tiny HTTP client for the emulator (what a Kubernetes client library does, unwrapped)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: Any = None, ctype: str = "application/json",
                **params: str) -> requests.Response:
        data = None if body is None else json.dumps(body)
        return requests.request(method, self.url + path, data=data, params=params,
                                headers={"Content-Type": ctype}, timeout=10)

    def create(self, path: str, body: Any) -> dict[str, Any]:
        resp = self.request("POST", path, body)
        assert resp.status_code == 201, resp.text
        return resp.json()


@pytest.fixture
def api(k8s: EmulatorThread) -> Api:
    return Api(k8s.url)


@pytest.fixture
def widgets(api: Api) -> Api:
    api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)
    return api


def test_create_assigns_identity_and_versions(api: Api) -> None:
    a = api.create("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "a"}, "data": {"k": "v"}})
    b = api.create("/api/v1/namespaces/default/configmaps", {"metadata": {"generateName": "b-"}})
    assert a["metadata"]["namespace"] == "default"  # taken from the URL
    assert a["metadata"]["uid"] != b["metadata"]["uid"]
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert a["metadata"]["generation"] == 1 and a["metadata"]["creationTimestamp"].endswith("Z")
    assert b["metadata"]["name"].startswith("b-") and len(b["metadata"]["name"]) == len("b-") + 5
    assert (a["kind"], a["apiVersion"]) == ("ConfigMap", "v1")
    again = api.request("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "a"}})
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"
    missing = api.request("GET", "/api/v1/namespaces/default/configmaps/nope")
    assert missing.status_code == 404 and missing.json()["kind"] == "Status"


def test_patches_and_generation(api: Api) -> None:
    path = "/api/v1/namespaces/default/configmaps"
    obj = api.create(path, {"metadata": {"name": "p", "labels": {"x": "1"}}, "data": {"k": "v"}})
    merged = api.request("PATCH", f"{path}/p", {"metadata": {"labels": {"x": None, "y": "2"}}},
                         "application/merge-patch+json").json()
    assert merged["metadata"]["labels"] == {"y": "2"}
    assert merged["metadata"]["generation"] == 1  # metadata-only change
    assert int(merged["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    ops = [{"op": "test", "path": "/data/k", "value": "v"}, {"op": "replace", "path": "/data/k", "value": "w"}]
    patched = api.request("PATCH", f"{path}/p", ops, "application/json-patch+json")
    assert patched.status_code == 200 and patched.json()["data"] == {"k": "w"}
    assert patched.json()["metadata"]["generation"] == 2
    failed = api.request("PATCH", f"{path}/p", ops, "application/json-patch+json")  # /data/k is "w" now
    assert failed.status_code == 422
    noop = api.request("PATCH", f"{path}/p", {"data": {"k": "w"}}, "application/merge-patch+json").json()
    assert noop["metadata"]["resourceVersion"] == patched.json()["metadata"]["resourceVersion"]
    stale = dict(noop, data={"k": "z"})
    stale["metadata"] = dict(noop["metadata"], resourceVersion="1")
    assert api.request("PUT", f"{path}/p", stale).status_code == 409
    assert api.request("PATCH", f"{path}/p", {}, "application/apply-patch+yaml").status_code == 415


def test_status_subresource_is_separate(widgets: Api) -> None:
    widgets.create(WIDGETS, {"metadata": {"name": "w"}, "spec": {"size": 1}, "status": {"phase": "ignored"}})
    assert "status" not in widgets.request("GET", f"{WIDGETS}/w").json()
    main = widgets.request("PATCH", f"{WIDGETS}/w", {"spec": {"size": 2}, "status": {"phase": "X"}},
                           "application/merge-patch+json").json()
    assert main["spec"]["size"] == 2 and "status" not in main and main["metadata"]["generation"] == 2
    sub = widgets.request("PATCH", f"{WIDGETS}/w/status", {"spec": {"size": 9}, "status": {"phase": "Running"}},
                          "application/merge-patch+json").json()
    assert sub["status"] == {"phase": "Running"} and sub["spec"]["size"] == 2
    assert sub["metadata"]["generation"] == 2


def test_crd_becomes_discoverable_and_validates(widgets: Api) -> None:
    resources = widgets.request("GET", "/apis/example.dev/v1").json()["resources"]
    assert {"widgets", "widgets/status"} <= {r["name"] for r in resources}
    assert any(g["name"] == "example.dev" for g in widgets.request("GET", "/apis").json()["groups"])
    bad = widgets.request("POST", WIDGETS, {"metadata": {"name": "bad"}, "spec": {"size": 0, "color": "green"}})
    assert bad.status_code == 422
    message = bad.json()["message"]
    assert "spec.size" in message and "spec.color" in message
    assert widgets.request("POST", WIDGETS, {"metadata": {"name": "nul"}, "spec": {"size": 1, "color": None}}).status_code == 201
    assert widgets.request("POST", WIDGETS, {"metadata": {"name": "nos"}, "spec": {}}).status_code == 422
    listing = widgets.request("GET", WIDGETS).json()
    assert listing["kind"] == "WidgetList" and [i["metadata"]["name"] for i in listing["items"]] == ["nul"]
    widgets.request("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.dev")
    assert widgets.request("GET", WIDGETS).status_code == 404


def test_lists_filter_by_labels_fields_and_namespace(api: Api) -> None:
    api.create("/api/v1/namespaces", {"metadata": {"name": "other"}})
    for ns, name, labels in [("default", "a", {"app": "x"}), ("default", "b", {"app": "y"}), ("other", "c", {"app": "x"})]:
        api.create(f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": name, "labels": labels}})
    names = lambda resp: sorted(i["metadata"]["name"] for i in resp.json()["items"])  # noqa: E731
    assert names(api.request("GET", "/api/v1/configmaps")) == ["a", "b", "c"]
    assert names(api.request("GET", "/api/v1/namespaces/default/configmaps")) == ["a", "b"]
    assert names(api.request("GET", "/api/v1/configmaps", labelSelector="app=x")) == ["a", "c"]
    assert names(api.request("GET", "/api/v1/configmaps", labelSelector="app in (x,y),app!=y")) == ["a", "c"]
    assert names(api.request("GET", "/api/v1/configmaps", fieldSelector="metadata.namespace=other")) == ["c"]
    assert {"default", "other"} <= set(names(api.request("GET", "/api/v1/namespaces")))
    api.request("DELETE", "/api/v1/namespaces/other")
    assert names(api.request("GET", "/api/v1/configmaps")) == ["a", "b"]


def test_every_event_is_stored(api: Api) -> None:
    for reason in ("One", "Two", "Three"):
        api.create("/api/v1/namespaces/default/events", {"metadata": {"generateName": "ev-"}, "reason": reason})
    assert sorted(e["reason"] for e in api.request("GET", "/api/v1/namespaces/default/events").json()["items"]) == \
        ["One", "Three", "Two"]


def test_finalizers_and_cascading_deletion(widgets: Api) -> None:
    owner = widgets.create(WIDGETS, {"metadata": {"name": "own", "finalizers": ["example.dev/keep"]}, "spec": {"size": 1}})
    ref = {"apiVersion": "example.dev/v1", "kind": "Widget", "name": "own", "uid": owner["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    widgets.create("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    grandchild_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "child",
                      "uid": widgets.request("GET", "/api/v1/namespaces/default/configmaps/child").json()["metadata"]["uid"]}
    widgets.create("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "grandchild", "ownerReferences": [grandchild_ref]}})
    marked = widgets.request("DELETE", f"{WIDGETS}/own").json()
    assert marked["metadata"]["deletionTimestamp"]  # held by its finalizer
    assert widgets.request("GET", "/api/v1/namespaces/default/configmaps/child").status_code == 200
    released = widgets.request("PATCH", f"{WIDGETS}/own", {"metadata": {"finalizers": None}},
                               "application/merge-patch+json")
    assert released.status_code == 200
    assert widgets.request("GET", f"{WIDGETS}/own").status_code == 404
    assert widgets.request("GET", "/api/v1/namespaces/default/configmaps").json()["items"] == []


def test_watch_streams_changes_from_a_resource_version(api: Api) -> None:
    path = "/api/v1/namespaces/default/configmaps"
    first = api.create(path, {"metadata": {"name": "w1"}})
    events: list[dict[str, Any]] = []

    def watch() -> None:
        with requests.get(api.url + path, params={"watch": "true", "timeoutSeconds": "3",
                                                  "resourceVersion": first["metadata"]["resourceVersion"]},
                          stream=True, timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("application/json")
            events.extend(json.loads(line) for line in resp.iter_lines() if line)

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.5)
    api.request("PATCH", f"{path}/w1", {"data": {"a": "b"}}, "application/merge-patch+json")
    api.create(path, {"metadata": {"name": "w2"}})
    api.request("DELETE", f"{path}/w1")
    thread.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == \
        [("MODIFIED", "w1"), ("ADDED", "w2"), ("DELETED", "w1")]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3


def test_kubectl_apply_get_watch_delete(widgets: Api, kubectl: Any, kubeconfig: pathlib.Path) -> None:
    manifest = "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: k1}\nspec: {size: 3}\n"
    assert "widget.example.dev/k1 created" in kubectl("apply", "--validate=false", "-f", "-", stdin=manifest).stdout
    widgets.request("PATCH", f"{WIDGETS}/k1/status", {"status": {"phase": "Running"}}, "application/merge-patch+json")
    table = kubectl("get", "widgets").stdout.split("\n")
    assert table[0].split() == ["NAME", "PHASE", "AGE"] and table[1].split()[:2] == ["k1", "Running"]
    got = json.loads(kubectl("get", "wd", "k1", "-o", "json").stdout)
    assert got["spec"] == {"size": 3}
    changed = manifest.replace("size: 3", "size: 4")
    assert "configured" in kubectl("apply", "--validate=false", "-f", "-", stdin=changed).stdout
    assert json.loads(kubectl("get", "widget", "k1", "-o", "json").stdout)["metadata"]["generation"] == 2
    rejected = kubectl("apply", "--validate=false", "-f", "-", stdin=manifest.replace("size: 3", "size: 0"), check=False)
    assert rejected.returncode != 0 and "spec.size" in rejected.stderr
    watcher = subprocess.Popen(["kubectl", f"--kubeconfig={kubeconfig}", "get", "widgets",
                                "-w", "-o", "name", "--request-timeout=6s"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert 'widget.example.dev "k1" deleted' in kubectl("delete", "widget", "k1").stdout
    kubectl("apply", "--validate=false", "-f", "-", stdin=manifest.replace("k1", "k2"))
    out, _ = watcher.communicate(timeout=20)
    assert "widget.example.dev/k2" in out.split()
    assert "No resources found" in kubectl("get", "widgets", "--field-selector=metadata.name=k1").stderr


def test_pure_helpers() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {"a": {"c": 2}, "l": [2]}
    doc = {"a": [1, 2], "m": {"k": "v"}}
    assert json_patch(doc, [{"op": "add", "path": "/a/-", "value": 3}, {"op": "remove", "path": "/m/k"},
                            {"op": "move", "from": "/a/0", "path": "/m/first"}]) == {"a": [2, 3], "m": {"first": 1}}
    assert doc == {"a": [1, 2], "m": {"k": "v"}}  # the input is not modified
    assert label_selector_matches("a=1,!b,c notin (x)", {"a": "1"})
    assert not label_selector_matches("a", {"b": "1"})
    now = datetime.datetime(2026, 1, 1, 0, 3, 5, tzinfo=datetime.UTC)
    assert human_age("2026-01-01T00:00:00Z", now=now) == "3m"
    assert human_age("2026-01-01T00:02:00Z", now=now) == "65s"
