"""The output store: a zarr v3 group at a local path or any fsspec URL (gs://, s3://, ...).

Layout (root of the group):

    influences                 (test, train[, feature_0, ...])  chunked like the blocks
    top_k_helpful_indices      (test, k) int64   largest influences first
    top_k_helpful_values       (test, k)
    top_k_harmful_indices      (test, k) int64   smallest (most negative) first
    top_k_harmful_values       (test, k)
    values                     (train[, feature_0, ...])  mean or sum over test points
    _work/                     scratch: test factors, top-k candidates, partial sums
    _completion/               one small JSON record per finished unit of work:
                               factors-<i>.json, block-<i>-<j>.json, finalized.json

Root attrs["kinfluence"] records method, parameters, mode, sign convention, model and data
fingerprints, layout, outputs, library version and the caller's metadata. A completion record
is written only after the data it covers is fully written, so a run killed at any moment
never leaves work marked done that is not; a resumed run redoes exactly the unmarked work.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Optional

import fsspec
import numpy as np
import torch
import zarr
from zarr.errors import ContainsArrayError

from .. import __version__
from .errors import InvalidDimensionChunksError, StoreExistsError, StoreMismatchError
from .fingerprint import jsonable
from .outputs import OutputSelection
from .topk import TopK, block_top_k, merge_top_k

FORMAT_VERSION = 1
ATTRS_KEY = "kinfluence"
SIGN_CONVENTION = (
    "I(z_test, z) = + grad l(z_test)^T (H + lambda I)^-1 grad l(z) (perturbation: d/dx grad l(z)); "
    "H the mean Hessian (or Gauss-Newton matrix) over training points; positive = z helps z_test"
)
#: attrs compared when resuming; a difference refuses the resume
COMPARED_ATTRS = ("format_version", "method", "parameters", "mode", "model_fingerprint", "data_fingerprint",
                  "layout", "outputs")
TOP_K_ARRAYS = ("top_k_helpful_indices", "top_k_helpful_values", "top_k_harmful_indices", "top_k_harmful_values")
_FACTOR_CHUNK_BYTES = 16 * 2**20


def regular_chunk_size(chunks: tuple[int, ...], name: str) -> int:
    """The chunk size of regular chunks (all equal but a smaller last one), or a clear error:
    the store's chunk grid is regular, and a block must cover whole zarr chunks."""
    if not chunks or any(c != c or c <= 0 for c in chunks):  # c != c: NaN (unknown size)
        raise InvalidDimensionChunksError(f"{name}: chunks {chunks} must be known positive sizes")
    size = chunks[0]
    if any(c != size for c in chunks[:-1]) or chunks[-1] > size:
        raise InvalidDimensionChunksError(
            f"{name}: chunks along the first axis are {tuple(chunks)}; writing a store needs regular chunks "
            f"(all equal, the last one possibly smaller), e.g. rechunk to {size} rows per chunk"
        )
    return int(size)


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and chunking of a store's grid of blocks."""

    n_test: int
    n_train: int
    test_chunk: int
    train_chunk: int
    feature_shape: tuple[int, ...]
    dtype: str

    @property
    def n_test_chunks(self) -> int:
        return math.ceil(self.n_test / self.test_chunk)

    @property
    def n_train_chunks(self) -> int:
        return math.ceil(self.n_train / self.train_chunk)

    @property
    def total_blocks(self) -> int:
        return self.n_test_chunks * self.n_train_chunks

    def test_slice(self, i: int) -> slice:
        return slice(i * self.test_chunk, min((i + 1) * self.test_chunk, self.n_test))

    def train_slice(self, j: int) -> slice:
        return slice(j * self.train_chunk, min((j + 1) * self.train_chunk, self.n_train))

    def to_dict(self) -> dict[str, Any]:
        return {"n_test": self.n_test, "n_train": self.n_train, "test_chunk": self.test_chunk,
                "train_chunk": self.train_chunk, "feature_shape": list(self.feature_shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreLayout":
        return cls(int(d["n_test"]), int(d["n_train"]), int(d["test_chunk"]), int(d["train_chunk"]),
                   tuple(int(s) for s in d["feature_shape"]), str(d["dtype"]))


def feature_dims(layout: StoreLayout) -> list[str]:
    return [f"feature_{k}" for k in range(len(layout.feature_shape))]


@lru_cache(maxsize=32)
def _open_group(url: str, options_json: str, mode: str) -> zarr.Group:
    options = json.loads(options_json) or None
    if "://" in url:
        return zarr.open_group(url, mode=mode, storage_options=options, zarr_format=3)
    return zarr.open_group(url, mode=mode, zarr_format=3)


@dataclass(frozen=True)
class StoreHandle:
    """A picklable reference to an output store; shipped to workers, which write their blocks."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    layout: Optional[StoreLayout] = None
    outputs: OutputSelection = OutputSelection()
    run_id: str = ""

    # ---------------------------------------------------------------- access

    def _options_json(self) -> str:
        return json.dumps(dict(self.storage_options), sort_keys=True, default=str)

    def group(self, mode: str = "r+") -> zarr.Group:
        return _open_group(self.url, self._options_json(), mode)

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **dict(self.storage_options))
        return fs, root.rstrip("/")

    def _record_path(self, name: str) -> str:
        return f"{self.fs()[1]}/_completion/{name}.json"

    def mark_done(self, name: str, info: Optional[Mapping[str, Any]] = None) -> None:
        """Write a completion record; call only after the covered data is fully written."""
        fs, _ = self.fs()
        body = {"run_id": self.run_id, "time": time.time(), **dict(info or {})}
        fs.pipe_file(self._record_path(name), json.dumps(body).encode())

    def records(self) -> dict[str, dict[str, Any]]:
        """All completion records, by name (e.g. 'block-0-3')."""
        fs, root = self.fs()
        fs.invalidate_cache()
        prefix = f"{root}/_completion"
        try:
            paths = fs.ls(prefix, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for p in paths:
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if not name.endswith(".json") or name == "zarr.json":
                continue
            try:
                out[name[:-5]] = json.loads(fs.cat_file(p))
            except (ValueError, FileNotFoundError):
                out[name[:-5]] = {}  # an unreadable record still proves its data was written first
        return out

    def completed_blocks(self, records: Optional[Mapping[str, Any]] = None) -> set[tuple[int, int]]:
        records = self.records() if records is None else records
        done = set()
        for name in records:
            if name.startswith("block-"):
                _, i, j = name.split("-")
                done.add((int(i), int(j)))
        return done

    def completed_factors(self, records: Optional[Mapping[str, Any]] = None) -> set[int]:
        records = self.records() if records is None else records
        return {int(n.split("-")[1]) for n in records if n.startswith("factors-")}

    # ---------------------------------------------------------------- work units (run on workers)

    def _layout(self) -> StoreLayout:
        if self.layout is None:
            raise ValueError("StoreHandle: has no layout (open it with prepare_store)")
        return self.layout

    def write_factors(self, i: int, factors: np.ndarray) -> None:
        """Keep test chunk i's factors (n_i, q) in the store, then record them done.

        An existing array of the same shape (a killed run's partial write, or a concurrent
        writer of the same chunk: a cancelled run's task still running, or dask rerunning
        the task after losing a worker) is written in place, never deleted and recreated:
        chunk writes replace whole chunks, so a block task reading these factors meanwhile
        sees complete factors, not a missing array or fill values."""
        group = self.group()["_work/factors"]
        n, q = factors.shape
        cols = max(1, min(q, _FACTOR_CHUNK_BYTES // max(1, n * factors.itemsize)))
        spec: dict[str, Any] = {"shape": factors.shape, "chunks": (max(n, 1), cols), "dtype": factors.dtype,
                                "dimension_names": ["test", "factor"]}
        try:
            arr = group.create_array(str(i), overwrite=False, **spec)
        except ContainsArrayError:
            arr = group[str(i)]
            if not isinstance(arr, zarr.Array) or arr.shape != factors.shape or arr.dtype != factors.dtype:
                arr = group.create_array(str(i), overwrite=True, **spec)
        arr[...] = factors
        self.mark_done(f"factors-{i}", {"shape": list(factors.shape)})

    def read_factors(self, i: int) -> np.ndarray:
        return np.asarray(self.group()[f"_work/factors/{i}"][...])

    def write_block(self, i: int, j: int, block: np.ndarray) -> None:
        """Write block (i, j) into every selected output, then record it done."""
        layout, out = self._layout(), self.outputs
        group = self.group()
        ts, trs = layout.test_slice(i), layout.train_slice(j)
        expected = (ts.stop - ts.start, trs.stop - trs.start, *layout.feature_shape)
        if tuple(block.shape) != expected:
            raise ValueError(f"block ({i}, {j}): has shape {tuple(block.shape)}, expected {expected}")
        block = block.astype(layout.dtype, copy=False)
        if out.full_matrix:
            group["influences"][ts, trs] = block
        if out.top_k is not None:
            k = out.top_k
            cand = block_top_k(torch.from_numpy(np.ascontiguousarray(block)), trs.start, k)
            cols = slice(j * k, (j + 1) * k)
            for name in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values"):
                group[f"_work/candidates_{name}"][ts, cols] = getattr(cand, name).numpy()
        if out.values is not None:
            group["_work/values_partial"][i : i + 1, trs] = block.sum(axis=0, keepdims=True)
        self.mark_done(f"block-{i}-{j}")

    def finalize_top_k(self, i: int) -> None:
        """Merge test chunk i's per-block candidates into the top-k arrays."""
        layout, k = self._layout(), self.outputs.top_k
        assert k is not None
        group = self.group()
        ts = layout.test_slice(i)
        cand = TopK(*(torch.from_numpy(np.asarray(group[f"_work/candidates_{n}"][ts]))
                      for n in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values")))
        top = merge_top_k([cand], k)
        for name in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values"):
            group[f"top_k_{name}"][ts] = getattr(top, name).numpy()

    def finalize_values(self, j: int) -> None:
        """Sum train chunk j's partial sums over test chunks into the values array."""
        layout = self._layout()
        group = self.group()
        trs = layout.train_slice(j)
        total = np.asarray(group["_work/values_partial"][:, trs]).sum(axis=0)
        if self.outputs.values == "mean":
            total = total / layout.n_test
        group["values"][trs] = total.astype(layout.dtype, copy=False)

    def drop_factors(self) -> None:
        """Delete the kept test factors (scratch) once the store is complete."""
        fs, root = self.fs()
        path = f"{root}/_work/factors"
        for p in fs.ls(path, detail=False) if fs.exists(path) else []:
            if p.rstrip("/").rsplit("/", 1)[-1] != "zarr.json":
                fs.rm(p, recursive=True)
        fs.invalidate_cache()
        _open_group.cache_clear()


# -------------------------------------------------------------------- creation and resume


def _attrs(
    layout: StoreLayout, outputs: OutputSelection, mode: str, method: str, parameters: Mapping[str, Any],
    model_fp: str, data_fp: Mapping[str, str], metadata: Optional[Mapping[str, Any]],
) -> dict[str, Any]:
    return jsonable({
        "format_version": FORMAT_VERSION,
        "method": method,
        "parameters": dict(parameters),
        "mode": mode,
        "sign_convention": SIGN_CONVENTION,
        "model_fingerprint": model_fp,
        "data_fingerprint": dict(data_fp),
        "layout": layout.to_dict(),
        "outputs": outputs.to_dict(),
        "library_version": __version__,
        "metadata": dict(metadata or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def _create(handle: StoreHandle, attrs: Mapping[str, Any]) -> None:
    layout, outputs = handle._layout(), handle.outputs
    fs, root = handle.fs()
    if not fs.exists(root):
        fs.makedirs(root, exist_ok=True)
    _open_group.cache_clear()
    group = zarr.open_group(handle.url, mode="w", storage_options=dict(handle.storage_options) or None,
                            zarr_format=3) if "://" in handle.url else zarr.open_group(handle.url, mode="w", zarr_format=3)
    feat = feature_dims(layout)
    dtype = np.dtype(layout.dtype)
    if outputs.full_matrix:
        group.create_array("influences", shape=(layout.n_test, layout.n_train, *layout.feature_shape),
                           chunks=(layout.test_chunk, layout.train_chunk, *layout.feature_shape), dtype=dtype,
                           fill_value=np.nan, dimension_names=["test", "train", *feat])
    work = group.create_group("_work")
    work.create_group("factors")
    if outputs.top_k is not None:
        k = outputs.top_k
        for name in ("helpful_indices", "helpful_values", "harmful_indices", "harmful_values"):
            is_index = name.endswith("indices")
            kw = dict(dtype=np.int64, fill_value=-1) if is_index else dict(dtype=dtype, fill_value=np.nan)
            work.create_array(f"candidates_{name}", shape=(layout.n_test, layout.n_train_chunks * k),
                              chunks=(layout.test_chunk, k), dimension_names=["test", "candidate"], **kw)
            group.create_array(f"top_k_{name}", shape=(layout.n_test, k), chunks=(layout.test_chunk, k),
                               dimension_names=["test", "k"], **kw)
    if outputs.values is not None:
        work.create_array("values_partial", shape=(layout.n_test_chunks, layout.n_train, *layout.feature_shape),
                          chunks=(1, layout.train_chunk, *layout.feature_shape), dtype=dtype, fill_value=np.nan,
                          dimension_names=["test_chunk", "train", *feat])
        group.create_array("values", shape=(layout.n_train, *layout.feature_shape),
                           chunks=(layout.train_chunk, *layout.feature_shape), dtype=dtype, fill_value=np.nan,
                           dimension_names=["train", *feat])
    group.attrs[ATTRS_KEY] = dict(attrs)
    group.create_group("_completion")  # a zarr group, so zarr and xarray accept the records beside it
    _open_group.cache_clear()


def _read_attrs(handle: StoreHandle) -> Optional[dict[str, Any]]:
    fs, root = handle.fs()
    fs.invalidate_cache()
    if not fs.exists(f"{root}/zarr.json"):
        return None
    _open_group.cache_clear()
    attrs = dict(handle.group("r").attrs)
    return attrs.get(ATTRS_KEY)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in COMPARED_ATTRS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out[f"{key}.{sub}"] = (a.get(sub), b.get(sub))
        else:
            out[key] = (a, b)
    return out


def prepare_store(
    url: str,
    storage_options: Optional[Mapping[str, Any]],
    layout: StoreLayout,
    outputs: OutputSelection,
    mode: str,
    method: str,
    parameters: Mapping[str, Any],
    model_fp: str,
    data_fp: Mapping[str, str],
    metadata: Optional[Mapping[str, Any]],
    resume: bool,
    overwrite: bool,
    run_id: str,
) -> StoreHandle:
    """Create the store (fresh, or replacing one with overwrite=True), or check that an existing
    one records the same computation before resuming into it."""
    if not isinstance(url, str) or not url:
        raise TypeError(f"url: expected a non-empty path or fsspec URL string, got {url!r}")
    if resume and overwrite:
        raise ValueError("resume and overwrite: choose one (resume keeps finished blocks, overwrite deletes them)")
    handle = StoreHandle(url, dict(storage_options or {}), layout, outputs, run_id)
    attrs = _attrs(layout, outputs, mode, method, parameters, model_fp, data_fp, metadata)
    fs, root = handle.fs()
    existing = _read_attrs(handle)
    if existing is None:
        if fs.exists(root) and fs.ls(root, detail=False) and not overwrite:
            raise StoreExistsError(f"url: {url} exists and is not a kinfluence store; pass overwrite=True to replace it")
    elif overwrite:
        pass
    elif not resume:
        raise StoreExistsError(
            f"url: {url} already holds influence results; pass resume=True to continue it or overwrite=True to start fresh"
        )
    else:
        diff = _differences(existing, attrs)
        if diff:
            raise StoreMismatchError(url, diff)
        return handle
    if fs.exists(root):
        fs.rm(root, recursive=True)
        fs.invalidate_cache()
    _create(handle, attrs)
    return handle


# -------------------------------------------------------------------- reading


@dataclass
class InfluenceStore:
    """A store opened for reading: arrays (zarr, lazy), attrs and completion status."""

    url: str
    storage_options: dict[str, Any]
    attrs: dict[str, Any]
    layout: StoreLayout
    outputs: OutputSelection
    completed_blocks: set[tuple[int, int]]
    is_complete: bool
    group: zarr.Group

    @property
    def total_blocks(self) -> int:
        return self.layout.total_blocks

    @property
    def influences(self) -> Optional[zarr.Array]:
        """The (test, train[, features]) array, or None when not selected."""
        return self.group["influences"] if self.outputs.full_matrix else None  # type: ignore[return-value]

    @property
    def values(self) -> Optional[zarr.Array]:
        return self.group["values"] if self.outputs.values is not None else None  # type: ignore[return-value]

    @property
    def top_k(self) -> Optional[dict[str, zarr.Array]]:
        """helpful_indices/helpful_values/harmful_indices/harmful_values, (test, k) each."""
        if self.outputs.top_k is None:
            return None
        return {n[len("top_k_"):]: self.group[n] for n in TOP_K_ARRAYS}  # type: ignore[misc]

    def to_xarray(self) -> Any:
        """The store as an xarray Dataset (xarray.open_zarr), with named dimensions."""
        import xarray

        options = self.storage_options or None
        return xarray.open_zarr(self.url, storage_options=options, consolidated=False, zarr_format=3)


def open_influence_store(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> InfluenceStore:
    """Open a store written by a calculator's to_zarr; raises FileNotFoundError if there is none."""
    handle = StoreHandle(url, dict(storage_options or {}))
    attrs = _read_attrs(handle)
    if attrs is None:
        raise FileNotFoundError(f"url: no kinfluence store at {url}")
    layout = StoreLayout.from_dict(attrs["layout"])
    outputs = OutputSelection(**attrs["outputs"])
    handle = StoreHandle(url, dict(storage_options or {}), layout, outputs)
    records = handle.records()
    return InfluenceStore(
        url=url, storage_options=dict(storage_options or {}), attrs=attrs, layout=layout, outputs=outputs,
        completed_blocks=handle.completed_blocks(records), is_complete="finalized" in records,
        group=handle.group("r"),
    )
