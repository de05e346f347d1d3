"""Executing a validated InfluenceJobSpec on any dask Client (a LocalCluster, or the cluster
the operator started): load, fit once (persisted, reused on rerun), write the store with
kinfluence.compute's DaskInfluenceCalculator, and report progress.

    prepared = prepare_job(spec)                 # load + check here: bad input fails fast
    result = run_job(prepared, client, reporter, name="digits")
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from distributed import Client
from torch import nn

from .batches import ArrayBatches
from .errors import JobError, OutputConflictError
from .fitted import fit_fingerprint, fitted_state_url, load_fitted, remove_fitted, save_fitted
from .loading import Dataset, LossFn, build_model, cached_model, load_data, model_fingerprint, resolve_loss
from .methods import build_method, method_class
from .progress import NullReporter, ProgressReporter, ProgressTracker
from .spec import InfluenceJobSpec

#: key of the job's record inside the store's metadata
METADATA_JOB = "job"


@dataclass(frozen=True)
class PreparedJob:
    """A spec with everything it names loaded in this process and checked."""

    spec: InfluenceJobSpec
    model: nn.Module
    loss: LossFn
    train: Dataset
    test: Dataset
    model_fingerprint: str

    @property
    def fingerprint(self) -> str:
        """Identifies the computation: the spec's computation fields and the model's weights."""
        what = {"computation": self.spec.computation(), "model": self.model_fingerprint}
        return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    @property
    def n_blocks(self) -> int:
        return len(self.test.x.chunks[0]) * len(self.train.x.chunks[0])


@dataclass(frozen=True)
class RunResult:
    """What a run did."""

    name: str
    output: str
    total_blocks: int
    skipped_blocks: int  # done by an earlier run
    computed_blocks: int
    fitted: bool  # False: the saved fitted state was reused
    seconds: float


def prepare_job(spec: InfluenceJobSpec) -> PreparedJob:
    """Load model, loss and data (lazily) and check them against each other and the method."""
    model = build_model(spec.model)
    loss = resolve_loss(spec.loss)
    train, test = load_data(spec)
    method_class(spec.method.name)
    build_method(spec.method, model, loss)  # option errors (e.g. unknown blocks) before any work
    if spec.output.top_k is not None and spec.output.top_k > len(train):
        raise JobError(f"spec.output.topK: {spec.output.top_k} exceeds the {len(train)} training points")
    return PreparedJob(spec, model, loss, train, test, model_fingerprint(model))


# ------------------------------------------------------------------------------ output


def existing_job_record(spec: InfluenceJobSpec) -> Optional[dict[str, Any]]:
    """The job record of the store at spec.output.url: None if there is no store there."""
    from kinfluence.compute import open_influence_store

    try:
        store = open_influence_store(spec.output.url, spec.output.storage_options or None)
    except FileNotFoundError:
        return None
    return dict(store.attrs.get("metadata", {}).get(METADATA_JOB) or {"name": None, "fingerprint": None})


def _changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changed_fields(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


def check_output(prepared: PreparedJob) -> tuple[bool, bool]:
    """What to do with spec.output.url: (resume, overwrite). Refuses a store of a different job
    (unless onExisting: overwrite) and any existing store with onExisting: fail; a path that
    exists but holds no store is refused by the compute layer unless overwrite."""
    spec = prepared.spec
    if spec.output.on_existing == "overwrite":
        return False, True
    record = existing_job_record(spec)
    if record is None:
        return False, False
    url = spec.output.url
    if spec.output.on_existing == "fail":
        raise OutputConflictError(
            f"spec.output.url: {url!r} already holds results (onExisting: fail); use onExisting: resume or overwrite"
        )
    if record.get("fingerprint") != prepared.fingerprint:
        if record.get("fingerprint") is None:
            what = "it was not written by a kinfluence job"
        else:
            changed = _changed_fields(record.get("computation", {}), spec.computation())
            weights = [] if record.get("modelFingerprint") == prepared.model_fingerprint else ["the model weights"]
            what = f"job {record.get('name')!r} wrote it; differs in {', '.join(changed + weights) or 'its fingerprint'}"
        raise OutputConflictError(
            f"spec.output.url: {url!r} holds the result of a different job ({what}); "
            "set spec.output.onExisting: overwrite to replace it, or choose another url"
        )
    return True, False


# ------------------------------------------------------------------------------ fit


def _train_batches(spec: InfluenceJobSpec, train: Dataset) -> ArrayBatches:
    return ArrayBatches(train.x, train.y, spec.model.dtype)


def fit_state(spec_json: str) -> dict[str, Any]:
    """Fit the job's method (on a dask worker: its model cache, its GPU) and return the state, on CPU."""
    import torch

    spec = InfluenceJobSpec.model_validate_json(spec_json)
    model = cached_model(spec.model)
    train, _ = load_data(spec)
    method = build_method(spec.method, model, resolve_loss(spec.loss))
    method.fit(_train_batches(spec, train))

    def cpu(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu()
        if isinstance(obj, dict):
            return {k: cpu(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(cpu(v) for v in obj)
        return obj

    return cpu(method.state_dict())


def fitted_method(prepared: PreparedJob, client: Client, overwrite: bool) -> tuple[Any, bool]:
    """The fitted method: the saved state when it matches this job (and onExisting is not
    overwrite), else fitted on a worker and saved next to the output. Returns (method, fitted_now)."""
    spec = prepared.spec
    url = fitted_state_url(spec.output.url)
    options = spec.output.storage_options
    fingerprint = fit_fingerprint(spec, prepared.model_fingerprint)
    method = build_method(spec.method, prepared.model, prepared.loss)
    loader = _train_batches(spec, prepared.train)
    if overwrite:
        remove_fitted(url, options)
    state = None if overwrite else load_fitted(url, options, fingerprint)
    fitted_now = state is None
    if state is None:
        state = client.submit(fit_state, spec.model_dump_json(by_alias=True), pure=False).result()
        save_fitted(url, options, fingerprint, state)
    return method.load_state_dict(state, train_loader=loader), fitted_now


# ------------------------------------------------------------------------------ run


def run_job(
    job: Union[InfluenceJobSpec, PreparedJob],
    client: Client,
    reporter: Optional[ProgressReporter] = None,
    name: str = "influencejob",
) -> RunResult:
    """Run a job to completion on `client`; rerunning resumes (finished blocks are skipped)."""
    from kinfluence.compute import (
        DaskInfluenceCalculator,
        OutputSelection,
        StoreExistsError,
        StoreMismatchError,
        TorchNumpyConverter,
    )

    started = time.monotonic()
    reporter = reporter or NullReporter()
    tracker = ProgressTracker()
    ok, message = False, ""
    try:
        reporter.stage(tracker.stage("loading"), "model, loss and data")
        prepared = job if isinstance(job, PreparedJob) else prepare_job(job)
        spec = prepared.spec
        resume, overwrite = check_output(prepared)

        reporter.stage(tracker.stage("fitting"), f"{spec.method.name} on {len(prepared.train)} training points")
        method, fitted_now = fitted_method(prepared, client, overwrite)
        if not fitted_now:
            reporter.stage(tracker.stage("fitting"), "reused the fitted state of an earlier run")

        reporter.stage(
            tracker.stage("computing"),
            f"{len(prepared.test)} test x {len(prepared.train)} train points in {prepared.n_blocks} blocks",
        )
        calculator = DaskInfluenceCalculator(method, TorchNumpyConverter(dtype=method.dtype), client)
        outputs = OutputSelection(
            full_matrix=spec.output.matrix, top_k=spec.output.top_k, values=spec.output.values
        )
        metadata = {
            METADATA_JOB: {
                "name": name,
                "fingerprint": prepared.fingerprint,
                "modelFingerprint": prepared.model_fingerprint,
                "computation": spec.computation(),
            },
            "spec": spec.model_dump(by_alias=True, mode="json", include={"data", "model", "loss", "method", "mode"}),
        }
        try:
            summary = calculator.to_zarr(
                prepared.test.x, prepared.test.y, prepared.train.x, prepared.train.y, spec.output.url,
                mode=spec.mode, outputs=outputs, resume=resume, overwrite=overwrite,
                metadata=metadata, storage_options=spec.output.storage_options or None,
                on_progress=lambda done, total: reporter.progress(tracker.update(done, total)),
            )
        except StoreMismatchError as err:
            raise OutputConflictError(f"spec.output.url: {err}") from None
        except StoreExistsError as err:
            raise OutputConflictError(f"spec.output.url: {err}") from None
        ok = True
        message = f"done: {summary.computed_blocks} blocks computed, {summary.skipped_blocks} resumed; output {spec.output.url}"
        return RunResult(name, spec.output.url, summary.total_blocks, summary.skipped_blocks,
                         summary.computed_blocks, fitted_now, time.monotonic() - started)
    except KeyboardInterrupt:
        last = tracker.last
        message = (f"interrupted after {last.completed_blocks}/{last.total_blocks} blocks; finished blocks "
                   "are kept: run the same job again to resume")
        raise
    except JobError as err:
        message = f"failed: {err}"
        raise
    finally:
        reporter.finish(tracker.stage("done" if ok else "stopped"), ok, message)
