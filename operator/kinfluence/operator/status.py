"""Status derivation: ONE pure reconcile function from what is observed to what the job's status is
and what the operator must do next. No I/O here; kinfluence.operator.handlers executes the decision.

Inputs: the spec (or its validation error), the run policy, the current DaskJob attempt and its
`status.jobStatus` (JobCreated, ClusterCreated, Running, Successful, Failed, from dask-kubernetes),
the previous status (with the runner's `progress`), and the time. Outputs: the operator-owned status
fields (phase, conditions, attempts, times, ...), the actions (create an attempt, delete a DaskJob,
delete the InfluenceJob for its TTL) and the Kubernetes Events of the transitions. `progress` is
written by the runner and only read here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from kinfluence.job.spec import InfluenceJobSpec, Phase

CONDITION_TYPES = ("Running", "Suspended", "Complete", "Failed")
SPEC_CONDITION = "SpecChangeRejected"
DASK_RUNNING = "Running"
DASK_SUCCESSFUL = "Successful"
DASK_FAILED = "Failed"
_FINISHED = (Phase.SUCCEEDED.value, Phase.FAILED.value)


def timestamp(now: dt.datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str | None) -> dt.datetime | None:
    """The inverse of `timestamp` (None stays None)."""
    if not value:
        return None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Attempt:
    """The newest DaskJob of the InfluenceJob: its attempt number and dask-kubernetes' jobStatus."""

    number: int
    name: str
    job_status: str | None = None
    cluster_name: str | None = None
    dashboard_url: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything the reconcile function looks at."""

    now: dt.datetime
    generation: int
    spec: InfluenceJobSpec | None  # None when invalid
    spec_error: str | None = None
    immutable_error: str | None = None  # changed computation-defining fields, if any
    attempt: Attempt | None = None
    status: dict[str, Any] = field(default_factory=dict)  # the InfluenceJob's current status


@dataclass(frozen=True)
class CreateAttempt:
    """Create the DaskJob of this attempt number (idempotent: the name is deterministic)."""

    number: int


@dataclass(frozen=True)
class DeleteDaskJob:
    """Delete this DaskJob (its cluster and runner pod go with it)."""

    name: str


@dataclass(frozen=True)
class DeleteInfluenceJob:
    """Delete the InfluenceJob itself (ttlSecondsAfterFinished passed)."""


Action = CreateAttempt | DeleteDaskJob | DeleteInfluenceJob


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the InfluenceJob."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """The status fields to write (operator-owned only), what to do, what to announce, when to look again."""

    status: dict[str, Any]
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None


def set_conditions(
    previous: list[dict[str, Any]], active: str | None, reason: str, message: str, now: dt.datetime
) -> list[dict[str, Any]]:
    """All CONDITION_TYPES, `active` True and the rest False; lastTransitionTime kept unless the status flips.

    Reason and message describe the active condition; inactive ones keep a short reason of their own.
    """
    by_type = {c.get("type"): c for c in previous}
    out = []
    for ctype in CONDITION_TYPES:
        status = "True" if ctype == active else "False"
        old = by_type.get(ctype)
        if ctype == active:
            creason, cmessage = reason, message
        else:
            creason = old.get("reason") if old and old.get("status") == "False" else f"Not{ctype}"
            cmessage = old.get("message", "") if old and old.get("status") == "False" else ""
        changed = old is None or old.get("status") != status
        when = timestamp(now) if changed or not old.get("lastTransitionTime") else old["lastTransitionTime"]
        out.append({"type": ctype, "status": status, "reason": creason, "message": cmessage,
                    "lastTransitionTime": when})
    return out


def _progress_text(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    if not progress.get("totalBlocks"):
        return ""
    return f" ({progress.get('completedBlocks', 0)}/{progress['totalBlocks']} blocks, {progress.get('percentage', 0)}%)"


def reconcile(obs: Observed) -> Decision:
    """Derive the InfluenceJob's status and the operator's next actions (see `_reconcile`), plus the
    SpecChangeRejected condition (and one Warning) when computation-defining fields were edited."""
    decision = _reconcile(obs)
    prev = [c for c in (obs.status or {}).get("conditions") or [] if c.get("type") == SPEC_CONDITION]
    old = prev[0] if prev else None
    events = list(decision.events)
    if obs.immutable_error:
        same = old is not None and old.get("status") == "True"
        cond = {"type": SPEC_CONDITION, "status": "True", "reason": "SpecImmutable", "message": obs.immutable_error,
                "lastTransitionTime": old["lastTransitionTime"] if same and old else timestamp(obs.now)}
        if not same or old.get("message") != obs.immutable_error:
            events.insert(0, Event("Warning", "SpecImmutable", obs.immutable_error))
    elif old is not None:
        same = old.get("status") == "False"
        cond = {"type": SPEC_CONDITION, "status": "False", "reason": "SpecAccepted", "message": "",
                "lastTransitionTime": old["lastTransitionTime"] if same else timestamp(obs.now)}
    else:
        return decision
    status = dict(decision.status)
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != SPEC_CONDITION] + [cond]
    return Decision(status, decision.actions, tuple(events), decision.requeue_after)


def _reconcile(obs: Observed) -> Decision:
    """Derive the InfluenceJob's status and the operator's next actions from what is observed.

    Precedence: invalid spec > already finished (TTL only) > suspend > deadline > the DaskJob's state.
    A Failed DaskJob is replaced by attempt n+1 while n <= backoffLimit (the new runner resumes
    from the store's completion record); the deadline counts from startTime, which a resume resets.
    """
    prev = obs.status or {}
    now = obs.now
    prev_phase = prev.get("phase")
    attempts = max(int(prev.get("attempts") or 0), obs.attempt.number if obs.attempt else 0)
    base: dict[str, Any] = {"observedGeneration": obs.generation, "attempts": attempts}
    if obs.spec is not None:
        base["output"] = obs.spec.output.url
    for key in ("startTime", "completionTime", "clusterName", "dashboardURL"):
        if prev.get(key) is not None:
            base[key] = prev[key]
    actions: list[Action] = []
    events: list[Event] = []

    def finish(phase: Phase, active: str, reason: str, message: str, etype: Literal["Normal", "Warning"]) -> Decision:
        status = dict(base, phase=phase.value, completionTime=base.get("completionTime") or timestamp(now))
        status["conditions"] = set_conditions(prev.get("conditions") or [], active, reason, message, now)
        if prev_phase != phase.value:
            events.append(Event(etype, reason, message))
        if obs.attempt is not None and obs.attempt.job_status not in (DASK_SUCCESSFUL, DASK_FAILED):
            actions.append(DeleteDaskJob(obs.attempt.name))
        return _with_ttl(Decision(status, tuple(actions), tuple(events)), obs)

    # 1. An invalid spec fails at once, with the field-naming message, and is never retried.
    if obs.spec is None:
        return finish(Phase.FAILED, "Failed", "ValidationFailed", obs.spec_error or "invalid spec", "Warning")

    # 2. A finished job stays finished; only its TTL matters.
    if prev_phase in _FINISHED:
        status = dict(base, phase=prev_phase, conditions=[c for c in prev.get("conditions") or []
                                                          if c.get("type") in CONDITION_TYPES])
        if obs.attempt is not None and obs.attempt.job_status not in (DASK_SUCCESSFUL, DASK_FAILED):
            actions.append(DeleteDaskJob(obs.attempt.name))
        return _with_ttl(Decision(status, tuple(actions)), obs)

    policy = obs.spec.run_policy

    # 3. Suspended: remove the cluster, keep the output (and the attempt count).
    if policy.suspend:
        status = dict(base, phase=Phase.SUSPENDED.value)
        status.pop("clusterName", None)
        status.pop("dashboardURL", None)
        message = "suspended: cluster removed, output kept; set spec.runPolicy.suspend=false to resume"
        status["conditions"] = set_conditions(prev.get("conditions") or [], "Suspended", "Suspended", message, now)
        if obs.attempt is not None and obs.attempt.job_status not in (DASK_SUCCESSFUL, DASK_FAILED):
            actions.append(DeleteDaskJob(obs.attempt.name))
        if prev_phase != Phase.SUSPENDED.value:
            events.append(Event("Normal", "Suspended", message))
        return Decision(status, tuple(actions), tuple(events))

    resumed = prev_phase == Phase.SUSPENDED.value
    if resumed or "startTime" not in base:
        base["startTime"] = timestamp(now)  # a resume restarts the deadline clock, as for batch Jobs

    # 4. The deadline.
    started = parse_timestamp(base["startTime"])
    assert started is not None
    if policy.active_deadline_seconds is not None:
        left = policy.active_deadline_seconds - (now - started).total_seconds()
        if left <= 0:
            return finish(Phase.FAILED, "Failed", "DeadlineExceeded",
                          f"running longer than activeDeadlineSeconds={policy.active_deadline_seconds}; "
                          "cluster removed", "Warning")
    else:
        left = None

    # 5. The current attempt.
    current = obs.attempt
    if current is not None and current.job_status == DASK_SUCCESSFUL:
        return finish(Phase.SUCCEEDED, "Complete", "Completed",
                      f"attempt {current.number} completed{_progress_text(prev)}; output at {obs.spec.output.url}",
                      "Normal")
    if current is not None and current.job_status == DASK_FAILED:
        if current.number > policy.backoff_limit:
            return finish(Phase.FAILED, "Failed", "BackoffLimitExceeded",
                          f"attempt {current.number} failed; backoffLimit={policy.backoff_limit} reached", "Warning")
        actions.append(DeleteDaskJob(current.name))
        events.append(Event("Warning", "AttemptFailed",
                            f"attempt {current.number} failed; starting attempt {current.number + 1} "
                            "(it resumes from the store's completed blocks)"))
        current = None
    if current is None:
        number = attempts + 1 if (obs.attempt is not None or resumed or attempts == 0) else attempts
        number = max(number, 1)
        actions.append(CreateAttempt(number))
        events.append(Event("Normal", "AttemptCreated", f"attempt {number}: DaskJob created"))
        base["attempts"] = number
        phase, active, reason = Phase.PENDING, None, "ClusterStarting"
        message = f"attempt {number}: starting the dask cluster"
        base.pop("clusterName", None)
        base.pop("dashboardURL", None)
    elif current.job_status == DASK_RUNNING:
        phase, active, reason = Phase.RUNNING, "Running", "Running"
        message = f"attempt {current.number} running{_progress_text(prev)}"
    else:
        phase, active, reason = Phase.PENDING, None, "ClusterStarting"
        message = f"attempt {current.number}: {current.job_status or 'DaskJob submitted'}"
    if current is not None and current.cluster_name:
        base["clusterName"] = current.cluster_name
        if current.dashboard_url:
            base["dashboardURL"] = current.dashboard_url
    status = dict(base, phase=phase.value)
    status.pop("completionTime", None)
    conditions = set_conditions(prev.get("conditions") or [], active, reason, message, now)
    if active is None:  # Pending: say why in the Running condition
        conditions[CONDITION_TYPES.index("Running")].update(reason=reason, message=message)
    status["conditions"] = conditions
    if prev_phase != phase.value and phase is Phase.RUNNING:
        events.append(Event("Normal", "Running", message))
    if resumed:
        events.insert(0, Event("Normal", "Resumed", "resumed after suspend; the deadline clock restarts"))
    return Decision(status, tuple(actions), tuple(events), requeue_after=left)


def _with_ttl(decision: Decision, obs: Observed) -> Decision:
    """Add the TTL deletion (or the time until it) to the decision for a finished job."""
    ttl = obs.spec.run_policy.ttl_seconds_after_finished if obs.spec is not None else None
    done = parse_timestamp(decision.status.get("completionTime"))
    if ttl is None or done is None:
        return decision
    left = ttl - (obs.now - done).total_seconds()
    if left <= 0:
        return Decision(decision.status, (*decision.actions, DeleteInfluenceJob()), decision.events)
    return Decision(decision.status, decision.actions, decision.events, requeue_after=left)
