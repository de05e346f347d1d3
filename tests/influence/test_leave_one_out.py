"""Influence predicts leave-one-out retraining on a convex model (digits, L2 logistic regression).

Training objective: (1/n) sum_i l_i(theta) + (lambda/2) ||theta||^2, whose Hessian is
H + lambda I. Removing point j changes the test loss by about I(test, j) / n.
"""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from kinfluence.influence import DirectInfluence

LAM = 5e-2
N_TRAIN, N_TEST = 600, 100


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = nn.functional.cross_entropy(model(x), y) + LAM / 2 * sum((p**2).sum() for p in model.parameters())
        obj.backward()
        return obj

    for _ in range(4):
        opt.step(closure)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(data.target))
    x = data.data[idx].astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    y = data.target[idx]
    n, m = N_TRAIN, N_TRAIN + N_TEST
    return torch.tensor(x[:n]), torch.tensor(y[:n]), torch.tensor(x[n:m]), torch.tensor(y[n:m])


def test_influence_predicts_leave_one_out(digits):
    x, y, x_test, y_test = digits
    torch.manual_seed(0)
    model = nn.Linear(64, 10).double()
    _train(model, x, y)
    infl = DirectInfluence(model, nn.functional.cross_entropy, regularization=LAM).fit([(x, y)])
    # mean test loss: the influence on it is the mean over test points
    predicted_all = infl.influences(x_test, y_test, x, y).mean(0) / len(x)

    with torch.no_grad():
        base = nn.functional.cross_entropy(model(x_test), y_test).item()
    removed = torch.argsort(predicted_all.abs(), descending=True)[:25].tolist()
    actual, predicted = [], []
    for j in removed:
        keep = torch.ones(len(x), dtype=torch.bool)
        keep[j] = False
        loo = nn.Linear(64, 10).double()
        loo.load_state_dict(model.state_dict())
        _train(loo, x[keep], y[keep])
        with torch.no_grad():
            actual.append(nn.functional.cross_entropy(loo(x_test), y_test).item() - base)
        predicted.append(predicted_all[j].item())
    corr = np.corrcoef(actual, predicted)[0, 1]
    print(f"leave-one-out: Pearson {corr:.4f} over {len(removed)} removed points")
    assert corr >= 0.98
