"""Writing the zarr store: contents against in-memory influences(), layout readable by xarray,
attrs, resume / overwrite / refusal, and the chunking the store needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray

import kinfluence
from compute_problems import make_problem
from kinfluence.compute import (
    SIGN_CONVENTION,
    DaskInfluenceCalculator,
    InvalidDimensionChunksError,
    OutputSelection,
    SequentialInfluenceCalculator,
    StoreExistsError,
    StoreMismatchError,
    TorchNumpyConverter,
    open_influence_store,
)

ALL = OutputSelection(full_matrix=True, top_k=3, values="mean")


def _check_against_reference(store_url: str, reference: np.ndarray, k: int = 3, reduction: str = "mean") -> None:
    store = open_influence_store(store_url)
    assert store.is_complete and len(store.completed_blocks) == store.total_blocks
    assert np.abs(store.influences[...] - reference).max() <= 1e-10
    full = torch.from_numpy(reference)
    top = store.top_k
    assert top is not None
    np.testing.assert_array_equal(top["helpful_indices"][...], full.topk(k, 1).indices.numpy())
    np.testing.assert_array_equal(top["harmful_indices"][...], full.topk(k, 1, largest=False).indices.numpy())
    np.testing.assert_allclose(top["helpful_values"][...], full.topk(k, 1).values.numpy(), rtol=0, atol=1e-10)
    expected_values = reference.mean(0) if reduction == "mean" else reference.sum(0)
    np.testing.assert_allclose(store.values[...], expected_values, rtol=0, atol=1e-10)


def test_dask_to_zarr_writes_every_output(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("cg")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    seen: list[tuple[int, int]] = []
    summary = calc.to_zarr(*p.dask_arrays(4, 7), str(tmp_path / "out.zarr"), outputs=ALL,
                           metadata={"job": "demo"}, on_progress=lambda d, t: seen.append((d, t)))
    assert (summary.total_blocks, summary.computed_blocks, summary.skipped_blocks) == (18, 18, 0)
    assert summary.computed_factor_chunks == 3
    assert seen[0] == (0, 18) and seen[-1] == (18, 18) and len(seen) == 19
    _check_against_reference(str(tmp_path / "out.zarr"), p.reference())


def test_store_layout_attrs_and_xarray(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    url = str(tmp_path / "out.zarr")
    DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client).to_zarr(
        *p.dask_arrays(4, 7), url, mode="perturbation", outputs=OutputSelection(values="sum"), metadata={"job": "j1"})
    ds = xarray.open_zarr(url, consolidated=False)
    assert ds["influences"].dims == ("test", "train", "feature_0")
    assert ds["influences"].shape == (11, 40, 3)
    assert ds["values"].dims == ("train", "feature_0")
    assert ds["influences"].encoding["chunks"] == (4, 7, 3)
    reference = p.reference("perturbation")
    assert np.abs(ds["influences"].values - reference).max() <= 1e-10
    np.testing.assert_allclose(ds["values"].values, reference.sum(0), rtol=0, atol=1e-10)
    attrs = open_influence_store(url).attrs
    assert attrs["method"] == "DirectInfluence" and attrs["mode"] == "perturbation"
    assert attrs["parameters"] == json.loads(json.dumps(p.model.parameters_summary()))
    assert attrs["sign_convention"] == SIGN_CONVENTION
    assert attrs["library_version"] == kinfluence.__version__
    assert attrs["model_fingerprint"].startswith("sha256:")
    assert set(attrs["data_fingerprint"]) == {"x_test", "y_test", "x", "y"}
    assert attrs["metadata"] == {"job": "j1"}
    assert not any(name.startswith("_") for name in ds.data_vars)  # scratch stays out of the dataset


def test_sequential_to_zarr_equals_dask_to_zarr(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    seq_url, dask_url = str(tmp_path / "seq.zarr"), str(tmp_path / "dask.zarr")
    s = SequentialInfluenceCalculator(p.model).influences(*p.loaders(4, 7)).to_zarr(seq_url, outputs=ALL)
    assert (s.total_blocks, s.computed_blocks) == (18, 18)
    DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client).to_zarr(*p.dask_arrays(4, 7), dask_url, outputs=ALL)
    _check_against_reference(seq_url, p.reference())
    a, b = open_influence_store(seq_url), open_influence_store(dask_url)
    assert np.abs(a.influences[...] - b.influences[...]).max() <= 1e-12
    for key in ("model_fingerprint", "data_fingerprint", "parameters", "layout"):
        assert a.attrs[key] == b.attrs[key]


def test_resume_skips_completed_blocks_and_refuses_another_computation(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    url = str(tmp_path / "out.zarr")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    first = calc.to_zarr(*p.dask_arrays(4, 7), url, outputs=ALL)
    again = calc.to_zarr(*p.dask_arrays(4, 7), url, outputs=ALL, resume=True)
    assert (again.skipped_blocks, again.computed_blocks, again.computed_factor_chunks) == (18, 0, 0)
    records = {json.loads((tmp_path / "out.zarr" / "_completion" / f"block-{i}-{j}.json").read_text())["run_id"]
               for i in range(3) for j in range(6)}
    assert records == {first.run_id}

    with pytest.raises(StoreExistsError, match="resume=True .* overwrite=True"):
        calc.to_zarr(*p.dask_arrays(4, 7), url, outputs=ALL)
    other = make_problem("direct", seed=1)  # other parameters and data
    other_calc = DaskInfluenceCalculator(other.model, TorchNumpyConverter(), dask_client)
    with pytest.raises(StoreMismatchError) as refused:
        other_calc.to_zarr(*other.dask_arrays(4, 7), url, outputs=ALL, resume=True)
    message = str(refused.value)
    assert "model_fingerprint" in message and "data_fingerprint.x" in message and "overwrite=True" in message
    with pytest.raises(StoreMismatchError, match=r"layout.train_chunk: store has 7, this run has 5"):
        calc.to_zarr(*p.dask_arrays(4, 5), url, outputs=ALL, resume=True)
    with pytest.raises(StoreMismatchError, match=r"outputs.top_k: store has 3, this run has 4"):
        calc.to_zarr(*p.dask_arrays(4, 7), url, outputs=OutputSelection(top_k=4, values="mean"), resume=True)
    with pytest.raises(StoreMismatchError, match=r"parameters.regularization"):
        from kinfluence.influence import DirectInfluence
        from torch.utils.data import DataLoader, TensorDataset

        reg = DirectInfluence(p.model.model, p.model.loss, regularization=0.2).fit(
            DataLoader(TensorDataset(p.x, p.y), batch_size=16))
        DaskInfluenceCalculator(reg, TorchNumpyConverter(), dask_client).to_zarr(*p.dask_arrays(4, 7), url, outputs=ALL, resume=True)

    fresh = other_calc.to_zarr(*other.dask_arrays(4, 7), url, outputs=ALL, overwrite=True)
    assert fresh.computed_blocks == 18
    _check_against_reference(url, other.reference())


def test_store_needs_regular_chunks_and_valid_outputs(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    xt, yt, x, y = p.dask_arrays(4, 7)
    url = str(tmp_path / "out.zarr")
    with pytest.raises(InvalidDimensionChunksError, match=r"x: chunks along the first axis are \(10, 20, 10\); writing a store needs regular chunks"):
        calc.to_zarr(xt, yt, x.rechunk(((10, 20, 10), (3,))), y.rechunk(((10, 20, 10),)), url)
    with pytest.raises(ValueError, match="outputs.top_k: needs mode='up'"):
        calc.to_zarr(xt, yt, x, y, url, mode="perturbation", outputs=OutputSelection(top_k=2))
    with pytest.raises(ValueError, match=r"outputs.top_k: k=41 exceeds the number of training points \(40\)"):
        calc.to_zarr(xt, yt, x, y, url, outputs=OutputSelection(top_k=41))
    with pytest.raises(ValueError, match="outputs: selects nothing"):
        OutputSelection(full_matrix=False)
    with pytest.raises(ValueError, match="outputs.values: expected None, 'mean' or 'sum'"):
        OutputSelection(values="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resume and overwrite: choose one"):
        calc.to_zarr(xt, yt, x, y, url, resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no kinfluence store"):
        open_influence_store(str(tmp_path / "missing.zarr"))


def test_top_k_only_store_has_no_full_matrix(dask_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct", n_train=60)
    url = str(tmp_path / "top.zarr")
    DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client).to_zarr(
        *p.dask_arrays(4, 9), url, outputs=OutputSelection(full_matrix=False, top_k=5))
    store = open_influence_store(url)
    assert store.influences is None and store.values is None
    full = torch.from_numpy(p.reference())
    np.testing.assert_array_equal(store.top_k["helpful_indices"][...], full.topk(5, 1).indices.numpy())
    np.testing.assert_array_equal(store.top_k["harmful_indices"][...], full.topk(5, 1, largest=False).indices.numpy())
    assert not (tmp_path / "top.zarr" / "_work" / "factors" / "0").exists()  # scratch factors dropped
