"""DirectInfluence against closed forms whose Hessians are written by hand."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence import DirectInfluence, InfluenceMode, SecondOrderMode, SingularHessianError


def _regression(n: int = 60, d: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
        model.bias.fill_(0.2)
    return model, x, y


def test_linear_regression_matches_closed_form():
    """l = (w.x + b - y)^2: grad = 2 r [x, 1], H = 2/n sum [x,1][x,1]^T."""
    model, x, y = _regression()
    lam = 0.05
    infl = DirectInfluence(model, nn.functional.mse_loss, regularization=lam)
    infl.fit(DataLoader(TensorDataset(x, y), batch_size=17))
    got = infl.influences(x[:7], y[:7], x, y)

    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    with torch.no_grad():
        r = x @ model.weight.T + model.bias - y
    grads = 2 * r * xa
    hessian = 2 * xa.T @ xa / len(x) + lam * torch.eye(xa.shape[1], dtype=x.dtype)
    expected = grads[:7] @ torch.linalg.solve(hessian, grads.T)
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-8


def test_logistic_regression_matches_closed_form():
    """Binary logistic regression: grad = (s - y) [x, 1], H = 1/n sum s(1-s) [x,1][x,1]^T."""
    g = torch.Generator().manual_seed(3)
    n, d, lam = 80, 5, 0.1
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x[:, 0])).double()[:, None]
    model = nn.Linear(d, 1).double()
    loss = nn.functional.binary_cross_entropy_with_logits
    infl = DirectInfluence(model, loss, regularization=lam).fit(DataLoader(TensorDataset(x, y), batch_size=32))
    got = infl.influences(x[:9], y[:9], x, y)

    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    with torch.no_grad():
        s = torch.sigmoid(x @ model.weight.T + model.bias)
    grads = (s - y) * xa
    hessian = (xa * (s * (1 - s))).T @ xa / n + lam * torch.eye(d + 1, dtype=x.dtype)
    expected = grads[:9] @ torch.linalg.solve(hessian, grads.T)
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-8


def test_gauss_newton_equals_hessian_on_linear_regression():
    model, x, y = _regression()
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    h = DirectInfluence(model, nn.functional.mse_loss, 0.01).fit(loader).influences(x[:5], y[:5], x, y)
    gn = DirectInfluence(model, nn.functional.mse_loss, 0.01, second_order_mode=SecondOrderMode.GAUSS_NEWTON)
    torch.testing.assert_close(gn.fit(loader).influences(x[:5], y[:5], x, y), h, rtol=1e-10, atol=1e-12)


def test_perturbation_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (30,), generator=g)
    infl = DirectInfluence(model, nn.functional.cross_entropy, 0.5).fit(DataLoader(TensorDataset(x, y), batch_size=30))
    pert = infl.influences(x[:4], y[:4], x[:6], y[:6], mode=InfluenceMode.PERTURBATION)
    assert pert.shape == (4, 6, 3)

    factors = infl.influence_factors(x[:4], y[:4])
    eps = 1e-6
    for j in range(6):
        for k in range(3):
            plus, minus = x[j : j + 1].clone(), x[j : j + 1].clone()
            plus[0, k] += eps
            minus[0, k] -= eps
            up = infl.influences_from_factors(factors, plus, y[j : j + 1])
            down = infl.influences_from_factors(factors, minus, y[j : j + 1])
            torch.testing.assert_close(pert[:, j, k], ((up - down) / (2 * eps))[:, 0], rtol=1e-6, atol=1e-8)


def test_perturbation_shape_for_image_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).double()
    x, y = torch.randn(10, 1, 3, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
    infl = DirectInfluence(model, nn.functional.cross_entropy, 0.1).fit([(x, y)])
    assert infl.influences(x[:2], y[:2], x[:5], y[:5], mode="perturbation").shape == (2, 5, 1, 3, 4)


def test_float32_follows_the_model_dtype():
    model, x, y = _regression()
    model = model.float()
    infl = DirectInfluence(model, nn.functional.mse_loss, 0.1).fit([(x.float(), y.float())])
    out = infl.influences(x[:3], y[:3], x, y)  # float64 inputs are cast to the model's dtype
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_state_dict_restores_a_fitted_model_without_data():
    model, x, y = _regression()
    fitted = DirectInfluence(model, nn.functional.mse_loss, 0.1).fit([(x, y)])
    fresh = DirectInfluence(model, nn.functional.mse_loss, 0.1).load_state_dict(fitted.state_dict())
    assert torch.equal(fresh.influences(x[:3], y[:3], x, y), fitted.influences(x[:3], y[:3], x, y))


def test_singular_hessian_without_regularization_says_to_add_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :1]], 1)  # duplicated feature: H is singular
    y = torch.randn(30, 1, generator=g, dtype=torch.float64)
    with pytest.raises(SingularHessianError, match="regularization"):
        DirectInfluence(nn.Linear(3, 1).double(), nn.functional.mse_loss, 0.0).fit([(x, y)])


def test_refuses_models_too_large_and_names_other_methods():
    with pytest.raises(ValueError, match="CgInfluence"):
        DirectInfluence(nn.Linear(100, 100), nn.functional.mse_loss, 0.1, max_parameters=1000)
