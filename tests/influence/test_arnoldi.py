"""ArnoldiInfluence against DirectInfluence and against explicitly built Hessians."""

import pytest
import torch
from torch import nn

from kinfluence.influence import ArnoldiInfluence, DirectInfluence, InfluenceMode, SecondOrderMode

from influence_problems import small_classifier, pearson, relative

LAM = 0.1


@pytest.fixture(scope="module")
def problem():
    model, x, y, loader = small_classifier()
    return model, x, y, loader


@pytest.mark.parametrize("mode", [SecondOrderMode.HESSIAN, SecondOrderMode.GAUSS_NEWTON])
def test_full_rank_equals_direct(problem, mode):
    model, x, y, loader = problem
    p = sum(t.numel() for t in model.parameters())
    direct = DirectInfluence(model, nn.functional.cross_entropy, LAM, second_order_mode=mode).fit(loader)
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=p, second_order_mode=mode).fit(loader)
    assert arnoldi.fit_info["model"]["converged"]
    expected = direct.influences(x[:8], y[:8], x, y)
    assert relative(arnoldi.influences(x[:8], y[:8], x, y), expected) <= 1e-4


def test_full_rank_perturbation_equals_direct(problem):
    model, x, y, loader = problem
    direct = DirectInfluence(model, nn.functional.cross_entropy, LAM).fit(loader)
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=75).fit(loader)
    expected = direct.influences(x[:3], y[:3], x[:5], y[:5], mode=InfluenceMode.PERTURBATION)
    got = arnoldi.influences(x[:3], y[:3], x[:5], y[:5], mode=InfluenceMode.PERTURBATION)
    assert got.shape == (3, 5, 5)
    assert relative(got, expected) <= 1e-4


def test_correlation_with_direct_grows_with_rank(problem):
    model, x, y, loader = problem
    direct = DirectInfluence(model, nn.functional.cross_entropy, LAM).fit(loader)
    expected = direct.influences(x[:10], y[:10], x, y)
    ranks, correlations = [1, 2, 5, 10, 20, 40, 75], []
    for rank in ranks:
        arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=rank).fit(loader)
        correlations.append(pearson(arnoldi.influences(x[:10], y[:10], x, y), expected))
    print("\nArnoldi (Hessian) correlation with Direct by rank:")
    for rank, c in zip(ranks, correlations):
        print(f"  rank {rank:3d}: {c:.6f}")
    assert all(b >= a - 1e-3 for a, b in zip(correlations, correlations[1:])), correlations
    assert correlations[-1] >= 0.99999
    assert correlations[0] < 0.9  # rank 1 is a real approximation, not already exact


def test_restarted_lanczos_finds_the_largest_magnitude_eigenpairs(problem):
    """A Krylov space much smaller than p forces thick restarts; the result must still be the
    top-5 (by magnitude) eigenpairs of the explicit Hessian, built here with autograd."""
    model, x, y, loader = problem
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=5, krylov_dimension=12, tol=1e-9)
    arnoldi.fit(loader)
    assert arnoldi.fit_info["model"]["matvecs"] > 12  # it restarted

    names = [n for n, _ in model.named_parameters()]
    shapes = [t.shape for _, t in model.named_parameters()]
    flat0 = torch.cat([t.detach().flatten() for _, t in model.named_parameters()])

    def total_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[start : start + s.numel()].reshape(s)
            start += s.numel()
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(total_loss, flat0)
    values, vectors = torch.linalg.eigh(hessian)
    top = torch.argsort(values.abs(), descending=True)[:5]
    got_values, got_vectors = arnoldi.eigen("model")
    torch.testing.assert_close(got_values, values[top], rtol=1e-7, atol=1e-9)
    overlap = (got_vectors.T @ vectors[:, top]).abs()
    torch.testing.assert_close(overlap, torch.eye(5, dtype=overlap.dtype), rtol=0, atol=1e-6)


def test_factors_and_representations_live_in_the_rank_k_basis(problem):
    model, x, y, loader = problem
    arnoldi = ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=7).fit(loader)
    factors = arnoldi.influence_factors(x[:4], y[:4])
    rep = arnoldi.train_representation(x[:9], y[:9])
    assert factors.shape == (4, 7) and rep.shape == (9, 7)
    assert arnoldi.train_representation(x[:9], y[:9], mode="perturbation").shape == (9, 7, 5)
    # the k-dimensional GEMM equals the p-dimensional one with the low-rank inverse
    dense = arnoldi.gradients(x[:4], y[:4]) @ arnoldi._solve(arnoldi.gradients(x[:9], y[:9])).T
    torch.testing.assert_close(arnoldi.influences_from_representations(factors, rep), dense)


def test_warns_when_the_eigensolver_does_not_converge(problem):
    model, x, y, loader = problem
    with pytest.warns(RuntimeWarning, match="did not converge"):
        ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, rank=5, krylov_dimension=8, max_iter=9, tol=1e-12).fit(loader)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 0}, "rank: must be > 0"),
        ({"rank": 76}, "rank: 76 exceeds the 75 parameters of block 'model'"),
        ({"rank": 2.5}, "rank: expected a positive integer"),
        ({"rank": {"other": 3}}, "rank: a per-block mapping"),
        ({"rank": 5, "krylov_dimension": 4}, "krylov_dimension: must exceed rank=5"),
        ({"rank": 5, "krylov_dimension": 5}, "krylov_dimension: must exceed rank=5"),
        ({"rank": 5, "krylov_dimension": 80}, "krylov_dimension: .* at most the 75 parameters"),
        ({"tol": 0}, "tol: must be a number > 0"),
        ({"max_iter": 0}, "max_iter: must be a positive integer"),
    ],
)
def test_rejects_bad_options(problem, options, match):
    model = problem[0]
    with pytest.raises(ValueError, match=match):
        ArnoldiInfluence(model, nn.functional.cross_entropy, LAM, **options)
