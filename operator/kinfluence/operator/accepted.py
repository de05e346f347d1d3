"""Spec immutability: the computation-defining fields of an InfluenceJob are frozen when the operator
first accepts it (stored in an annotation); later edits of them are reported and ignored, while
workers and runPolicy stay editable. The runner reads the same effective spec."""

from __future__ import annotations

import json
from typing import Any, Mapping

from kinfluence.job import SpecError, parse_spec
from kinfluence.job.spec import API_GROUP, InfluenceJobSpec

ACCEPTED_SPEC_ANNOTATION = f"{API_GROUP}/accepted-spec"


def accepted_fields(spec: InfluenceJobSpec) -> dict[str, Any]:
    """The spec fields that define the computation (and where it goes): frozen after acceptance."""
    out = spec.computation()
    out["output"] = dict(out["output"], url=spec.output.url)
    return out


def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for key in sorted(set(a) | set(b)) for p in _diff(a.get(key), b.get(key), f"{path}.{key}")]
    return [] if a == b else [path]


def immutable_changes(accepted: dict[str, Any], spec: InfluenceJobSpec) -> list[str]:
    """Dotted camelCase paths (spec.x.y) of computation-defining fields that differ from `accepted`."""
    return _diff(accepted, accepted_fields(spec), "spec")


def immutable_message(changed: list[str]) -> str:
    """The message of a rejected change: which fields, and what to do instead."""
    return (f"fields that define the computation cannot change after creation: {', '.join(changed)}; "
            "the job keeps running with the accepted values (create a new InfluenceJob to compute something else)")


def dump_accepted(spec: InfluenceJobSpec) -> str:
    """The accepted spec as stored in the job's annotation."""
    return json.dumps(spec.model_dump(by_alias=True, mode="json", exclude_none=True), sort_keys=True)


def effective_spec(body: Mapping[str, Any]) -> tuple[InfluenceJobSpec | None, str | None, str | None]:
    """(spec to run, validation error, immutable-change error) of an InfluenceJob resource.

    Computation fields come from the accepted-spec annotation once there is one; workers and
    runPolicy always from the live spec.
    """
    name = (body.get("metadata") or {}).get("name", "?")
    try:
        live = parse_spec(body.get("spec"), source=f"InfluenceJob {name}")
    except SpecError as err:
        return None, str(err), None
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(ACCEPTED_SPEC_ANNOTATION)
    if raw is None:
        return live, None, None
    accepted = parse_spec(json.loads(raw), source=f"annotation {ACCEPTED_SPEC_ANNOTATION}")
    changed = immutable_changes(accepted_fields(accepted), live)
    if not changed:
        return live, None, None
    merged = accepted.model_copy(update={"workers": live.workers, "run_policy": live.run_policy})
    return merged, None, immutable_message(changed)
