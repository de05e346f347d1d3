"""NystroemSketchInfluence against DirectInfluence and against matrices of known rank."""

import pytest
import torch
from torch import nn

from kinfluence.influence import DirectInfluence, InfluenceMode, NystroemSketchInfluence, SecondOrderMode
from kinfluence.influence.lowrank import nystroem_eigen

from influence_problems import small_classifier, pearson, relative

LAM = 0.1
GN = SecondOrderMode.GAUSS_NEWTON


@pytest.fixture(scope="module")
def problem():
    model, x, y, loader = small_classifier()
    direct = DirectInfluence(model, nn.functional.cross_entropy, LAM, second_order_mode=GN).fit(loader)
    return model, x, y, loader, direct


def test_full_rank_equals_gauss_newton_direct(problem):
    model, x, y, loader, direct = problem
    nys = NystroemSketchInfluence(model, nn.functional.cross_entropy, LAM, rank=75, second_order_mode=GN).fit(loader)
    assert relative(nys.influences(x[:8], y[:8], x, y), direct.influences(x[:8], y[:8], x, y)) <= 1e-4
    pert = nys.influences(x[:2], y[:2], x[:4], y[:4], mode=InfluenceMode.PERTURBATION)
    expected = direct.influences(x[:2], y[:2], x[:4], y[:4], mode=InfluenceMode.PERTURBATION)
    assert pert.shape == (2, 4, 5) and relative(pert, expected) <= 1e-4


def test_full_rank_equals_direct_on_a_convex_hessian():
    """Logistic regression: the Hessian itself is PSD, so Nystroem works in Hessian mode."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 6, generator=g, dtype=torch.float64)
    y = (torch.rand(90, generator=g, dtype=torch.float64) < torch.sigmoid(x[:, 0])).double()[:, None]
    model = nn.Linear(6, 1).double()
    loss = nn.functional.binary_cross_entropy_with_logits
    direct = DirectInfluence(model, loss, 0.01).fit([(x, y)])
    nys = NystroemSketchInfluence(model, loss, 0.01, rank=7).fit([(x, y)])
    assert relative(nys.influences(x[:5], y[:5], x, y), direct.influences(x[:5], y[:5], x, y)) <= 1e-4


def test_correlation_with_direct_grows_with_rank(problem):
    model, x, y, loader, direct = problem
    expected = direct.influences(x[:10], y[:10], x, y)
    ranks, correlations = [1, 2, 5, 10, 20, 40, 75], []
    for rank in ranks:
        nys = NystroemSketchInfluence(model, nn.functional.cross_entropy, LAM, rank=rank, second_order_mode=GN)
        correlations.append(pearson(nys.fit(loader).influences(x[:10], y[:10], x, y), expected))
    print("\nNystroem (Gauss-Newton) correlation with Direct by rank:")
    for rank, c in zip(ranks, correlations):
        print(f"  rank {rank:3d}: {c:.6f}")
    assert all(b >= a - 1e-3 for a, b in zip(correlations, correlations[1:])), correlations
    assert correlations[-1] >= 0.99999
    assert correlations[0] < 0.9


def test_sketch_of_a_matrix_of_exact_rank_is_exact():
    """A PSD matrix of rank 4 is recovered exactly by a rank-4 sketch (eigenvalues and span)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))[0]
    values = torch.tensor([9.0, 4.0, 2.0, 0.5], dtype=torch.float64)
    matrix = basis @ torch.diag(values) @ basis.T
    eig = nystroem_eigen(lambda v: v @ matrix, 30, 4, torch.Generator().manual_seed(5),
                         torch.device("cpu"), torch.float64, "test")
    torch.testing.assert_close(eig.values, values, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eig.vectors @ torch.diag(eig.values) @ eig.vectors.T, matrix, rtol=0, atol=1e-10)


def test_seed_selects_the_sketch(problem):
    model, x, y, loader, _ = problem
    def run(seed: int) -> torch.Tensor:
        nys = NystroemSketchInfluence(model, nn.functional.cross_entropy, LAM, rank=5, seed=seed, second_order_mode=GN)
        return nys.fit(loader).influences(x[:3], y[:3], x[:6], y[:6])
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_factors_are_rank_k(problem):
    model, x, y, loader, _ = problem
    nys = NystroemSketchInfluence(model, nn.functional.cross_entropy, LAM, rank=6, second_order_mode=GN).fit(loader)
    assert nys.influence_factors(x[:4], y[:4]).shape == (4, 6)
    assert nys.train_representation(x[:3], y[:3]).shape == (3, 6)


def test_indefinite_hessian_is_refused_naming_the_mode(problem):
    model, x, y, loader, _ = problem  # untrained MLP: its Hessian is indefinite
    with pytest.raises(ValueError, match="second_order_mode: .* not positive semi-definite"):
        NystroemSketchInfluence(model, nn.functional.cross_entropy, LAM, rank=75).fit(loader)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 0}, "rank: must be > 0"),
        ({"rank": -3}, "rank: must be > 0"),
        ({"rank": 100}, "rank: 100 exceeds the 75 parameters"),
        ({"seed": "a"}, "seed: expected an integer"),
    ],
)
def test_rejects_bad_options(problem, options, match):
    with pytest.raises(ValueError, match=match):
        NystroemSketchInfluence(problem[0], nn.functional.cross_entropy, LAM, **options)
