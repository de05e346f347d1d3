"""kopf handlers for InfluenceJob: thin wrappers that observe, call `status.reconcile`, and execute.

One kopf daemon per InfluenceJob runs the reconcile loop, so the reconciles of one job never race
each other (a kopf timer would run beside the change handlers and post duplicate events). Each
round reads the job fresh from the API, finds its DaskJobs by label before creating anything
(names are deterministic per attempt), acts, and merge-patches only the status fields it owns
(`progress` belongs to the runner). A spec change or a change of one of the job's DaskJobs wakes
the loop early. kopf restarts the daemons after an operator restart, which resumes every job.
Deletion needs no handler: the DaskJobs carry ownerReferences. Handlers return None.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kinfluence.job.crd import PLURAL
from kinfluence.job.spec import API_GROUP, API_VERSION, InfluenceJobSpec
from kinfluence.operator import kube, manifests
from kinfluence.operator.accepted import ACCEPTED_SPEC_ANNOTATION, dump_accepted, effective_spec
from kinfluence.operator.settings import OperatorConfig, configure
from kinfluence.operator.status import Attempt, CreateAttempt, Decision, DeleteDaskJob, DeleteInfluenceJob, Observed, reconcile

CONFIG = OperatorConfig.from_env()
RESOURCE = (API_GROUP, API_VERSION, PLURAL)
OWNED_STATUS = ("phase", "conditions", "attempts", "output", "clusterName", "dashboardURL", "startTime",
                "completionTime", "observedGeneration")


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure(settings, CONFIG)


@kopf.on.probe(id="reconcileInterval")
def probe(**_: Any) -> float:
    return CONFIG.reconcile_interval


def newest_attempt(namespace: str, name: str, uid: str) -> Attempt | None:
    """The DaskJob with the highest attempt label among this InfluenceJob's children."""
    jobs = kube.list_daskjobs(namespace, manifests.children_selector(name, uid))
    if not jobs:
        return None
    job = max(jobs, key=lambda j: int(j["metadata"]["labels"].get(manifests.ATTEMPT_LABEL, "0")))
    status = job.get("status") or {}
    cluster = status.get("clusterName")
    return Attempt(
        number=int(job["metadata"]["labels"].get(manifests.ATTEMPT_LABEL, "0")),
        name=job["metadata"]["name"],
        job_status=status.get("jobStatus"),
        cluster_name=cluster,
        dashboard_url=manifests.dashboard_url(cluster, namespace) if cluster else None,
    )


def execute(decision: Decision, body: kopf.Body, spec: InfluenceJobSpec | None, logger: logging.Logger) -> None:
    """Carry out the decision's actions through the API (all idempotent)."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    for action in decision.actions:
        if isinstance(action, DeleteDaskJob):
            logger.info("deleting DaskJob %s", action.name)
            kube.delete_daskjob(namespace, action.name)
        elif isinstance(action, CreateAttempt):
            assert spec is not None
            manifest = manifests.build_daskjob(
                job_name=name, namespace=namespace, job_uid=uid, spec=spec, attempt=action.number,
                default_image=CONFIG.default_image, service_account=CONFIG.runner_service_account)
            created = kube.create_daskjob(namespace, manifest)
            logger.info("DaskJob %s %s", manifest["metadata"]["name"], "created" if created else "exists already")
        elif isinstance(action, DeleteInfluenceJob):
            logger.info("ttlSecondsAfterFinished passed: deleting the InfluenceJob")
            kube.delete_influencejob(namespace, name)


def reconcile_job(namespace: str, name: str, logger: logging.Logger) -> Decision | None:
    """One round: observe the job and its newest DaskJob, decide, act, write status, post events."""
    try:
        body = kube.get_influencejob(namespace, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return None
    spec, spec_error, immutable_error = effective_spec(body)
    if spec is not None and ACCEPTED_SPEC_ANNOTATION not in (meta.get("annotations") or {}):
        kube.patch_influencejob(namespace, name, {"metadata": {"annotations": {
            ACCEPTED_SPEC_ANNOTATION: dump_accepted(spec)}}})
    status = dict(body.get("status") or {})
    attempt = newest_attempt(namespace, name, meta["uid"]) if spec is not None else None
    decision = reconcile(Observed(
        now=dt.datetime.now(tz=dt.UTC), generation=int(meta.get("generation") or 0), spec=spec,
        spec_error=spec_error, immutable_error=immutable_error, attempt=attempt, status=status))
    execute(decision, body, spec, logger)
    changes = {key: decision.status.get(key) for key in OWNED_STATUS if decision.status.get(key) != status.get(key)}
    if changes and not any(isinstance(a, DeleteInfluenceJob) for a in decision.actions):
        kube.patch_influencejob_status(namespace, name, changes)
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    return decision


_wakers: dict[str, threading.Event] = {}
_wakers_lock = threading.Lock()


def waker(uid: str) -> threading.Event:
    """The event that ends the reconcile loop's current wait for one job."""
    with _wakers_lock:
        return _wakers.setdefault(uid, threading.Event())


# cancellation_backoff: on deletion kopf first only signals `stopped` and looks again after the backoff;
# without one it cancels at once and only rechecks (and releases the finalizer) after cancellation_timeout,
# so every deletion of an InfluenceJob took 30 s although this loop notices `stopped` within 0.5 s.
@kopf.daemon(*RESOURCE, id="reconciler", cancellation_backoff=1.0, cancellation_timeout=30)
def reconciler(stopped: kopf.DaemonStopped, name: str, namespace: str, uid: str, logger: logging.Logger,
               **_: Any) -> None:
    """Reconcile one InfluenceJob every reconcile interval, or sooner when woken, until it goes away."""
    wake = waker(uid)
    failures = 0
    try:
        while not stopped:
            wake.clear()
            try:
                decision = reconcile_job(namespace, name, logger)
                failures = 0
            except Exception as err:  # an API hiccup: log, back off, try again
                failures += 1
                logger.warning("reconcile failed (%d in a row): %s", failures, err)
                decision = None
            if decision is None and failures == 0:
                return  # the job is gone or being deleted
            wait = CONFIG.reconcile_interval * min(2 ** failures, 6)
            if decision is not None and decision.requeue_after is not None:
                wait = max(0.2, min(wait, decision.requeue_after))
            deadline = time.monotonic() + wait
            while not stopped and not wake.is_set() and time.monotonic() < deadline:
                wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
    finally:
        with _wakers_lock:
            _wakers.pop(uid, None)


@kopf.on.update(*RESOURCE, field="spec", id="spec-change")
def on_spec_change(uid: str, **_: Any) -> None:
    """Suspend, resume, worker changes, rejected edits: reconcile now rather than at the next tick."""
    waker(uid).set()


@kopf.on.event(manifests.DASK_GROUP, manifests.DASK_VERSION, "daskjobs", labels={manifests.JOB_UID_LABEL: kopf.PRESENT},
               id="daskjob-change")
def on_daskjob_change(body: kopf.Body, **_: Any) -> None:
    """A DaskJob of ours changed (dask-kubernetes moved its jobStatus): reconcile its owner now."""
    owner_uid = body["metadata"].get("labels", {}).get(manifests.JOB_UID_LABEL)
    if owner_uid:
        with _wakers_lock:
            event = _wakers.get(owner_uid)
        if event is not None:
            event.set()
