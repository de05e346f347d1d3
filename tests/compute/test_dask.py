"""DaskInfluenceCalculator on a real LocalCluster (2 single-threaded worker processes):
results against in-memory influences(), the cost model read off the task graph, the
thread-safety check and input errors."""

from __future__ import annotations

import logging
import threading
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compute_problems import METHODS, make_problem
from kinfluence.compute import (
    DaskInfluenceCalculator,
    DisableClientSingleThreadCheck,
    InvalidDimensionChunksError,
    SequentialInfluenceCalculator,
    ThreadSafetyViolationError,
    TorchNumpyConverter,
    UnalignedChunksError,
)
from kinfluence.compute.dask_calculator import BLOCK_KEY, FACTORS_KEY, REPRESENTATION_KEY


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_dask_sequential_and_in_memory_agree(dask_client, method: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    p = make_problem(method)
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    got = calc.influences(*p.dask_arrays(4, 7), mode=mode)
    assert got.chunks[:2] == ((4, 4, 3), (7,) * 5 + (5,))
    result = got.compute()
    expected = p.reference(mode)
    sequential = SequentialInfluenceCalculator(p.model).influences(*p.loaders(4, 7), mode=mode).compute().numpy()
    assert result.shape == expected.shape
    assert np.abs(result - expected).max() <= 1e-10
    assert np.abs(sequential - result).max() <= 1e-10


def _task_counts(arr: da.Array) -> dict[str, int]:
    keys = [k if isinstance(k, str) else k[0] for k in dict(arr.__dask_graph__())]
    return {prefix: sum(1 for k in keys if k.startswith(prefix + "-")) for prefix in
            (FACTORS_KEY, REPRESENTATION_KEY, BLOCK_KEY)}


@pytest.mark.parametrize("train_chunk", [20, 5, 2])
def test_factors_once_per_test_chunk_whatever_the_train_chunks(dask_client, train_chunk: int) -> None:  # type: ignore[no-untyped-def]
    """3 test chunks: 3 factor tasks for 2, 8 or 20 train chunks; one representation per train chunk."""
    p = make_problem("direct")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    arr = calc.influences(*p.dask_arrays(4, train_chunk))
    n_train_chunks = -(-40 // train_chunk)
    assert _task_counts(arr) == {FACTORS_KEY: 3, REPRESENTATION_KEY: n_train_chunks, BLOCK_KEY: 3 * n_train_chunks}


def test_model_is_shipped_once_as_one_broadcast_future(dask_client) -> None:  # type: ignore[no-untyped-def]
    """Every factor, representation and block task refers to the same scattered model key,
    and no task carries the model itself."""
    p = make_problem("direct")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    arr = calc.influences(*p.dask_arrays(4, 10))
    ref = calc.model_reference()
    assert ref.key in dask_client.who_has([ref])  # scattered, held on the workers
    assert len(dask_client.who_has([ref])[ref.key]) == 2  # broadcast to both workers
    graph = dict(arr.__dask_graph__())
    tasks = {k: v for k, v in graph.items() if (k if isinstance(k, str) else k[0]).startswith(
        (FACTORS_KEY, REPRESENTATION_KEY, BLOCK_KEY))}
    assert tasks and all(ref.key in t.dependencies for t in tasks.values())
    assert p.model not in list(graph.values())
    assert calc.model_reference() is ref  # reused, not re-sent


def test_influence_factors_and_influences_from_factors(dask_client) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("cg")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    xt, yt, x, y = p.dask_arrays(5, 9)
    factors = calc.influence_factors(xt, yt)
    np.testing.assert_allclose(factors.compute(), p.model.influence_factors(p.x_test, p.y_test).numpy(), rtol=0, atol=1e-10)
    got = calc.influences_from_factors(factors, x, y).compute()
    assert np.abs(got - p.reference()).max() <= 1e-10


def test_thread_safety_refused_on_multithreaded_workers(multithreaded_dask_client, caplog) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    assert not p.model.is_thread_safe
    with pytest.raises(ThreadSafetyViolationError, match="threads_per_worker=1"):
        DaskInfluenceCalculator(p.model, TorchNumpyConverter(), multithreaded_dask_client)
    with caplog.at_level(logging.WARNING, logger="kinfluence.compute.dask_calculator"):
        calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(),
                                       DisableClientSingleThreadCheck(multithreaded_dask_client))
    assert "thread-safety check disabled" in caplog.text
    result = calc.influences(*p.dask_arrays(4, 10)).compute(scheduler=multithreaded_dask_client)
    assert np.abs(result - p.reference()).max() <= 1e-10


def test_disable_check_class_uses_the_default_scheduler(caplog) -> None:  # type: ignore[no-untyped-def]
    """Without a client the model is one key of the graph, and the local scheduler runs it."""
    p = make_problem("direct")
    with caplog.at_level(logging.WARNING, logger="kinfluence.compute.dask_calculator"):
        calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), DisableClientSingleThreadCheck)
    assert "thread-safety check disabled" in caplog.text
    arr = calc.influences(*p.dask_arrays(4, 10))
    model_keys = [k for k in dict(arr.__dask_graph__()) if isinstance(k, str) and k.startswith("influence-model-")]
    assert len(model_keys) == 1
    result = arr.compute(scheduler="sync")
    assert np.abs(result - p.reference()).max() <= 1e-10


def test_input_errors_say_what_was_given_and_what_is_needed(dask_client) -> None:  # type: ignore[no-untyped-def]
    p = make_problem("direct")
    calc = DaskInfluenceCalculator(p.model, TorchNumpyConverter(), dask_client)
    xt, yt, x, y = p.dask_arrays(4, 10)
    with pytest.raises(UnalignedChunksError, match=r"x and y: chunks along the first axis must be equal, got \(10, 10, 10, 10\) and \(8, 8, 8, 8, 8\)"):
        calc.influences(xt, yt, x, y.rechunk(8))
    with pytest.raises(InvalidDimensionChunksError, match=r"x_test: is chunked along dimension 1 \(chunks \(2, 1\)\)"):
        calc.influences(xt.rechunk((4, 2)), yt, x, y)
    with pytest.raises(ValueError, match=r"x and y: have different lengths \(40 and 39\)"):
        calc.influences(xt, yt, x, y[:39])
    with pytest.raises(TypeError, match="x_test: expected a dask.array.Array, got ndarray"):
        calc.influences(p.x_test.numpy(), yt, x, y)
    with pytest.raises(ValueError, match=r"x_test and x: feature shapes differ"):
        calc.influences(xt[:, :2], yt, x, y)
    with pytest.raises(TypeError, match="client: expected a distributed.Client"):
        DaskInfluenceCalculator(p.model, TorchNumpyConverter(), "tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="converter: expected a NumpyConverter"):
        DaskInfluenceCalculator(p.model, object(), dask_client)  # type: ignore[arg-type]


def test_the_shipped_model_can_be_moved_while_a_task_uses_it() -> None:
    """torch.func swaps a module's parameters mid-call, so the live model cannot be pickled then;
    what dask moves between workers (the ShippedModel's bytes) can, at any moment."""
    import pickle

    import torch.nn.functional as F

    from kinfluence.compute.shipping import ShippedModel, live_model
    from kinfluence.influence import DirectInfluence

    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    net = torch.nn.Linear(3, 2).double()
    seen: list[str] = []

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if seen == ["armed"]:  # in the middle of a computation: what a peer's get_data would do
            seen.append("shipped" if pickle.loads(pickle.dumps(shipped)).payload else "")
            try:
                pickle.dumps(model)
                seen.append("live model pickled")
            except Exception:
                seen.append("live model refused")
        return F.cross_entropy(out, target)

    model = DirectInfluence(net, loss, regularization=0.1).fit(DataLoader(TensorDataset(x, y), batch_size=6))
    shipped = ShippedModel(model)
    seen.append("armed")
    got = live_model(shipped).influences(x[:2], y[:2], x, y)
    assert seen == ["armed", "shipped", "live model refused"]
    assert live_model(shipped) is model  # the client keeps its own live model
    elsewhere = pickle.loads(pickle.dumps(shipped))
    assert elsewhere.get() is model  # same process: reused, not unpickled again
    torch.testing.assert_close(got, model.influences(x[:2], y[:2], x, y), rtol=0, atol=0)
    assert not model.is_thread_safe  # so another thread computes with a copy of its own
    other: list[Any] = []
    thread = threading.Thread(target=lambda: other.append(elsewhere.get()))
    thread.start()
    thread.join()
    assert other[0] is not model
    torch.testing.assert_close(other[0].influences(x[:2], y[:2], x, y), got, rtol=0, atol=0)
