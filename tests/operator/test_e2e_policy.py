"""End to end, the run policy and the spec rules of an InfluenceJob: suspend/resume, activeDeadlineSeconds,
ttlSecondsAfterFinished and rejected edits of computation-defining fields, with the real kopf operator,
the real dask-kubernetes controller and the kubelet stand-in (see test_e2e.py and local_k8s.py)."""

# ruff: noqa: F811  (the fixtures imported from test_e2e are test parameters of the same name)

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import pytest
import zarr
from local_k8s import NAMESPACE, LocalCluster

# the module-scoped fixtures (this module gets its own cluster) and helpers of the basic e2e tests
from test_e2e import (  # noqa: F401
    _exists,
    apply,
    assert_same_results,
    bucket,
    children,
    cluster,
    completed_blocks,
    inputs,
    local_run,
    make_job,
    open_output,
)

EXPECTED_URLS = ("gs://kinfluence-e2e/happy-local.zarr", "gs://kinfluence-e2e/policy-local.zarr")


def expected(spec: dict[str, Any]) -> zarr.Group:
    """The local run of the e2e spec (all jobs here compute the same thing): test_e2e's, if it ran, else ours."""
    for url in EXPECTED_URLS:
        if _exists(url):
            return open_output(url)
    return local_run(spec, EXPECTED_URLS[-1])


def patch_spec(cluster: LocalCluster, name: str, spec: dict[str, Any]) -> None:
    out = cluster.kubectl("patch", "influencejob", name, "--type", "merge", "-p", json.dumps({"spec": spec}))
    assert f"influencejob.kinfluence.dev/{name} patched" in out, out


def events(cluster: LocalCluster, name: str) -> list[dict[str, Any]]:
    """The Events about one job, oldest first (by resourceVersion: the list comes in name order)."""
    return sorted((e for e in cluster.items(f"/api/v1/namespaces/{NAMESPACE}/events")
                   if e.get("involvedObject", {}).get("name") == name),
                  key=lambda e: int(e["metadata"]["resourceVersion"]))


def condition(job: dict[str, Any], ctype: str) -> dict[str, Any]:
    (cond,) = [c for c in job["status"]["conditions"] if c["type"] == ctype]
    return cond


def processes(cluster: LocalCluster, name: str) -> list[str]:
    """The kubelet's live containers (local processes) of a job's pods and deployments."""
    with cluster.kubelet._lock:  # the kubelet thread mutates the dict
        return [c.name for c in cluster.kubelet.containers.values() if c.name.startswith(name + "-")]


def nothing_left(cluster: LocalCluster, name: str) -> bool:
    """No DaskJob, cluster, deployment, service or pod of the job, and none of its processes."""
    return not any(children(cluster, name).values()) and not processes(cluster, name)


def runner_resumed(cluster: LocalCluster, pod: str) -> int:
    """The `N resumed` count the runner prints when it is done."""
    log = (cluster.workdir / f"pods-{pod}.log").read_text()
    assert "blocks computed" in log, log[-2000:]
    return int(log.split(" resumed")[0].rsplit(" ", 1)[-1])


@pytest.mark.slow
def test_suspend_removes_the_cluster_and_resume_continues(cluster: LocalCluster, inputs: pathlib.Path,
                                                          gcs_emulator: str, bucket: str) -> None:
    job = make_job("suspend", inputs, gcs_emulator, sleep=0.4)
    url = job["spec"]["output"]["url"]
    apply(cluster, job)
    cluster.wait_for("2 finished blocks", lambda: completed_blocks(url) >= 2, timeout=180)
    cluster.wait_phase("suspend", "Running", timeout=30)

    patch_spec(cluster, "suspend", {"runPolicy": {"suspend": True}})
    suspended = cluster.wait_phase("suspend", "Suspended", timeout=60)
    cond = condition(suspended, "Suspended")
    assert (cond["status"], cond["reason"]) == ("True", "Suspended") and "resume" in cond["message"], cond
    assert condition(suspended, "Running")["status"] == "False"
    assert "clusterName" not in suspended["status"] and suspended["status"]["attempts"] == 1
    cluster.wait_for("the suspended job's DaskJob, cluster, pods and processes to go",
                     lambda: nothing_left(cluster, "suspend"), timeout=60)
    kept = completed_blocks(url)
    assert 2 <= kept < 12, kept
    time.sleep(2)  # two reconcile rounds (interval 1 s) later: still suspended, nothing restarted
    assert cluster.job("suspend")["status"]["phase"] == "Suspended"
    assert nothing_left(cluster, "suspend") and completed_blocks(url) == kept
    assert [e["type"] for e in events(cluster, "suspend") if e["reason"] == "Suspended"] == ["Normal"]

    patch_spec(cluster, "suspend", {"runPolicy": {"suspend": False}})
    done = cluster.wait_phase("suspend", "Succeeded", timeout=180)
    status = done["status"]
    assert status["attempts"] == 2 and status["clusterName"] == "suspend-2"
    assert status["progress"]["completedBlocks"] == status["progress"]["totalBlocks"] == 12
    assert status["startTime"] >= suspended["status"]["startTime"]  # the resume restarted the deadline clock
    assert children(cluster, "suspend")["daskjobs"] == ["suspend-2"]
    assert cluster.kubelet.started_runners.count("suspend-1-runner") == 1
    assert cluster.kubelet.started_runners.count("suspend-2-runner") == 1
    assert runner_resumed(cluster, "suspend-2-runner") == kept  # the completed blocks were not recomputed
    reasons = [e["reason"] for e in events(cluster, "suspend")]
    assert reasons.index("Suspended") < reasons.index("Resumed") < reasons.index("Completed"), reasons
    assert "AttemptFailed" not in reasons
    assert_same_results(open_output(url), expected(job["spec"]))


@pytest.mark.slow
def test_active_deadline_fails_the_job_and_removes_its_cluster(cluster: LocalCluster, inputs: pathlib.Path,
                                                               gcs_emulator: str, bucket: str) -> None:
    # 2 s per forward pass: far from done when the deadline passes
    job = make_job("deadline", inputs, gcs_emulator, sleep=2.0, runPolicy={"activeDeadlineSeconds": 12})
    apply(cluster, job)
    cluster.wait_for("the first DaskJob", lambda: children(cluster, "deadline")["daskjobs"], timeout=60)
    failed = cluster.wait_phase("deadline", "Failed", timeout=120)
    status = failed["status"]
    cond = condition(failed, "Failed")
    assert (cond["status"], cond["reason"]) == ("True", "DeadlineExceeded"), cond
    assert "activeDeadlineSeconds=12" in cond["message"]
    assert condition(failed, "Complete")["status"] == "False" and condition(failed, "Running")["status"] == "False"
    assert status["attempts"] == 1 and status["startTime"] <= status["completionTime"]
    cluster.wait_for("the DaskJob, its cluster, pods and processes to go", lambda: nothing_left(cluster, "deadline"),
                     timeout=60)
    assert completed_blocks(job["spec"]["output"]["url"]) < 12
    time.sleep(2)  # two reconcile rounds later: still Failed, no new attempt
    assert cluster.job("deadline")["status"]["phase"] == "Failed" and nothing_left(cluster, "deadline")
    warnings = [e for e in events(cluster, "deadline") if e["reason"] == "DeadlineExceeded"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "activeDeadlineSeconds=12" in warnings[0]["message"]


@pytest.mark.slow
def test_ttl_after_finished_deletes_the_job_and_keeps_the_output(cluster: LocalCluster, inputs: pathlib.Path,
                                                                 gcs_emulator: str, bucket: str) -> None:
    # 3 s: long enough to see Succeeded (completionTime has whole seconds), short enough not to wait long
    job = make_job("ttl", inputs, gcs_emulator, runPolicy={"ttlSecondsAfterFinished": 3})
    apply(cluster, job)
    seen: list[str] = []

    def gone() -> bool:
        found = cluster.job("ttl")  # one GET per round while it exists: the Succeeded window is short
        if found is not None:
            seen.append((found.get("status") or {}).get("phase") or "")
            return False
        return nothing_left(cluster, "ttl")

    cluster.wait_for("the finished job and its children to be deleted", gone, timeout=180)
    assert "Succeeded" in seen and "Failed" not in seen, sorted(set(seen))
    reasons = [e["reason"] for e in events(cluster, "ttl")]
    assert "Completed" in reasons, reasons  # the Event outlives the job, as in Kubernetes
    assert completed_blocks(job["spec"]["output"]["url"]) == 12  # the output stays
    assert_same_results(open_output(job["spec"]["output"]["url"]), expected(job["spec"]))


@pytest.mark.slow
def test_editing_a_computation_field_is_rejected_and_the_job_continues(cluster: LocalCluster, inputs: pathlib.Path,
                                                                       gcs_emulator: str, bucket: str) -> None:
    job = make_job("immutable", inputs, gcs_emulator, sleep=0.1)
    url = job["spec"]["output"]["url"]
    apply(cluster, job)
    cluster.wait_phase("immutable", "Running", timeout=180)

    patch_spec(cluster, "immutable", {"method": {"regularization": 0.5}})

    def rejected() -> dict[str, Any] | None:
        found = cluster.job("immutable") or {}
        conds = [c for c in found.get("status", {}).get("conditions") or [] if c["type"] == "SpecChangeRejected"]
        return found if conds and conds[0]["status"] == "True" else None

    running = cluster.wait_for("the SpecChangeRejected condition", rejected, timeout=60)
    assert running["status"]["phase"] == "Running"  # reported while the job runs on
    cond = condition(running, "SpecChangeRejected")
    assert cond["reason"] == "SpecImmutable" and "spec.method.regularization" in cond["message"], cond
    assert "create a new InfluenceJob" in cond["message"]
    done = cluster.wait_phase("immutable", "Succeeded", timeout=180)
    assert done["status"]["attempts"] == 1 and done["status"]["observedGeneration"] == 2
    assert condition(done, "SpecChangeRejected")["status"] == "True"  # still reported on the finished job
    assert children(cluster, "immutable")["daskjobs"] == ["immutable-1"]
    assert cluster.kubelet.started_runners.count("immutable-1-runner") == 1
    warnings = [e for e in events(cluster, "immutable") if e["reason"] == "SpecImmutable"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "spec.method.regularization" in warnings[0]["message"]
    # computed with the accepted regularization (0.1), not the edited one
    assert_same_results(open_output(url), expected(job["spec"]))
