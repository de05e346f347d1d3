"""`kinfluence inspect`: what an output store holds — shape, method, completion, the value
distribution, the most helpful/harmful training points of chosen test points, and a figure."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from .errors import JobError, LoadError

_SAMPLE_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Ranked:
    """Training points ranked for one test point: most helpful first, most harmful first."""

    test_index: int
    helpful: list[tuple[int, float]]
    harmful: list[tuple[int, float]]


def open_store(url: str, storage_options: Optional[dict[str, Any]] = None) -> Any:
    """The compute layer's store reader, with a field-naming error when there is no store."""
    from kinfluence.compute import open_influence_store

    try:
        return open_influence_store(url, storage_options)
    except FileNotFoundError:
        raise LoadError(f"url: no kinfluence output store at {url!r}") from None
    except (ValueError, OSError, KeyError) as err:
        raise LoadError(f"url: cannot read the store at {url!r}: {err}") from None


def ranked(store: Any, test_index: int, top: int) -> Ranked:
    """Top `top` helpful and harmful training points of one test point, from the top-k arrays
    when the store has them (and they are long enough), else from its row of the matrix."""
    n_test = store.layout.n_test
    if not 0 <= test_index < n_test:
        raise JobError(f"--test-index: {test_index} is outside the {n_test} test points (0..{n_test - 1})")
    tk = store.top_k
    if tk is not None and (store.influences is None or store.outputs.top_k >= top):
        k = min(top, store.outputs.top_k)
        row = {name: np.asarray(a[test_index, :k]) for name, a in tk.items()}
        helpful = [(int(i), float(v)) for i, v in zip(row["helpful_indices"], row["helpful_values"]) if i >= 0]
        harmful = [(int(i), float(v)) for i, v in zip(row["harmful_indices"], row["harmful_values"]) if i >= 0]
        return Ranked(test_index, helpful, harmful)
    if store.influences is None or store.influences.ndim != 2:
        raise JobError("url: the store has neither top-k arrays nor an (test, train) influence matrix to rank")
    row = np.asarray(store.influences[test_index])
    valid = np.flatnonzero(~np.isnan(row))
    order = valid[np.argsort(row[valid], kind="stable")]
    helpful = [(int(j), float(row[j])) for j in order[::-1][:top]]
    harmful = [(int(j), float(row[j])) for j in order[:top]]
    return Ranked(test_index, helpful, harmful)


def value_summary(store: Any) -> Optional[dict[str, float]]:
    """Quantiles of the influence values (over at most ~2M entries: the first test rows)."""
    arr = store.influences
    if arr is None:
        return None
    per_row = int(np.prod(arr.shape[1:])) or 1
    rows = max(1, min(arr.shape[0], _SAMPLE_ENTRIES // per_row))
    values = np.asarray(arr[:rows]).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None
    q = np.quantile(values, [0.0, 0.01, 0.5, 0.99, 1.0])
    return {
        "rows": float(rows),
        "min": float(q[0]), "p1": float(q[1]), "median": float(q[2]), "p99": float(q[3]), "max": float(q[4]),
        "mean": float(values.mean()), "positive": float((values > 0).mean()),
    }


def describe(store: Any, test_indices: Sequence[int], top: int, out: TextIO = sys.stdout) -> list[Ranked]:
    """Print the summary of a store; returns the rankings shown."""
    attrs = store.attrs
    layout = store.layout
    meta = attrs.get("metadata", {})
    print(f"store    {store.url}", file=out)
    job = meta.get("job")
    if isinstance(job, dict) and job.get("name"):
        print(f"job      {job['name']} (fingerprint {str(job.get('fingerprint', '?'))[:19]})", file=out)
    params = attrs.get("parameters", {})
    reg = params.get("regularization")
    print(f"method   {attrs.get('method')} (mode {attrs.get('mode')}, regularization {reg}, "
          f"{params.get('second_order_mode', '?')})", file=out)
    feat = f" x features {tuple(layout.feature_shape)}" if layout.feature_shape else ""
    print(f"shape    test {layout.n_test} x train {layout.n_train}{feat}, {layout.dtype}; "
          f"chunks {layout.test_chunk} x {layout.train_chunk}", file=out)
    written = [name for name, on in (("influences", store.outputs.full_matrix),
                                     (f"top-{store.outputs.top_k}", store.outputs.top_k),
                                     (f"values ({store.outputs.values})", store.outputs.values)) if on]
    print(f"outputs  {', '.join(written)}", file=out)
    done = len(store.completed_blocks)
    state = "complete" if store.is_complete else "INCOMPLETE (run the job again to resume)"
    print(f"blocks   {done}/{store.total_blocks} ({100.0 * done / max(store.total_blocks, 1):.1f}%), {state}", file=out)
    summary = value_summary(store)
    if summary:
        sample = "" if summary["rows"] >= layout.n_test else f" (first {int(summary['rows'])} test points)"
        print(f"values   min {summary['min']:.4g}  p1 {summary['p1']:.4g}  median {summary['median']:.4g}  "
              f"p99 {summary['p99']:.4g}  max {summary['max']:.4g}  mean {summary['mean']:.4g}  "
              f"positive {100 * summary['positive']:.1f}%{sample}", file=out)
    print("sign     positive = the training point helps the test point (removing it raises the test loss)", file=out)
    rankings = []
    if store.outputs.full_matrix and layout.feature_shape:
        return rankings
    for i in test_indices:
        r = ranked(store, i, top)
        rankings.append(r)
        print(f"test {i}:", file=out)
        print("  most helpful  " + "  ".join(f"#{j} ({v:+.4g})" for j, v in r.helpful), file=out)
        print("  most harmful  " + "  ".join(f"#{j} ({v:+.4g})" for j, v in r.harmful), file=out)
    return rankings


# ------------------------------------------------------------------------------ figure


def _as_image(row: np.ndarray, image_shape: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """A feature row as an image: reshaped to the data's `image_shape` attribute when it has one;
    else (H, W), (C, H, W) or (H, W, C) arrays, or vectors of at least 8 x 8 square pixels
    (a shorter square vector is more likely a table row than an image)."""
    if image_shape and int(np.prod(image_shape)) == row.size:
        row = row.reshape(tuple(image_shape))
    elif row.ndim == 1:
        side = int(round(math.sqrt(row.size)))
        return row.reshape(side, side) if side * side == row.size and side >= 8 else None
    if row.ndim == 2:
        return row
    if row.ndim == 3 and row.shape[0] in (1, 3):
        return np.moveaxis(row, 0, -1).squeeze()
    if row.ndim == 3 and row.shape[-1] in (1, 3):
        return row.squeeze()
    return None


@dataclass(frozen=True)
class _Data:
    """The job's train and test data (lazy arrays) and the shape of one image, if declared."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    image_shape: Optional[tuple[int, ...]]


def _image_shape(src: Any) -> Optional[tuple[int, ...]]:
    """The `image_shape` attribute of a zarr data source's features array or of its group."""
    from .loading import open_group

    if src.format != "zarr":
        return None
    try:
        group = open_group(src, "spec.data.test")
        shape = group[src.features].attrs.get("image_shape") or group.attrs.get("image_shape")
    except (JobError, KeyError):
        return None
    return tuple(int(s) for s in shape) if isinstance(shape, (list, tuple)) and shape else None


def _data_from_metadata(store: Any) -> Optional[_Data]:
    """Train and test data (x, y) named by the job recorded in the store, if readable."""
    from .loading import load_dataset
    from .spec import DataSource

    spec = store.attrs.get("metadata", {}).get("spec", {})
    data = spec.get("data")
    if not data:
        return None
    try:
        train_src, test_src = DataSource.model_validate(data["train"]), DataSource.model_validate(data["test"])
        train = load_dataset(train_src, "spec.data.train")
        test = load_dataset(test_src, "spec.data.test")
    except (JobError, ValueError, KeyError):
        return None
    return _Data(train.x, train.y, test.x, test.y, _image_shape(test_src))


def plot(store: Any, rankings: Sequence[Ranked], path: str) -> str:
    """For each test point: its image beside its most helpful and most harmful training images
    (image data), or bar charts of the influence values (other data). Returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _data_from_metadata(store)
    top = max((len(r.helpful) for r in rankings), default=1)
    shape = data.image_shape if data is not None else None
    images = data is not None and _as_image(np.asarray(data.x_test[0]), shape) is not None
    if images:
        assert data is not None
        what = "test images beside their most helpful and most harmful training images"
        fig, axes = plt.subplots(2 * len(rankings), top + 1, figsize=(1.6 * (top + 1), 3.4 * len(rankings)), squeeze=False)
        for r_i, r in enumerate(rankings):
            test_img = _as_image(np.asarray(data.x_test[r.test_index]), shape)
            for half, (label, items) in enumerate((("helpful", r.helpful), ("harmful", r.harmful))):
                row = axes[2 * r_i + half]
                row[0].imshow(test_img, cmap="gray_r")
                row[0].set_title(f"test {r.test_index} y={np.asarray(data.y_test[r.test_index])}\nmost {label}", fontsize=8)
                for c in range(top):
                    ax = row[c + 1]
                    if c < len(items):
                        j, v = items[c]
                        ax.imshow(_as_image(np.asarray(data.x_train[j]), shape), cmap="gray_r")
                        ax.set_title(f"#{j} y={np.asarray(data.y_train[j])}\n{v:+.3g}", fontsize=7)
                for ax in row:
                    ax.set_xticks([])
                    ax.set_yticks([])
    else:
        what = "bar charts of the most helpful and most harmful training points' influences"
        fig, axes = plt.subplots(len(rankings), 1, figsize=(8, 2.5 * len(rankings)), squeeze=False)
        for ax, r in zip(axes[:, 0], rankings):
            items = r.helpful + r.harmful[::-1]
            ax.bar(range(len(items)), [v for _, v in items], color=["tab:green"] * len(r.helpful) + ["tab:red"] * len(r.harmful))
            ax.set_xticks(range(len(items)), [f"#{j}" for j, _ in items], fontsize=7, rotation=90)
            ax.set_title(f"test {r.test_index}: most helpful (green) and harmful (red) training points", fontsize=9)
            ax.axhline(0, color="black", linewidth=0.5)
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as err:  # no such folder, not writable, unknown file extension
        raise JobError(f"--plot: cannot write {path!r}: {getattr(err, 'strerror', None) or err}") from None
    finally:
        plt.close(fig)
    return what


def _check_plot_path(path: str) -> None:
    """Refuse a figure path matplotlib cannot write, before anything is printed."""
    import os

    from matplotlib.backend_bases import FigureCanvasBase

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise JobError(f"--plot: cannot write {path!r}: no folder {folder!r}")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise JobError(f"--plot: cannot write {path!r}: expected a file name ending in one of "
                       f"{', '.join('.' + f for f in sorted(formats))}")


def inspect_store(
    url: str,
    test_indices: Optional[Sequence[int]] = None,
    top: int = 5,
    plot_path: Optional[str] = None,
    out: TextIO = sys.stdout,
    storage_options: Optional[dict[str, Any]] = None,
) -> int:
    """The `kinfluence inspect` command; returns the exit status."""
    if plot_path:
        _check_plot_path(plot_path)
    store = open_store(url, storage_options)
    indices = list(test_indices) if test_indices else list(range(min(3, store.layout.n_test)))
    rankings = describe(store, indices, top, out)
    if plot_path:
        if not rankings:
            raise JobError("--plot: needs rankings of training points (up-weighting mode)")
        what = plot(store, rankings, plot_path)
        print(f"figure   {plot_path}: {what}", file=out)
    return 0
