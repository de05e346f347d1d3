"""The torch.func building blocks against plain autograd, computed independently."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence.functional import (
    FunctionalModel,
    ParamLayout,
    second_order_matrix,
    second_order_product,
    trainable_parameters,
)
from kinfluence.influence.modes import SecondOrderMode


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(n: int = 23):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_per_sample_gradients_equal_a_loop_of_backward_passes():
    model, (x, y) = _mlp(), _data()
    fm = FunctionalModel(model, nn.functional.cross_entropy)
    params = trainable_parameters(model)
    layout = ParamLayout.of(params)
    ours = layout.flatten(fm.per_sample_gradients(params, x, y), batch_dims=1)
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(ours[i], expected, rtol=1e-12, atol=1e-12)


def test_frozen_parameters_are_excluded():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    assert list(trainable_parameters(model)) == ["0.bias", "2.weight", "2.bias"]


def test_mean_hessian_weights_points_not_batches():
    """A short last batch counts per point: the result equals the full-batch Hessian."""
    model, (x, y) = _mlp(), _data(23)
    fm = FunctionalModel(model, nn.functional.cross_entropy)
    params = trainable_parameters(model)
    batched = second_order_matrix(fm, params, DataLoader(TensorDataset(x, y), batch_size=10), SecondOrderMode.HESSIAN)

    names = list(params)
    shapes = [params[n].shape for n in names]

    def full_loss(*flat):
        p = dict(zip(names, flat))
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    blocks = torch.autograd.functional.hessian(full_loss, tuple(params[n] for n in names))
    rows = [torch.cat([blocks[i][j].reshape(shapes[i].numel(), shapes[j].numel()) for j in range(len(names))], 1)
            for i in range(len(names))]
    expected = torch.cat(rows, 0)
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-12)


def test_hvp_equals_matrix_times_vector():
    model, (x, y) = _mlp(), _data()
    fm = FunctionalModel(model, nn.functional.cross_entropy)
    params = trainable_parameters(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    for mode in SecondOrderMode:
        m = second_order_matrix(fm, params, loader, mode, column_chunk=7)
        v = torch.randn(3, len(m), dtype=torch.float64)
        torch.testing.assert_close(second_order_product(fm, params, loader, v, mode), v @ m, rtol=1e-10, atol=1e-12)


def test_gauss_newton_equals_hessian_on_linear_regression():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    fm = FunctionalModel(model, nn.functional.mse_loss)
    params = trainable_parameters(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    h = second_order_matrix(fm, params, loader, SecondOrderMode.HESSIAN)
    gn = second_order_matrix(fm, params, loader, SecondOrderMode.GAUSS_NEWTON)
    torch.testing.assert_close(gn, h, rtol=1e-12, atol=1e-12)


def test_gauss_newton_is_positive_semidefinite_where_the_hessian_is_not():
    model, (x, y) = _mlp(), _data(60)
    fm = FunctionalModel(model, nn.functional.cross_entropy)
    params = trainable_parameters(model)
    loader = DataLoader(TensorDataset(x, y), batch_size=60)
    gn = second_order_matrix(fm, params, loader, SecondOrderMode.GAUSS_NEWTON)
    assert torch.linalg.eigvalsh(gn).min() > -1e-10
