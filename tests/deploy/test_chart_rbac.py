"""The chart's RBAC: least privilege, rendered exactly from files/rbac-rules.yaml."""

from __future__ import annotations

from typing import Any

import pytest

from helm_chart import (
    CHART,
    CI_VALUES,
    NAMESPACE,
    ci_values,
    grants,
    of_kind,
    only,
    permits,
    rbac_rules,
    render,
)

CI_NAMES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")
KNOWN_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
READ_VERBS = {"get", "list", "watch"}


def _component(obj: dict[str, Any]) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def _roles(objects: list[dict[str, Any]], kind: str, component: str) -> list[dict[str, Any]]:
    return [o for o in of_kind(objects, kind) if _component(o) == component]


def _all_rule_lists() -> list[list[dict[str, Any]]]:
    r = rbac_rules()
    return [*r["operator"].values(), r["runner"], r["viewer"], r["editor"]]


def test_rules_file_names_every_verb_and_resource() -> None:
    for rules in _all_rule_lists():
        assert rules, "an empty rule list"
        for rule in rules:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
            for field in ("apiGroups", "resources", "verbs"):
                assert all(isinstance(x, str) and "*" not in x for x in rule[field]), rule
            assert set(rule["verbs"]) <= KNOWN_VERBS, rule


def test_runner_may_only_read_its_jobs_and_patch_their_status() -> None:
    assert grants(rbac_rules()["runner"]) == {
        ("kinfluence.dev", "influencejobs", "get"),
        ("kinfluence.dev", "influencejobs/status", "patch"),
    }


def test_operator_may_not_touch_pods_secrets_or_rbac() -> None:
    operator = [rule for rules in rbac_rules()["operator"].values() for rule in rules]
    groups = {group for group, _, _ in grants(operator)}
    assert groups == {"kinfluence.dev", "kubernetes.dask.org", "", "events.k8s.io", "apiextensions.k8s.io"}
    resources = {resource for _, resource, _ in grants(operator)}
    assert resources.isdisjoint({"pods", "pods/exec", "secrets", "configmaps", "serviceaccounts", "roles"})
    # kopf runs standalone: no KopfPeering objects.
    assert "kopf.dev" not in groups
    # CRDs and namespaces are only observed, never changed.
    assert {v for _, r, v in grants(operator) if r in {"customresourcedefinitions", "namespaces"}} <= READ_VERBS


def test_operator_can_do_what_kopf_and_the_reconciler_need() -> None:
    """The minimum the operator cannot run without (kopf's watch, patch, status; DaskJobs; events)."""
    r = rbac_rules()["operator"]
    needed = [
        (r["namespaced"], "list", "kinfluence.dev", "influencejobs"),
        (r["namespaced"], "watch", "kinfluence.dev", "influencejobs"),
        (r["namespaced"], "patch", "kinfluence.dev", "influencejobs"),
        (r["namespaced"], "patch", "kinfluence.dev", "influencejobs/status"),
        (r["namespaced"], "create", "kubernetes.dask.org", "daskjobs"),
        (r["namespaced"], "delete", "kubernetes.dask.org", "daskjobs"),
        (r["namespaced"], "watch", "kubernetes.dask.org", "daskjobs"),
        (r["namespaced"], "create", "", "events"),
        (r["namespaced"], "create", "events.k8s.io", "events"),
        (r["cluster"], "watch", "apiextensions.k8s.io", "customresourcedefinitions"),
        (r["clusterScope"], "watch", "", "namespaces"),
    ]
    for rules, verb, group, resource in needed:
        assert permits(rules, verb, group, resource), (verb, group, resource)


def test_user_roles_aggregate_into_the_built_in_roles() -> None:
    objects = render(CHART)
    by_name = {o["metadata"]["name"]: o for o in _roles(objects, "ClusterRole", "rbac")}
    assert set(by_name) == {"kinf-kinfluence-viewer", "kinf-kinfluence-editor"}
    viewer, editor = by_name["kinf-kinfluence-viewer"], by_name["kinf-kinfluence-editor"]
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert viewer["rules"] == rbac_rules()["viewer"]
    assert editor["rules"] == rbac_rules()["editor"]
    assert {v for _, _, v in grants(viewer["rules"])} <= READ_VERBS
    # Users create and delete jobs; only the operator and runner write status.
    assert not [r for _, r, _ in grants(editor["rules"]) if r.endswith("/status")]


def test_namespaced_mode_grants_job_access_per_namespace_only() -> None:
    values = ci_values("namespaced")
    namespaces = values["operator"]["jobNamespaces"]
    objects = render(CHART, values)
    rules = rbac_rules()

    roles = _roles(objects, "Role", "operator")
    assert sorted(o["metadata"]["namespace"] for o in roles) == sorted(namespaces)
    for role in roles:
        assert role["rules"] == rules["operator"]["namespaced"]
    cluster_role = only(_roles(objects, "ClusterRole", "operator"), "ClusterRole")
    assert cluster_role["rules"] == rules["operator"]["cluster"]

    sa = only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    bindings = _roles(objects, "RoleBinding", "operator")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(namespaces)
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": roles[0]["metadata"]["name"],
        }
        assert binding["subjects"] == subject
    crb = only(_roles(objects, "ClusterRoleBinding", "operator"), "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert crb["subjects"] == subject


def test_cluster_mode_grants_everything_in_one_cluster_role() -> None:
    objects = render(CHART, ci_values("cluster-wide"))
    rules = rbac_rules()["operator"]
    assert _roles(objects, "Role", "operator") == []
    assert _roles(objects, "RoleBinding", "operator") == []
    cluster_role = only(_roles(objects, "ClusterRole", "operator"), "ClusterRole")
    assert cluster_role["rules"] == rules["namespaced"] + rules["cluster"] + rules["clusterScope"]
    crb = only(_roles(objects, "ClusterRoleBinding", "operator"), "ClusterRoleBinding")
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role["metadata"]["name"],
    }
    sa = only(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_runner_role_is_bound_to_the_runner_service_account_in_each_job_namespace(name: str) -> None:
    values = {} if name == "default" else ci_values(name)
    objects = render(CHART, values)
    namespaces = sorted(values.get("operator", {}).get("jobNamespaces") or [NAMESPACE])
    roles = _roles(objects, "Role", "runner")
    bindings = _roles(objects, "RoleBinding", "runner")
    accounts = _roles(objects, "ServiceAccount", "runner")
    assert sorted(o["metadata"]["namespace"] for o in roles) == namespaces
    assert sorted(o["metadata"]["namespace"] for o in bindings) == namespaces
    for role in roles:
        assert role["rules"] == rbac_rules()["runner"]
    for binding in bindings:
        ns = binding["metadata"]["namespace"]
        (account,) = [a for a in accounts if a["metadata"]["namespace"] == ns]
        assert binding["roleRef"]["name"] == roles[0]["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": ns}]
    # Runners never get cluster-wide rights.
    assert _roles(objects, "ClusterRoleBinding", "runner") == []


@pytest.mark.parametrize("name", ["default", *CI_NAMES])
def test_rendered_rbac_is_exactly_the_rules_file(name: str) -> None:
    """Every rendered rule comes from the rules file and no rendered rule holds a wildcard."""
    objects = render(CHART, {} if name == "default" else ci_values(name))
    allowed = {repr(rule) for rules in _all_rule_lists() for rule in rules}
    rendered = [rule for kind in ("Role", "ClusterRole") for o in of_kind(objects, kind) for rule in o["rules"]]
    assert rendered
    for rule in rendered:
        assert repr(rule) in allowed, rule
        assert "*" not in str(rule), rule
    for binding in of_kind(objects, "RoleBinding") + of_kind(objects, "ClusterRoleBinding"):
        # Bindings point at the chart's own roles, never at built-in ones such as cluster-admin.
        assert binding["roleRef"]["name"] in {o["metadata"]["name"] for o in objects if o["kind"] in RBAC_KINDS}


def test_rbac_can_be_left_to_the_cluster_admin() -> None:
    objects = render(CHART, {"rbac": {"create": False}})
    assert not [o for o in objects if o["kind"] in RBAC_KINDS]
