"""Chunked influence computation: sequential and dask calculators, aggregators, converters and
the resumable zarr output store. Knows nothing of Kubernetes.

Calculators (names as in pyDVL):

    SequentialInfluenceCalculator(model)
        .influence_factors(data_loader) -> LazyChunkSequence          (.compute(aggregator))
        .influences(test_loader, train_loader, mode) -> NestedLazyChunkSequence
            .compute(aggregator=NestedTorchCatAggregator())            nothing runs before this
            .to_zarr(url, converter=None, *, outputs, resume, overwrite, metadata,
                     storage_options, on_progress, keep_factors) -> WriteSummary
    DaskInfluenceCalculator(model, converter=TorchNumpyConverter(), client)
        client: a distributed.Client, or DisableClientSingleThreadCheck (the class, or
        DisableClientSingleThreadCheck(client)); a non-thread-safe model on multi-threaded
        workers raises ThreadSafetyViolationError.
        .influence_factors(x, y) -> dask array (n, q)
        .influences(x_test, y_test, x, y, mode) -> dask array (n_test, n_train[, *features])
        .influences_from_factors(factors, x, y, mode) -> dask array
        .to_zarr(x_test, y_test, x, y, url, *, mode="up", outputs=OutputSelection(),
                 resume=False, overwrite=False, metadata=None, storage_options=None,
                 on_progress=None, keep_factors=False, max_columns_in_flight=None) -> WriteSummary
            The one call a job runner needs: on the calculator's client, writes the selected
            outputs (full matrix, top-k, values) into a zarr v3 store at a local path or any
            fsspec URL, calling on_progress(done_blocks, total_blocks) as blocks finish.

Output store (see kinfluence.compute.store for the layout):

    OutputSelection(full_matrix=True, top_k=None | int, values=None | "mean" | "sum")
    open_influence_store(url, storage_options=None) -> InfluenceStore
        .influences / .top_k (dict of 4 arrays) / .values  (zarr arrays or None)
        .attrs (method, parameters, mode, sign convention, fingerprints, layout, outputs,
        library version, metadata), .completed_blocks, .total_blocks, .is_complete,
        .to_xarray()
    WriteSummary: total_blocks, skipped_blocks, computed_blocks, computed_factor_chunks, run_id

Aggregators (subclass BlockAggregator for your own): NestedTorchCatAggregator (full tensor),
TopKAggregator(k) (TopK: most helpful/harmful per test point, streamed), MinAggregator,
MaxAggregator (per test point), ValuesAggregator("mean" | "sum") (per training point);
TorchCatAggregator concatenates factor chunks.

Errors: ThreadSafetyViolationError, UnalignedChunksError, InvalidDimensionChunksError,
StoreExistsError, StoreMismatchError (resume into a store of another computation).
"""

from .aggregators import (
    BlockAggregator,
    ChunkAggregator,
    InfluenceBlock,
    MaxAggregator,
    MinAggregator,
    NestedTorchCatAggregator,
    TopKAggregator,
    TorchCatAggregator,
    ValuesAggregator,
)
from .converters import NumpyConverter, TorchNumpyConverter, torch_dataset_to_dask_array
from .dask_calculator import DaskInfluenceCalculator, DisableClientSingleThreadCheck
from .errors import (
    InvalidDimensionChunksError,
    StoreExistsError,
    StoreMismatchError,
    ThreadSafetyViolationError,
    UnalignedChunksError,
)
from .outputs import OutputSelection, WriteSummary
from .sequential import LazyChunkSequence, NestedLazyChunkSequence, SequentialInfluenceCalculator
from .store import SIGN_CONVENTION, InfluenceStore, open_influence_store
from .topk import TopK

__all__ = [
    "BlockAggregator",
    "ChunkAggregator",
    "DaskInfluenceCalculator",
    "DisableClientSingleThreadCheck",
    "InfluenceBlock",
    "InfluenceStore",
    "InvalidDimensionChunksError",
    "LazyChunkSequence",
    "MaxAggregator",
    "MinAggregator",
    "NestedLazyChunkSequence",
    "NestedTorchCatAggregator",
    "NumpyConverter",
    "OutputSelection",
    "SIGN_CONVENTION",
    "SequentialInfluenceCalculator",
    "StoreExistsError",
    "StoreMismatchError",
    "ThreadSafetyViolationError",
    "TopK",
    "TopKAggregator",
    "TorchCatAggregator",
    "TorchNumpyConverter",
    "UnalignedChunksError",
    "ValuesAggregator",
    "WriteSummary",
    "open_influence_store",
    "torch_dataset_to_dask_array",
]
