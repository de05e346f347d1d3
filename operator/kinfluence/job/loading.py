"""Loading what a spec names: the model (entrypoint + weights, or a torch.export program),
the loss, and the data (zarr groups or .npy files at fsspec URLs, as lazy dask arrays).

Every failure is a LoadError naming the spec field and the file; nothing here unpickles
arbitrary objects (weights go through torch.load(weights_only=True)).
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import dask.array as da
import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoadError
from .spec import DataSource, InfluenceJobSpec, ModelSource

LossFn = Callable[[Tensor, Tensor], Tensor]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------ entrypoints


def _a(noun: str) -> str:
    """The noun with its indefinite article ("an int", "a list")."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def import_entrypoint(ref: str, field: str) -> Callable[..., Any]:
    """The callable behind `package.module:attr.path`."""
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise LoadError(f"{field}: expected `package.module:callable`, got {ref!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise LoadError(
            f"{field}: cannot import module {module_name!r} ({err}); it must be importable on every "
            "worker (installed, or on PYTHONPATH)"
        ) from None
    except Exception as err:  # the user's module raised while importing
        raise LoadError(f"{field}: importing {module_name!r} failed: {type(err).__name__}: {err}") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{field}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError(f"{field}: {ref!r} is {_a(type(obj).__name__)}, not a callable")
    return obj


# ------------------------------------------------------------------------------ model


def _open_bytes(url: str, storage_options: dict[str, Any], field: str) -> bytes:
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            return f.read()
    except FileNotFoundError:
        raise LoadError(f"{field}: no such file {url!r}") from None
    except (ImportError, ValueError) as err:
        raise LoadError(f"{field}: cannot open {url!r}: {err}") from None
    except OSError as err:
        raise LoadError(f"{field}: cannot read {url!r}: {err}") from None


def load_state_dict_file(url: str, storage_options: dict[str, Any], field: str = "spec.model.weights") -> dict[str, Tensor]:
    """A state_dict from a torch.save file, loaded with weights_only=True."""
    import io

    raw = _open_bytes(url, storage_options, field)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(
            f"{field}: {url!r} is not a weights-only state_dict (torch.load(weights_only=True) refused it: {first})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LoadError(f"{field}: {url!r} does not hold a state_dict (a mapping of names to tensors)")
    return state


def apply_weights(module: nn.Module, state: dict[str, Tensor], url: str, field: str = "spec.model.weights") -> None:
    """Load `state` into `module`, refusing missing, unexpected or wrongly shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches {shapes}")
        raise LoadError(f"{field}: {url!r} does not match the model: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def build_model(source: ModelSource, field: str = "spec.model") -> nn.Module:
    """The network the spec names, weights loaded, in eval mode, on its device and dtype."""
    if source.program is not None:
        module = _load_program(source.program, source.storage_options, f"{field}.program")
    else:
        assert source.entrypoint is not None
        factory = import_entrypoint(source.entrypoint, f"{field}.entrypoint")
        try:
            module = factory()
        except Exception as err:
            raise LoadError(
                f"{field}.entrypoint: calling {source.entrypoint}() failed: {type(err).__name__}: {err}"
            ) from None
        if not isinstance(module, nn.Module):
            raise LoadError(
                f"{field}.entrypoint: {source.entrypoint}() returned {_a(type(module).__name__)}, "
                "not a torch.nn.Module"
            )
        if source.weights is not None:
            state = load_state_dict_file(source.weights, source.storage_options, f"{field}.weights")
            apply_weights(module, state, source.weights, f"{field}.weights")
    module = module.to(device=resolve_device(source.device), dtype=_DTYPES[source.dtype])
    if source.program is None:  # an exported program is traced in eval mode and refuses .eval()
        module.eval()
    return module


def _load_program(url: str, storage_options: dict[str, Any], field: str) -> nn.Module:
    import io

    raw = _open_bytes(url, storage_options, field)
    try:
        program = torch.export.load(io.BytesIO(raw))
    except Exception as err:
        raise LoadError(f"{field}: {url!r} is not a torch.export program ({type(err).__name__}: {err})") from None
    module = program.module()
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def resolve_device(device: str) -> torch.device:
    """auto -> the worker's GPU if it has one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LoadError("spec.model.device: cuda requested but this worker has no GPU")
    return torch.device(device)


_cache_lock = threading.Lock()
_model_cache: dict[str, nn.Module] = {}


def cached_model(source: ModelSource) -> nn.Module:
    """build_model, once per process and model source (what each dask worker calls)."""
    key = source.model_dump_json()
    with _cache_lock:
        if key not in _model_cache:
            _model_cache[key] = build_model(source)
        return _model_cache[key]


def model_fingerprint(module: nn.Module) -> str:
    """sha256 of the module's parameter and buffer values (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64 if t.is_floating_point() else None).contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ loss


def _as_target(out: Tensor, y: Tensor) -> Tensor:
    """y in the shape and dtype of the outputs (a (n,) target against (n, 1) outputs)."""
    if y.shape != out.shape and y.numel() == out.numel():
        y = y.reshape(out.shape)
    return y.to(out.dtype)


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross entropy of logits against class indices."""
    return F.cross_entropy(out, y.long() if not y.is_floating_point() or y.dim() < out.dim() else y)


def mse(out: Tensor, y: Tensor) -> Tensor:
    """Mean squared error (targets reshaped to the outputs' shape)."""
    return F.mse_loss(out, _as_target(out, y))


def nll(out: Tensor, y: Tensor) -> Tensor:
    """Mean negative log-likelihood of log-probabilities against class indices."""
    return F.nll_loss(out, y.long())


def bce_with_logits(out: Tensor, y: Tensor) -> Tensor:
    """Mean binary cross entropy of logits against 0/1 targets."""
    return F.binary_cross_entropy_with_logits(out, _as_target(out, y))


NAMED_LOSSES: dict[str, LossFn] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
    "nll": nll,
    "bce_with_logits": bce_with_logits,
}


def resolve_loss(name: str, field: str = "spec.loss") -> LossFn:
    """A named loss, or the callable behind an entrypoint."""
    if name in NAMED_LOSSES:
        return NAMED_LOSSES[name]
    if ":" in name:
        return import_entrypoint(name, field)
    raise LoadError(f"{field}: unknown loss {name!r}; expected one of {', '.join(NAMED_LOSSES)} or an entrypoint")


# ------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class NpyFile:
    """A lazily read .npy file at an fsspec URL: rows are fetched by byte range."""

    url: str
    storage_options: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any]) -> "NpyFile":
        with fsspec.open(url, "rb", **storage_options) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered .npy files cannot be read by rows; save with C order")
        if dtype.hasobject:
            raise ValueError("holds Python objects; only numeric arrays are supported")
        return cls(url, tuple(sorted(storage_options.items())), tuple(shape), dtype, offset)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows = key[0] if key else slice(None)
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (rows, rows + 1, 1)
        stop = max(stop, start)
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with fsspec.open(self.url, "rb", **dict(self.storage_options)) as f:
            f.seek(self.offset + start * row_bytes)
            raw = f.read((stop - start) * row_bytes)
        block = np.frombuffer(raw, dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        out = block[::step]
        return out[(slice(None),) + key[1:]] if not isinstance(rows, int) else out[0][key[1:]]


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def open_array(src: DataSource, which: str, field: str) -> da.Array:
    """One named array of a data source as a dask array (nothing read but metadata)."""
    name = getattr(src, which)
    if src.format == "npy":
        file = name if name.endswith(".npy") else name + ".npy"
        url = _join(src.url, file)
        try:
            arr = NpyFile.open(url, src.storage_options)
        except FileNotFoundError:
            raise LoadError(f"{field}.{which}: no file {file!r} in {src.url!r}") from None
        except (ValueError, OSError) as err:
            raise LoadError(f"{field}.{which}: {url!r} is not a readable .npy file ({err})") from None
        return da.from_array(arr, chunks=(min(max(arr.shape[0], 1), 4096),) + arr.shape[1:], asarray=False, name=f"npy-{hashlib.sha1((url + str(arr.shape)).encode()).hexdigest()}")
    group = open_group(src, field)
    try:
        node = group[name]
    except KeyError:
        names = sorted(group.array_keys())
        raise LoadError(f"{field}.{which}: no array {name!r} in the zarr group {src.url!r} (arrays: {', '.join(names) or 'none'})") from None
    import zarr

    if not isinstance(node, zarr.Array):
        raise LoadError(f"{field}.{which}: {name!r} in {src.url!r} is a group, not an array")
    return da.from_zarr(node)


def open_group(src: DataSource, field: str) -> Any:
    """The zarr group at a data source's URL, read-only."""
    import zarr

    kwargs: dict[str, Any] = {"mode": "r"}
    if src.storage_options:
        kwargs["storage_options"] = src.storage_options
    try:
        return zarr.open_group(src.url, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise LoadError(f"{field}.url: no zarr group at {src.url!r}") from None
    except (ImportError, ValueError, OSError, TypeError) as err:
        raise LoadError(f"{field}.url: cannot open {src.url!r} as a zarr group: {err}") from None


@dataclass(frozen=True)
class Dataset:
    """x and y of one data source, lazily, restricted to its index range."""

    x: da.Array
    y: da.Array

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(src: DataSource, field: str, chunk: Optional[int] = None) -> Dataset:
    """x and y of a data source as dask arrays, checked, sliced, chunked by rows."""
    x = open_array(src, "features", field)
    y = open_array(src, "targets", field)
    for which, arr in (("features", x), ("targets", y)):
        if arr.ndim == 0:
            raise LoadError(f"{field}.{which}: is a scalar; expected one row per data point")
    if x.shape[0] != y.shape[0]:
        raise LoadError(f"{field}: features ({src.features!r}) and targets ({src.targets!r}) have different lengths ({x.shape[0]} and {y.shape[0]})")
    n = int(x.shape[0])
    start = src.start or 0
    stop = n if src.stop is None else src.stop
    if stop > n:
        raise LoadError(f"{field}.stop: {stop} is beyond the {n} points of {src.url!r}")
    if start >= stop:
        raise LoadError(f"{field}.start: {start} leaves no points (the data has {n})")
    x, y = x[start:stop], y[start:stop]
    if chunk is not None:
        x = x.rechunk((chunk,) + x.shape[1:])
        y = y.rechunk((chunk,) + y.shape[1:])
    return Dataset(x, y)


def load_data(spec: InfluenceJobSpec) -> tuple[Dataset, Dataset]:
    """Train and test data, checked against each other (feature and target shapes)."""
    train = load_dataset(spec.data.train, "spec.data.train", spec.chunks.train)
    test = load_dataset(spec.data.test, "spec.data.test", spec.chunks.test)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise LoadError(
            f"spec.data.test.features: feature shape {tuple(test.x.shape[1:])} differs from the training "
            f"data's {tuple(train.x.shape[1:])}"
        )
    if train.y.shape[1:] != test.y.shape[1:]:
        raise LoadError(
            f"spec.data.test.targets: target shape {tuple(test.y.shape[1:])} differs from the training "
            f"data's {tuple(train.y.shape[1:])}"
        )
    return train, test


def data_fingerprint(spec: InfluenceJobSpec, train: Dataset, test: Dataset) -> dict[str, Any]:
    """What identifies the data: URLs, names, ranges, shapes, dtypes (contents are not hashed)."""
    def one(src: DataSource, d: Dataset) -> dict[str, Any]:
        return {
            "url": src.url,
            "features": src.features,
            "targets": src.targets,
            "start": src.start or 0,
            "n": len(d),
            "xShape": list(d.x.shape),
            "xDtype": str(d.x.dtype),
            "yShape": list(d.y.shape),
            "yDtype": str(d.y.dtype),
        }

    return {"train": one(spec.data.train, train), "test": one(spec.data.test, test)}
