"""Status derivation: DaskJob status x progress x run policy x attempts x time -> phase, conditions, actions."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from test_manifests import SPEC

from kinfluence.job import parse_spec
from kinfluence.operator.accepted import accepted_fields, immutable_changes
from kinfluence.operator.status import (
    Attempt,
    CreateAttempt,
    DeleteDaskJob,
    DeleteInfluenceJob,
    Observed,
    reconcile,
    set_conditions,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
STARTED = "2026-01-01T12:00:00Z"


def spec(**run_policy: Any) -> Any:
    return parse_spec(dict(SPEC, runPolicy=run_policy))


def observe(attempt: Attempt | None = None, status: dict[str, Any] | None = None, seconds: float = 0,
            **run_policy: Any) -> Observed:
    return Observed(now=T0 + dt.timedelta(seconds=seconds), generation=1, spec=spec(**run_policy),
                    attempt=attempt, status=status or {})


def running(attempts: int = 1, **extra: Any) -> dict[str, Any]:
    return {"phase": "Running", "attempts": attempts, "startTime": STARTED, **extra}


def active_condition(status: dict[str, Any]) -> tuple[str, str] | None:
    active = [(c["type"], c["reason"]) for c in status["conditions"] if c["status"] == "True"]
    assert len(active) <= 1
    return active[0] if active else None


# (case, observed, expected phase, expected active condition, expected actions, expected event reasons)
CASES = [
    ("new job creates attempt 1", observe(), "Pending", None, [CreateAttempt(1)], ["AttemptCreated"]),
    ("DaskJob created", observe(Attempt(1, "digits-1", "JobCreated"), running(phase="Pending")),
     "Pending", None, [], []),
    ("cluster created", observe(Attempt(1, "digits-1", "ClusterCreated", "digits-1"), running(phase="Pending")),
     "Pending", None, [], []),
    ("runner running", observe(Attempt(1, "digits-1", "Running", "digits-1"), running(phase="Pending")),
     "Running", ("Running", "Running"), [], ["Running"]),
    ("still running: no event", observe(Attempt(1, "digits-1", "Running"), running()),
     "Running", ("Running", "Running"), [], []),
    ("successful", observe(Attempt(1, "digits-1", "Successful"), running()),
     "Succeeded", ("Complete", "Completed"), [], ["Completed"]),
    ("failed attempt is replaced", observe(Attempt(1, "digits-1", "Failed"), running(), backoffLimit=2),
     "Pending", None, [DeleteDaskJob("digits-1"), CreateAttempt(2)], ["AttemptFailed", "AttemptCreated"]),
    ("failed beyond backoffLimit", observe(Attempt(3, "digits-3", "Failed"), running(3), backoffLimit=2),
     "Failed", ("Failed", "BackoffLimitExceeded"), [], ["BackoffLimitExceeded"]),
    ("no retries with backoffLimit 0", observe(Attempt(1, "digits-1", "Failed"), running(), backoffLimit=0),
     "Failed", ("Failed", "BackoffLimitExceeded"), [], ["BackoffLimitExceeded"]),
    ("deadline exceeded removes the cluster",
     observe(Attempt(1, "digits-1", "Running"), running(), seconds=61, activeDeadlineSeconds=60),
     "Failed", ("Failed", "DeadlineExceeded"), [DeleteDaskJob("digits-1")], ["DeadlineExceeded"]),
    ("suspend removes the cluster", observe(Attempt(1, "digits-1", "Running"), running(), suspend=True),
     "Suspended", ("Suspended", "Suspended"), [DeleteDaskJob("digits-1")], ["Suspended"]),
    ("suspended before any attempt", observe(suspend=True), "Suspended", ("Suspended", "Suspended"), [], ["Suspended"]),
    ("unsuspend resumes with a new attempt", observe(None, running(phase="Suspended")),
     "Pending", None, [CreateAttempt(2)], ["Resumed", "AttemptCreated"]),
    ("attempt lost (operator crashed before creating it) is re-created", observe(None, running(2)),
     "Pending", None, [CreateAttempt(2)], ["AttemptCreated"]),
    ("succeeded stays succeeded", observe(Attempt(1, "digits-1", "Successful"),
                                          running(phase="Succeeded", completionTime=STARTED)),
     "Succeeded", None, [], []),
]


@pytest.mark.parametrize(("observed", "phase", "active", "actions", "events"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reconcile_table(observed: Observed, phase: str, active: tuple[str, str] | None,
                         actions: list[Any], events: list[str]) -> None:
    decision = reconcile(observed)
    assert decision.status["phase"] == phase
    if decision.status["conditions"]:
        assert active_condition(decision.status) == active
    assert list(decision.actions) == actions
    assert [e.reason for e in decision.events] == events
    assert decision.status["output"] == "gs://bucket/out.zarr"
    assert decision.status["observedGeneration"] == 1
    assert "progress" not in decision.status  # the runner owns it


def test_invalid_spec_fails_without_retry() -> None:
    obs = Observed(now=T0, generation=3, spec=None, spec_error="spec.chunks.train: must be > 0")
    decision = reconcile(obs)
    assert decision.status["phase"] == "Failed" and decision.status["observedGeneration"] == 3
    (failed,) = [c for c in decision.status["conditions"] if c["status"] == "True"]
    assert (failed["type"], failed["reason"]) == ("Failed", "ValidationFailed")
    assert failed["message"] == "spec.chunks.train: must be > 0"
    assert decision.actions == () and [(e.type, e.reason) for e in decision.events] == [("Warning", "ValidationFailed")]
    again = reconcile(Observed(now=T0, generation=3, spec=None, spec_error="x", status=decision.status))
    assert again.events == () and again.actions == ()  # nothing new on the next look


def test_attempts_and_times() -> None:
    first = reconcile(observe())
    assert first.status["attempts"] == 1 and first.status["startTime"] == STARTED
    retry = reconcile(observe(Attempt(1, "a-1", "Failed"), running(1), seconds=30))
    assert retry.status["attempts"] == 2 and retry.status["startTime"] == STARTED  # the deadline clock runs on
    done = reconcile(observe(Attempt(2, "a-2", "Successful"), running(2), seconds=90))
    assert done.status["completionTime"] == "2026-01-01T12:01:30Z" and done.status["attempts"] == 2
    resumed = reconcile(observe(None, running(2, phase="Suspended"), seconds=500))
    assert resumed.status["startTime"] == "2026-01-01T12:08:20Z"


def test_progress_shows_in_the_running_message() -> None:
    status = running(progress={"completedBlocks": 3, "totalBlocks": 12, "percentage": 25.0})
    decision = reconcile(observe(Attempt(1, "a-1", "Running"), status))
    (cond,) = [c for c in decision.status["conditions"] if c["type"] == "Running"]
    assert cond["message"] == "attempt 1 running (3/12 blocks, 25.0%)"


def test_deadline_and_ttl_requeue() -> None:
    decision = reconcile(observe(Attempt(1, "a-1", "Running"), running(), seconds=20, activeDeadlineSeconds=60))
    assert decision.requeue_after == pytest.approx(40)
    finished = running(phase="Succeeded", completionTime=STARTED)
    waiting = reconcile(observe(Attempt(1, "a-1", "Successful"), finished, seconds=10, ttlSecondsAfterFinished=30))
    assert waiting.actions == () and waiting.requeue_after == pytest.approx(20)
    expired = reconcile(observe(Attempt(1, "a-1", "Successful"), finished, seconds=31, ttlSecondsAfterFinished=30))
    assert expired.actions == (DeleteInfluenceJob(),)


def test_conditions_keep_transition_times() -> None:
    t1 = T0 + dt.timedelta(minutes=5)
    first = set_conditions([], "Running", "Running", "m1", T0)
    second = set_conditions(first, "Running", "Running", "m2", t1)
    (running_cond,) = [c for c in second if c["type"] == "Running"]
    assert running_cond["lastTransitionTime"] == "2026-01-01T12:00:00Z" and running_cond["message"] == "m2"
    third = set_conditions(second, "Complete", "Completed", "done", t1)
    by_type = {c["type"]: c for c in third}
    assert by_type["Running"]["status"] == "False" and by_type["Running"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert by_type["Complete"]["lastTransitionTime"] == "2026-01-01T12:05:00Z"
    assert by_type["Failed"]["lastTransitionTime"] == "2026-01-01T12:00:00Z"  # False all along


def test_immutable_fields() -> None:
    accepted = accepted_fields(spec())
    assert immutable_changes(accepted, spec()) == []
    mutable = parse_spec(dict(SPEC, workers={"replicas": 7}, runPolicy={"suspend": True}))
    assert immutable_changes(accepted, mutable) == []  # workers and runPolicy may change
    changed = parse_spec(dict(SPEC, method={"name": "cg", "regularization": 0.5}, output={"url": "gs://b/other.zarr"}))
    assert immutable_changes(accepted, changed) == ["spec.method.regularization", "spec.output.url"]


def test_a_rejected_spec_change_is_a_condition_and_one_warning() -> None:
    obs = Observed(now=T0, generation=2, spec=spec(), attempt=Attempt(1, "a-1", "Running"), status=running(),
                   immutable_error="fields that define the computation cannot change: spec.loss")
    first = reconcile(obs)
    (cond,) = [c for c in first.status["conditions"] if c["type"] == "SpecChangeRejected"]
    assert (cond["status"], cond["reason"]) == ("True", "SpecImmutable") and "spec.loss" in cond["message"]
    assert [e.reason for e in first.events] == ["SpecImmutable"] and first.status["phase"] == "Running"
    later = Observed(now=T0 + dt.timedelta(seconds=9), generation=2, spec=spec(), attempt=Attempt(1, "a-1", "Running"),
                     status=first.status, immutable_error=obs.immutable_error)
    assert reconcile(later).events == ()  # announced once
    reverted = Observed(now=T0 + dt.timedelta(seconds=20), generation=3, spec=spec(),
                        attempt=Attempt(1, "a-1", "Running"), status=first.status)
    (cond,) = [c for c in reconcile(reverted).status["conditions"] if c["type"] == "SpecChangeRejected"]
    assert (cond["status"], cond["lastTransitionTime"]) == ("False", "2026-01-01T12:00:20Z")
