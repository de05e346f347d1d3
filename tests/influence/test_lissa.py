"""LissaInfluence against DirectInfluence on a positive-definite (Gauss-Newton) problem."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence import DirectInfluence, LissaInfluence, SecondOrderMode

GN = SecondOrderMode.GAUSS_NEWTON


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (200,), generator=g)
    return model, x, y


def test_lissa_correlates_with_direct(problem):
    model, x, y = problem
    loader = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    direct = DirectInfluence(model, nn.functional.cross_entropy, 0.1, second_order_mode=GN).fit(loader)
    lissa = LissaInfluence(model, nn.functional.cross_entropy, 0.1, maxiter=600, scale=3.0, samples=2,
                           second_order_mode=GN, warn_on_max_iteration=False).fit(loader)
    expected = direct.influences(x[:10], y[:10], x[:50], y[:50]).flatten()
    got = lissa.influences(x[:10], y[:10], x[:50], y[:50]).flatten()
    corr = torch.corrcoef(torch.stack([got, expected]))[0, 1]
    print(f"LiSSA vs Direct: Pearson {corr:.5f}")
    assert corr >= 0.99


def test_full_batch_lissa_converges_to_direct(problem):
    model, x, y = problem
    loader = [(x, y)]
    direct = DirectInfluence(model, nn.functional.cross_entropy, 0.1, second_order_mode=GN).fit(loader)
    lissa = LissaInfluence(model, nn.functional.cross_entropy, 0.1, maxiter=5000, scale=2.0, rtol=1e-9,
                           second_order_mode=GN).fit(loader)
    expected = direct.influence_factors(x[:5], y[:5])
    assert (lissa.influence_factors(x[:5], y[:5]) - expected).norm() / expected.norm() < 1e-5


def test_warns_when_scale_is_too_small(problem):
    model, x, y = problem
    with pytest.warns(RuntimeWarning, match="scale"):
        lissa = LissaInfluence(model, nn.functional.cross_entropy, 0.1, scale=0.01, maxiter=500,
                               second_order_mode=GN).fit([(x, y)])
    with pytest.warns(RuntimeWarning, match="diverged"):
        out = lissa.influence_factors(x[:2], y[:2])
    assert torch.isnan(out).all()


def test_rejects_bad_options(problem):
    model = problem[0]
    for kwargs, name in [({"scale": 0}, "scale"), ({"samples": 0}, "samples"), ({"dampen": 1.0}, "dampen")]:
        with pytest.raises(ValueError, match=name):
            LissaInfluence(model, nn.functional.cross_entropy, **kwargs)
