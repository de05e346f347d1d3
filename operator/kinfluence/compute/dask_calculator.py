"""The dask calculator: influences of dask arrays, as a lazy dask array or written block by
block into a zarr store by the workers of a dask Client.

Cost model (the point of this module):
* the fitted influence model is shipped to the workers ONCE, as bytes unpickled once per
  worker process (a broadcast `ShippedModel`, or a single graph key without a client), and
  every task refers to it;
* each test chunk's factors, the expensive solves, are computed ONCE per run;
* each train chunk's representation is computed ONCE and multiplied against every test
  chunk's factors (a GEMM per block);
* to_zarr keeps factors in the store (not in worker memory) and keeps only a few train
  representations alive at a time, so worker memory is bounded by chunk sizes.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import Any, Mapping, Optional, Union

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from distributed import Client, Future, as_completed

from ..influence.base import InfluenceFunctionModel
from ..influence.modes import InfluenceMode
from .converters import NumpyConverter, TorchNumpyConverter
from .errors import InvalidDimensionChunksError, ThreadSafetyViolationError, UnalignedChunksError
from .fingerprint import chunk_digest, combine_digests
from .outputs import OutputSelection, WriteSummary
from .plan import ProgressCallback, WritePlan, check_outputs, numpy_dtype_of, report, start_write
from .store import StoreHandle, StoreLayout, regular_chunk_size
from .shipping import ShippedModel
from .tasks import block_from, factors_chunk, representation_chunk, store_block, store_factors

logger = logging.getLogger(__name__)

#: key prefixes of the graph's tasks (a test counts them)
FACTORS_KEY = "influence-factors"
REPRESENTATION_KEY = "train-representation"
BLOCK_KEY = "influence-block"


class DisableClientSingleThreadCheck:
    """Pass this class instead of a client (the default dask scheduler is used), or wrap a
    client, DisableClientSingleThreadCheck(client), to skip the thread-safety check: the
    caller vouches that the model is only ever used by one thread per worker."""

    def __init__(self, client: Optional[Client] = None) -> None:
        if client is not None and not isinstance(client, Client):
            raise TypeError(f"client: expected a distributed.Client or None, got {type(client).__name__}")
        self.client = client


def check_dask_pair(x: Any, y: Any, x_name: str, y_name: str) -> tuple[int, ...]:
    """x and y must be dask arrays of equal length, chunked only along axis 0, the same way.
    Returns the row chunks."""
    for a, name in ((x, x_name), (y, y_name)):
        if not isinstance(a, da.Array):
            raise TypeError(f"{name}: expected a dask.array.Array, got {type(a).__name__} "
                            "(wrap numpy arrays with dask.array.from_array(a, chunks=(rows, ...)))")
        if a.ndim == 0:
            raise ValueError(f"{name}: expected one row per data point, got a 0-dim array")
        if any(c != c for c in a.chunks[0]):
            raise InvalidDimensionChunksError(f"{name}: has unknown chunk sizes {a.chunks[0]}; call {name}.compute_chunk_sizes()")
        for dim in range(1, a.ndim):
            if len(a.chunks[dim]) > 1:
                raise InvalidDimensionChunksError(
                    f"{name}: is chunked along dimension {dim} (chunks {a.chunks[dim]}); only the first "
                    f"(data point) dimension may be chunked: use {name}.rechunk({{{dim}: -1}})"
                )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} and {y_name}: have different lengths ({x.shape[0]} and {y.shape[0]})")
    if x.chunks[0] != y.chunks[0]:
        raise UnalignedChunksError(x_name, x.chunks[0], y_name, y.chunks[0])
    return tuple(int(c) for c in x.chunks[0])


def _row_blocks(a: da.Array) -> list[Any]:
    """The delayed row chunks of an array chunked along axis 0 only."""
    return list(a.to_delayed().reshape(-1))


class DaskInfluenceCalculator:
    """Influences of dask arrays on a dask cluster.

    converter turns numpy chunks into the model's tensors and back (TorchNumpyConverter);
    client is a distributed.Client (a model that is not thread-safe is refused on
    multi-threaded workers) or DisableClientSingleThreadCheck.
    """

    def __init__(
        self,
        influence_function_model: InfluenceFunctionModel,
        converter: Optional[NumpyConverter] = None,
        client: Union[Client, DisableClientSingleThreadCheck, type[DisableClientSingleThreadCheck], None] = None,
    ) -> None:
        model = influence_function_model
        if not isinstance(model, InfluenceFunctionModel):
            raise TypeError(f"influence_function_model: expected a fitted InfluenceFunctionModel, got {type(model).__name__}")
        model._require_fitted()
        if converter is None:
            converter = TorchNumpyConverter()
        if not isinstance(converter, NumpyConverter):
            raise TypeError(f"converter: expected a NumpyConverter (e.g. TorchNumpyConverter()), got {type(converter).__name__}")
        self.model, self.converter = model, converter
        if client is DisableClientSingleThreadCheck or isinstance(client, DisableClientSingleThreadCheck):
            self.client: Optional[Client] = None if client is DisableClientSingleThreadCheck else client.client  # type: ignore[union-attr]
            logger.warning("DaskInfluenceCalculator: thread-safety check disabled; %s must run on "
                           "single-threaded workers", type(model).__name__)
        elif isinstance(client, Client):
            self.client = client
            if not model.is_thread_safe:
                nthreads = client.nthreads()
                if any(n > 1 for n in nthreads.values()):
                    raise ThreadSafetyViolationError(type(model).__name__, nthreads)
        else:
            raise TypeError(
                "client: expected a distributed.Client or DisableClientSingleThreadCheck, "
                f"got {type(client).__name__}"
            )
        self._token = uuid.uuid4().hex
        self._model_ref: Any = None

    # ------------------------------------------------------------------ shipping the model

    def model_reference(self) -> Any:
        """The model as every task refers to it: one broadcast future, or one graph key, of the
        model's bytes (`ShippedModel`: never the live model, which cannot be pickled mid-task)."""
        if self._model_ref is None:
            shipped = ShippedModel(self.model)
            if self.client is not None:
                self._model_ref = self.client.scatter(shipped, broadcast=True, hash=False)
            else:
                self._model_ref = dask.delayed(shipped, name=f"influence-model-{self._token}", traverse=False)
        return self._model_ref

    def _require_client(self) -> Client:
        if self.client is not None:
            return self.client
        try:
            from distributed import get_client

            return get_client()
        except ValueError:
            raise ValueError("client: to_zarr needs a distributed.Client (none was given and none is running)") from None

    # ------------------------------------------------------------------ lazy arrays

    def _factor_tasks(self, x: da.Array, y: da.Array, token: str) -> list[Any]:
        ref = self.model_reference()
        return [
            dask.delayed(factors_chunk, pure=True)(ref, self.converter, xb, yb, dask_key_name=f"{FACTORS_KEY}-{token}-{i}")
            for i, (xb, yb) in enumerate(zip(_row_blocks(x), _row_blocks(y)))
        ]

    def influence_factors(self, x: da.Array, y: da.Array) -> da.Array:
        """Lazy factors (n, q) of every row; q (the parameter count, or a rank) is only known
        once computed, so that dimension has an unknown size."""
        chunks = check_dask_pair(x, y, "x", "y")
        token = tokenize(self._token, x.name, y.name)
        dtype = np.dtype(numpy_dtype_of(self.model))
        parts = [da.from_delayed(f, shape=(n, np.nan), dtype=dtype) for f, n in zip(self._factor_tasks(x, y, token), chunks)]
        return da.concatenate(parts, axis=0, allow_unknown_chunksizes=True)

    def _blocks(
        self, factor_tasks: list[Any], test_chunks: tuple[int, ...], x: da.Array, y: da.Array, mode: InfluenceMode, token: str
    ) -> da.Array:
        ref = self.model_reference()
        feature_shape = tuple(x.shape[1:]) if mode is InfluenceMode.PERTURBATION else ()
        dtype = np.dtype(numpy_dtype_of(self.model))
        reps = [
            dask.delayed(representation_chunk, pure=True)(ref, self.converter, xb, yb, mode,
                                                           dask_key_name=f"{REPRESENTATION_KEY}-{token}-{j}")
            for j, (xb, yb) in enumerate(zip(_row_blocks(x), _row_blocks(y)))
        ]
        rows = [
            [
                da.from_delayed(
                    dask.delayed(block_from, pure=True)(ref, self.converter, f, r, mode,
                                                         dask_key_name=f"{BLOCK_KEY}-{token}-{i}-{j}"),
                    shape=(n_i, n_j, *feature_shape), dtype=dtype,
                )
                for j, (r, n_j) in enumerate(zip(reps, x.chunks[0]))
            ]
            for i, (f, n_i) in enumerate(zip(factor_tasks, test_chunks))
        ]
        return da.concatenate([da.concatenate(row, axis=1) for row in rows], axis=0)

    def influences(
        self,
        x_test: da.Array,
        y_test: da.Array,
        x: Optional[da.Array] = None,
        y: Optional[da.Array] = None,
        mode: InfluenceMode = InfluenceMode.UP,
    ) -> da.Array:
        """Lazy influences (n_test, n_train[, *features]), chunked (test chunks, train chunks).
        x=None uses the test points as training points."""
        mode = InfluenceMode(mode)
        test_chunks = check_dask_pair(x_test, y_test, "x_test", "y_test")
        if (x is None) != (y is None):
            raise ValueError("x and y: give both or neither")
        if x is None:
            x, y = x_test, y_test
        check_dask_pair(x, y, "x", "y")
        _check_features(x_test, x)
        token = tokenize(self._token, x_test.name, y_test.name, x.name, y.name, mode.value)
        return self._blocks(self._factor_tasks(x_test, y_test, token), test_chunks, x, y, mode, token)

    def influences_from_factors(
        self, factors: da.Array, x: da.Array, y: da.Array, mode: InfluenceMode = InfluenceMode.UP
    ) -> da.Array:
        """Lazy influences of (x, y) on the test points behind `factors` (from influence_factors)."""
        mode = InfluenceMode(mode)
        if not isinstance(factors, da.Array) or factors.ndim != 2:
            raise TypeError("factors: expected the 2-d dask array returned by influence_factors")
        check_dask_pair(x, y, "x", "y")
        token = tokenize(self._token, factors.name, x.name, y.name, mode.value)
        f = factors.rechunk({1: -1}) if len(factors.chunks[1]) > 1 else factors
        tasks = list(f.to_delayed().reshape(-1))
        return self._blocks(tasks, tuple(int(c) for c in factors.chunks[0]), x, y, mode, token)

    # ------------------------------------------------------------------ writing a store

    def to_zarr(
        self,
        x_test: da.Array,
        y_test: da.Array,
        x: da.Array,
        y: da.Array,
        url: str,
        *,
        mode: InfluenceMode = InfluenceMode.UP,
        outputs: Optional[OutputSelection] = None,
        resume: bool = False,
        overwrite: bool = False,
        metadata: Optional[Mapping[str, Any]] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
        keep_factors: bool = False,
        max_columns_in_flight: Optional[int] = None,
    ) -> WriteSummary:
        """Compute and write the selected outputs into the zarr store at `url` (local path or
        fsspec URL; layout in kinfluence.compute.store), the workers writing block by block.

        Blocks are the (test chunk, train chunk) pairs of the inputs' row chunks, which must be
        regular (all equal, the last possibly smaller). resume=True skips blocks recorded done
        by an earlier run of the same computation (refused, listing the differences, if the
        method, parameters, fingerprints, shapes or outputs differ); overwrite=True starts
        fresh. on_progress(done_blocks, total_blocks) is called on this side as blocks finish.
        Test factors are kept in the store until it is complete (keep_factors=True: after).
        Returns a WriteSummary; a task's exception cancels the rest and is raised here.
        """
        client = self._require_client()
        mode = InfluenceMode(mode)
        test_chunks = check_dask_pair(x_test, y_test, "x_test", "y_test")
        train_chunks = check_dask_pair(x, y, "x", "y")
        _check_features(x_test, x)
        outputs = check_outputs(outputs, mode, x.shape[0])
        layout = StoreLayout(
            n_test=x_test.shape[0], n_train=x.shape[0],
            test_chunk=regular_chunk_size(test_chunks, "x_test"), train_chunk=regular_chunk_size(train_chunks, "x"),
            feature_shape=tuple(x.shape[1:]) if mode is InfluenceMode.PERTURBATION else (),
            dtype=numpy_dtype_of(self.model),
        )
        data_fp = _data_fingerprints(client, {"x_test": x_test, "y_test": y_test, "x": x, "y": y})
        handle, plan, run_id = start_write(url, storage_options, layout, outputs, mode, self.model, data_fp,
                                           metadata, resume, overwrite, on_progress)
        if plan.n_missing:
            self._write_blocks(client, handle, plan, x_test, y_test, x, y, mode, run_id, on_progress,
                               max_columns_in_flight)
        if not plan.finalized:
            _finalize_on(client, handle, keep_factors)
        return WriteSummary(url, run_id, layout.total_blocks, plan.n_done, plan.n_missing, len(plan.factors_needed),
                            layout.n_test_chunks, True, outputs.to_dict())

    def _write_blocks(
        self, client: Client, handle: StoreHandle, plan: WritePlan, x_test: da.Array, y_test: da.Array,
        x: da.Array, y: da.Array, mode: InfluenceMode, run_id: str, on_progress: Optional[ProgressCallback],
        max_columns_in_flight: Optional[int],
    ) -> None:
        ref = self.model_reference()
        conv = self.converter
        xt, yt, xs, ys = _row_blocks(x_test), _row_blocks(y_test), _row_blocks(x), _row_blocks(y)
        factor_futures: dict[int, Future] = {
            i: client.compute(dask.delayed(store_factors)(ref, conv, handle, i, xt[i], yt[i],
                                                          dask_key_name=f"store-factors-{run_id}-{i}"))
            for i in plan.factors_needed
        }
        columns = plan.columns
        pending = deque(sorted(columns))
        window = max_columns_in_flight or (len(client.scheduler_info().get("workers", {})) + 1)
        reps: dict[int, Future] = {}
        remaining: dict[int, int] = {}
        futures = as_completed()
        outstanding: set[Future] = set(factor_futures.values())

        def launch(j: int) -> None:
            rep = client.compute(dask.delayed(representation_chunk)(ref, conv, xs[j], ys[j], mode,
                                                                     dask_key_name=f"store-representation-{run_id}-{j}"))
            reps[j], remaining[j] = rep, len(columns[j])
            for i in columns[j]:
                fut = client.submit(store_block, ref, conv, handle, i, j, rep, mode, factor_futures.get(i),
                                    key=f"store-block-{run_id}-{i}-{j}", pure=False)
                outstanding.add(fut)
                futures.add(fut)

        while pending and len(reps) < max(1, window):
            launch(pending.popleft())
        done, total = plan.n_done, plan.layout.total_blocks
        try:
            for fut in futures:
                _, j = fut.result()
                outstanding.discard(fut)
                done += 1
                report(on_progress, done, total)
                remaining[j] -= 1
                if remaining[j] == 0:
                    del reps[j], remaining[j]  # drops this column's representation from the cluster
                    if pending:
                        launch(pending.popleft())
        except BaseException:
            client.cancel(list(outstanding) + list(reps.values()))
            raise
        finally:
            factor_futures.clear()


def _check_features(x_test: da.Array, x: da.Array) -> None:
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"x_test and x: feature shapes differ ({tuple(x_test.shape[1:])} and {tuple(x.shape[1:])})")


def _data_fingerprints(client: Client, arrays: Mapping[str, da.Array]) -> dict[str, str]:
    """Content fingerprint of each array, from chunk digests computed on the workers."""
    names, tasks = [], []
    for name, a in arrays.items():
        for b in a.to_delayed().reshape(-1):
            names.append(name)
            tasks.append(dask.delayed(chunk_digest, pure=True)(b))
    digests = client.gather(client.compute(tasks))
    return {name: combine_digests(d for n, d in zip(names, digests) if n == name) for name in arrays}


def _finalize_on(client: Client, handle: StoreHandle, keep_factors: bool) -> None:
    """Merge top-k candidates and values partial sums on the workers, then mark complete."""
    layout, outputs = handle.layout, handle.outputs
    assert layout is not None
    futures = []
    if outputs.top_k is not None:
        futures += [client.submit(StoreHandle.finalize_top_k, handle, i, pure=False) for i in range(layout.n_test_chunks)]
    if outputs.values is not None:
        futures += [client.submit(StoreHandle.finalize_values, handle, j, pure=False) for j in range(layout.n_train_chunks)]
    client.gather(futures)
    if not keep_factors:
        handle.drop_factors()
    handle.mark_done("finalized")
