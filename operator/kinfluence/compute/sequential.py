"""The sequential calculator: influences over data loaders, chunk by chunk, in one process.

Nothing is computed until `compute(aggregator)` or `to_zarr(...)`. Each test chunk's factors
are computed once; each train chunk's representation is computed once and multiplied against
every test chunk's factors (train chunks outer), so the expensive solves never repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from ..influence.base import InfluenceFunctionModel, check_xy
from ..influence.modes import InfluenceMode
from .aggregators import BlockAggregator, ChunkAggregator, InfluenceBlock, NestedTorchCatAggregator, TorchCatAggregator
from .converters import NumpyConverter, TorchNumpyConverter
from .fingerprint import chunk_digest, combine_digests
from .outputs import OutputSelection, WriteSummary
from .plan import ProgressCallback, check_outputs, numpy_dtype_of, report, start_write
from .store import StoreLayout, regular_chunk_size

Loader = Iterable[tuple[Tensor, Tensor]]


def check_loader(loader: Any, name: str) -> Loader:
    """A loader must be re-iterable, in a fixed order, and yield (x, y) tensor pairs."""
    if loader is None or not hasattr(loader, "__iter__"):
        raise TypeError(f"{name}: expected an iterable of (x, y) tensor batches (e.g. a DataLoader), got {type(loader).__name__}")
    if iter(loader) is loader:
        raise TypeError(f"{name}: is a one-shot iterator; pass a re-iterable loader (a DataLoader or a list of batches)")
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, RandomSampler):
        raise ValueError(f"{name}: shuffles (RandomSampler); every pass must see the same order: use shuffle=False")
    return loader


def _batches(loader: Loader, name: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(row offset, x, y) per batch, checked."""
    start = 0
    for k, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{name}: batch {k} is not an (x, y) pair")
        x, y = batch
        check_xy(x, y, f"{name} x (batch {k})", f"{name} y (batch {k})")
        yield start, x, y
        start += len(x)


@dataclass(frozen=True)
class _LoaderFacts:
    """Sizes, chunking and content digests from one pass over a loader."""

    n: int
    chunks: tuple[int, ...]
    feature_shape: tuple[int, ...]
    x_digest: str
    y_digest: str


def _scan(loader: Loader, name: str) -> _LoaderFacts:
    sizes, xd, yd, shape = [], [], [], None
    for _, x, y in _batches(loader, name):
        sizes.append(len(x))
        xd.append(chunk_digest(x.detach().cpu().numpy()))
        yd.append(chunk_digest(y.detach().cpu().numpy()))
        shape = tuple(x.shape[1:])
    if not sizes:
        raise ValueError(f"{name}: is empty (no batches)")
    return _LoaderFacts(sum(sizes), tuple(sizes), shape or (), combine_digests(xd), combine_digests(yd))


class LazyChunkSequence:
    """Row chunks of a result (the influence factors), computed only by `compute`."""

    def __init__(self, model: InfluenceFunctionModel, loader: Loader) -> None:
        self._model, self._loader = model, loader

    def chunks(self) -> Iterator[tuple[slice, Tensor]]:
        """(rows, factors) per test chunk, computed lazily as the iterator advances."""
        for start, x, y in _batches(self._loader, "data_loader"):
            yield slice(start, start + len(x)), self._model.influence_factors(x, y)

    def compute(self, aggregator: Optional[ChunkAggregator] = None) -> Any:
        """Compute every chunk and aggregate (default: concatenate into one tensor)."""
        agg = aggregator if aggregator is not None else TorchCatAggregator()
        parts = list(self.chunks())
        agg.start(parts[-1][0].stop if parts else 0)
        for index, (rows, f) in enumerate(parts):
            agg.add(index, rows, f)
        return agg.result()


class NestedLazyChunkSequence:
    """The grid of influence blocks (test chunks x train chunks), computed only on demand."""

    def __init__(self, model: InfluenceFunctionModel, test_loader: Loader, train_loader: Loader, mode: InfluenceMode) -> None:
        self._model = model
        self._test, self._train = test_loader, train_loader
        self.mode = mode

    def blocks(self) -> Iterator[InfluenceBlock]:
        """All blocks, train chunks outer: test factors are computed once each and kept in
        memory (n_test x q), each train representation once."""
        factors = [(i, slice(s, s + len(x)), self._model.influence_factors(x, y))
                   for i, (s, x, y) in enumerate(_batches(self._test, "test_loader"))]
        for j, (s, x, y) in enumerate(_batches(self._train, "train_loader")):
            rep = self._model.train_representation(x, y, self.mode)
            for i, rows, f in factors:
                data = self._model.influences_from_representations(f.to(rep.device, rep.dtype), rep, self.mode)
                yield InfluenceBlock(i, j, rows, slice(s, s + len(x)), data)

    def compute(self, aggregator: Optional[BlockAggregator] = None) -> Any:
        """Compute every block and aggregate (default: the full tensor)."""
        agg = aggregator if aggregator is not None else NestedTorchCatAggregator()
        n_test = sum(len(x) for _, x, _ in _batches(self._test, "test_loader"))
        n_train = sum(len(x) for _, x, _ in _batches(self._train, "train_loader"))
        agg.start(n_test, n_train)
        for block in self.blocks():
            agg.add(block)
        return agg.result()

    def to_zarr(
        self,
        url: str,
        converter: Optional[NumpyConverter] = None,
        *,
        outputs: Optional[OutputSelection] = None,
        resume: bool = False,
        overwrite: bool = False,
        metadata: Optional[Mapping[str, Any]] = None,
        storage_options: Optional[Mapping[str, Any]] = None,
        on_progress: Optional[ProgressCallback] = None,
        keep_factors: bool = False,
    ) -> WriteSummary:
        """Write the selected outputs block by block into a zarr store at `url` (see
        kinfluence.compute.store for the layout); memory stays bounded by the chunk sizes.

        The loaders' batches are the blocks: batches must be regular (all the same size but
        a smaller last one). resume=True skips blocks recorded as done by an earlier run of
        the same computation; overwrite=True deletes an existing store first.
        """
        converter = converter if converter is not None else TorchNumpyConverter()
        model, mode = self._model, self.mode
        test, train = _scan(self._test, "test_loader"), _scan(self._train, "train_loader")
        outputs = check_outputs(outputs, mode, train.n)
        layout = StoreLayout(
            n_test=test.n, n_train=train.n,
            test_chunk=regular_chunk_size(test.chunks, "test_loader"),
            train_chunk=regular_chunk_size(train.chunks, "train_loader"),
            feature_shape=train.feature_shape if mode is InfluenceMode.PERTURBATION else (),
            dtype=numpy_dtype_of(model),
        )
        data_fp = {"x_test": test.x_digest, "y_test": test.y_digest, "x": train.x_digest, "y": train.y_digest}
        handle, plan, run_id = start_write(url, storage_options, layout, outputs, mode, model, data_fp,
                                           metadata, resume, overwrite, on_progress)
        total, done = layout.total_blocks, plan.n_done
        needed = set(plan.factors_needed)
        columns = plan.columns
        for i, (_, x, y) in enumerate(_batches(self._test, "test_loader")):
            if i in needed:
                handle.write_factors(i, converter.to_numpy(model.influence_factors(x, y)))
        for j, (_, x, y) in enumerate(_batches(self._train, "train_loader")):
            if j not in columns:
                continue
            rep = model.train_representation(x, y, mode)
            for i in columns[j]:
                f = torch.as_tensor(handle.read_factors(i)).to(rep.device, rep.dtype)
                handle.write_block(i, j, converter.to_numpy(model.influences_from_representations(f, rep, mode)))
                done += 1
                report(on_progress, done, total)
        if not plan.finalized:
            finalize_store(handle, [lambda i=i: handle.finalize_top_k(i) for i in range(layout.n_test_chunks)]
                           if outputs.top_k is not None else [],
                           [lambda j=j: handle.finalize_values(j) for j in range(layout.n_train_chunks)]
                           if outputs.values is not None else [], keep_factors)
        return WriteSummary(url, run_id, total, plan.n_done, plan.n_missing, len(needed),
                            layout.n_test_chunks, True, outputs.to_dict())


def finalize_store(handle: Any, top_k_units: list[Any], values_units: list[Any], keep_factors: bool) -> None:
    """Run the finalizing units in-process, then record the store complete."""
    for unit in [*top_k_units, *values_units]:
        unit()
    if not keep_factors:
        handle.drop_factors()
    handle.mark_done("finalized")


class SequentialInfluenceCalculator:
    """Influences over data loaders, chunk by chunk, in this process (the loaders' batches
    are the chunks)."""

    def __init__(self, model: InfluenceFunctionModel) -> None:
        if not isinstance(model, InfluenceFunctionModel):
            raise TypeError(f"model: expected a fitted InfluenceFunctionModel, got {type(model).__name__}")
        model._require_fitted()
        self.model = model

    def influence_factors(self, data_loader: Loader) -> LazyChunkSequence:
        """Lazy factors (H + lambda)^-1 grad l(z) of every batch of `data_loader`."""
        return LazyChunkSequence(self.model, check_loader(data_loader, "data_loader"))

    def influences(
        self, test_loader: Loader, train_loader: Loader, mode: InfluenceMode = InfluenceMode.UP
    ) -> NestedLazyChunkSequence:
        """Lazy influences of every training batch on every test batch."""
        return NestedLazyChunkSequence(self.model, check_loader(test_loader, "test_loader"),
                                       check_loader(train_loader, "train_loader"), InfluenceMode(mode))
