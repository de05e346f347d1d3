"""What a to_zarr run still has to do, given the completion records already in the store, and
the bookkeeping both calculators share (run ids, output checks, summaries)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..influence.base import InfluenceFunctionModel
from ..influence.modes import InfluenceMode
from .fingerprint import model_fingerprint
from .outputs import OutputSelection
from .store import StoreHandle, StoreLayout, prepare_store

ProgressCallback = Callable[[int, int], None]


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def numpy_dtype_of(model: InfluenceFunctionModel) -> str:
    """The numpy dtype name of the model's floating dtype (the store's dtype)."""
    return str(torch.empty(0, dtype=model.dtype).numpy().dtype)


def check_outputs(outputs: Optional[OutputSelection], mode: InfluenceMode, n_train: int) -> OutputSelection:
    """Validate the selection against the mode and the data."""
    outputs = OutputSelection() if outputs is None else outputs
    if not isinstance(outputs, OutputSelection):
        raise TypeError(f"outputs: expected an OutputSelection, got {type(outputs).__name__}")
    if outputs.top_k is not None and mode is not InfluenceMode.UP:
        raise ValueError("outputs.top_k: needs mode='up' (perturbation influences have feature dimensions)")
    if outputs.top_k is not None and outputs.top_k > n_train:
        raise ValueError(f"outputs.top_k: k={outputs.top_k} exceeds the number of training points ({n_train})")
    return outputs


@dataclass
class WritePlan:
    """The blocks and factor chunks a run must compute; everything else is already done."""

    layout: StoreLayout
    done_blocks: set[tuple[int, int]]
    done_factors: set[int]
    finalized: bool

    @property
    def columns(self) -> dict[int, list[int]]:
        """Train chunk j -> test chunks i whose block (i, j) is missing, in order."""
        out: dict[int, list[int]] = {}
        for j in range(self.layout.n_train_chunks):
            rows = [i for i in range(self.layout.n_test_chunks) if (i, j) not in self.done_blocks]
            if rows:
                out[j] = rows
        return out

    @property
    def factors_needed(self) -> list[int]:
        rows = {i for r in self.columns.values() for i in r}
        return sorted(i for i in rows if i not in self.done_factors)

    @property
    def n_missing(self) -> int:
        return sum(len(r) for r in self.columns.values())

    @property
    def n_done(self) -> int:
        return self.layout.total_blocks - self.n_missing


def report(on_progress: Optional[ProgressCallback], done: int, total: int) -> None:
    if on_progress is not None:
        on_progress(done, total)


def start_write(
    url: str, storage_options: Optional[Mapping[str, Any]], layout: StoreLayout, outputs: OutputSelection,
    mode: InfluenceMode, model: InfluenceFunctionModel, data_fp: Mapping[str, str],
    metadata: Optional[Mapping[str, Any]], resume: bool, overwrite: bool, on_progress: Optional[ProgressCallback],
) -> tuple[StoreHandle, WritePlan, str]:
    """Open (or create) the store of this computation, plan the run from its completion records,
    and report the blocks already done; returns the store, the plan and the new run id."""
    run_id = new_run_id()
    handle = prepare_store(url, storage_options, layout, outputs, mode.value, type(model).__name__,
                           model.parameters_summary(), model_fingerprint(model), data_fp, metadata,
                           resume, overwrite, run_id)
    records = handle.records()
    plan = WritePlan(layout, handle.completed_blocks(records), handle.completed_factors(records),
                     "finalized" in records)
    report(on_progress, plan.n_done, layout.total_blocks)
    return handle, plan, run_id
