"""Loading what a spec names: models, weights, losses, data; each failure names field and file."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from kinfluence.job import LoadError
from kinfluence.job.loading import (
    NAMED_LOSSES,
    build_model,
    cached_model,
    load_data,
    load_dataset,
    model_fingerprint,
    resolve_loss,
)
from kinfluence.job.spec import DataSource, InfluenceJobSpec, ModelSource

MODULE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

def not_a_module():
    return [1, 2]

def broken():
    raise RuntimeError("no GPU here")

def my_loss(out, y):
    return ((out - y) ** 2).mean()

VALUE = 3
'''


@pytest.fixture()
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tmodels.py").write_text(MODULE)
    (tmp_path / "tbroken.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def trained(path: Path) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.save(net.state_dict(), path)
    return net


def test_entrypoint_with_weights(models: Path) -> None:
    net = trained(models / "w.pt")
    loaded = build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "w.pt"), dtype="float64"))
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.allclose(loaded(x), net.double()(x))
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float64


def test_missing_weights_file(models: Path) -> None:
    with pytest.raises(LoadError, match=r"spec.model.weights: no such file '.*nope.pt'"):
        build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "nope.pt")))


def test_weights_that_do_not_match_the_model(models: Path) -> None:
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Linear(2, 2))
    torch.save(other.state_dict(), models / "other.pt")
    with pytest.raises(LoadError) as info:
        build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "other.pt")))
    msg = str(info.value)
    assert msg.startswith("spec.model.weights:") and "does not match the model" in msg
    assert "unexpected keys ['3.bias', '3.weight']" in msg
    assert "0.weight (file (5, 3), model (4, 3))" in msg
    state = dict(trained(models / "w.pt").state_dict())
    del state["2.bias"]
    torch.save(state, models / "partial.pt")
    with pytest.raises(LoadError, match=r"missing keys \['2.bias'\]"):
        build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "partial.pt")))


class Payload:
    """Anything torch.load(weights_only=False) would happily construct."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_weights_are_never_unpickled_as_objects(models: Path) -> None:
    torch.save({"model": Payload()}, models / "pickle.pt")
    with pytest.raises(LoadError, match="is not a weights-only state_dict"):
        build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "pickle.pt")))
    (models / "junk.pt").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(LoadError, match="spec.model.weights"):
        build_model(ModelSource(entrypoint="tmodels:build", weights=str(models / "junk.pt")))


@pytest.mark.parametrize(
    "entrypoint, message",
    [
        ("no_such_module:build", "spec.model.entrypoint: cannot import module 'no_such_module'"),
        ("tbroken:build", "spec.model.entrypoint: importing 'tbroken' failed: ImportError: needs libfoo"),
        ("tmodels:missing", "spec.model.entrypoint: 'tmodels' has no attribute 'missing'"),
        ("tmodels:VALUE", "spec.model.entrypoint: 'tmodels:VALUE' is an int, not a callable"),
        ("tmodels:not_a_module", "spec.model.entrypoint: tmodels:not_a_module() returned a list, not a torch.nn.Module"),
        ("tmodels:broken", "spec.model.entrypoint: calling tmodels:broken() failed: RuntimeError: no GPU here"),
    ],
)
def test_entrypoint_errors(models: Path, entrypoint: str, message: str) -> None:
    with pytest.raises(LoadError) as info:
        build_model(ModelSource(entrypoint=entrypoint))
    assert message in str(info.value)


def test_torch_export_program(models: Path) -> None:
    net = trained(models / "w.pt")
    # a dynamic batch dimension: influence methods call the model on batches of any size
    program = torch.export.export(net, (torch.randn(2, 3),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(models / "net.pt2"))
    loaded = build_model(ModelSource(program=str(models / "net.pt2")))
    x = torch.randn(4, 3)
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert all(p.requires_grad for p in loaded.parameters())
    with pytest.raises(LoadError, match="spec.model.program: .* is not a torch.export program"):
        build_model(ModelSource(program=str(models / "w.pt")))


def test_cached_model_once_per_process(models: Path) -> None:
    source = ModelSource(entrypoint="tmodels:build", weights=str(trained(models / "w.pt") and models / "w.pt"))
    assert cached_model(source) is cached_model(source)
    assert model_fingerprint(cached_model(source)) == model_fingerprint(build_model(source))
    assert model_fingerprint(build_model(ModelSource(entrypoint="tmodels:build"))) != model_fingerprint(build_model(source))


def test_losses(models: Path) -> None:
    out = torch.tensor([[0.5], [2.0]])
    assert torch.isclose(NAMED_LOSSES["mse"](out, torch.tensor([1.0, 1.0])), torch.tensor((0.25 + 1.0) / 2))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    expected = -(torch.log_softmax(logits, 1)[[0, 1], [0, 1]]).mean()
    assert torch.isclose(NAMED_LOSSES["cross_entropy"](logits, y), expected)
    assert torch.isclose(NAMED_LOSSES["nll"](torch.log_softmax(logits, 1), y), expected)
    b = NAMED_LOSSES["bce_with_logits"](torch.tensor([[0.0]]), torch.tensor([1]))
    assert torch.isclose(b, torch.log(torch.tensor(2.0)))
    assert resolve_loss("tmodels:my_loss").__name__ == "my_loss"
    with pytest.raises(LoadError, match="spec.loss: cannot import module 'nowhere'"):
        resolve_loss("nowhere:loss")


# ------------------------------------------------------------------------------ data


def write_group(path: Path, **arrays: np.ndarray) -> str:
    g = zarr.open_group(str(path), mode="w")
    for name, a in arrays.items():
        g.create_array(name, data=a, chunks=(4,) + a.shape[1:])
    return str(path)


def spec_for(train: DataSource, test: DataSource, chunks: dict[str, int] | None = None) -> InfluenceJobSpec:
    return InfluenceJobSpec(
        model={"entrypoint": "m:f"}, loss="mse", data={"train": train, "test": test},
        method={"name": "direct"}, output={"url": "o.zarr"}, chunks=chunks or {"train": 3, "test": 2},
    )


def test_zarr_data_lazy_sliced_and_chunked(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    url = write_group(tmp_path / "d.zarr", x=x, y=np.arange(10), xt=x[:3], yt=np.arange(3))
    train, test = load_data(spec_for(DataSource(url=url, start=2, stop=9), DataSource(url=url, features="xt", targets="yt")))
    assert len(train) == 7 and train.x.chunks[0] == (3, 3, 1) and test.x.chunks[0] == (2, 1)
    np.testing.assert_array_equal(train.x.compute(), x[2:9])
    np.testing.assert_array_equal(train.y.compute(), np.arange(2, 9))


def test_npy_data(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(9, 2, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(9))
    d = load_dataset(DataSource(url=str(tmp_path), format="npy", targets="labels.npy", start=1), "spec.data.train", chunk=4)
    np.testing.assert_array_equal(d.x.compute(), x[1:])
    np.testing.assert_array_equal(d.y[2:5].compute(), np.arange(3, 6))
    with pytest.raises(LoadError, match=r"spec.data.train.features: no file 'feat.npy' in"):
        load_dataset(DataSource(url=str(tmp_path), format="npy", features="feat"), "spec.data.train")


def test_x_and_y_of_different_lengths(tmp_path: Path) -> None:
    url = write_group(tmp_path / "d.zarr", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(LoadError, match=r"spec.data.train: features \('x'\) and targets \('y'\) have different lengths \(5 and 4\)"):
        load_dataset(DataSource(url=url), "spec.data.train")


def test_array_name_not_in_the_store(tmp_path: Path) -> None:
    url = write_group(tmp_path / "d.zarr", x=np.zeros((5, 2)), y=np.zeros(5))
    with pytest.raises(LoadError, match=r"spec.data.test.targets: no array 'labels' in the zarr group .* \(arrays: x, y\)"):
        load_dataset(DataSource(url=url, targets="labels"), "spec.data.test")
    with pytest.raises(LoadError, match=r"spec.data.train.url: no zarr group at '.*missing.zarr'"):
        load_dataset(DataSource(url=str(tmp_path / "missing.zarr")), "spec.data.train")
    with pytest.raises(LoadError, match=r"spec.data.train.stop: 9 is beyond the 5 points"):
        load_dataset(DataSource(url=url, stop=9), "spec.data.train")


def test_test_features_must_match_train(tmp_path: Path) -> None:
    url = write_group(tmp_path / "d.zarr", x=np.zeros((5, 2)), y=np.zeros(5), xt=np.zeros((3, 4)), yt=np.zeros(3))
    with pytest.raises(LoadError, match=r"spec.data.test.features: feature shape \(4,\) differs from the training data's \(2,\)"):
        load_data(spec_for(DataSource(url=url), DataSource(url=url, features="xt", targets="yt")))
