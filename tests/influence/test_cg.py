"""CgInfluence against DirectInfluence on the same problem."""

import pytest
import torch
from torch import nn

from kinfluence.influence import (
    CgInfluence,
    DirectInfluence,
    InfluenceMode,
    JacobiPreconditioner,
    NystroemPreconditioner,
    SecondOrderMode,
)

from influence_problems import small_classifier


@pytest.fixture(scope="module")
def problem():
    model, x, y, loader = small_classifier()
    direct = DirectInfluence(model, nn.functional.cross_entropy, 0.1).fit(loader)
    return model, x, y, loader, direct


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_block_cg": True},
        {"pre_conditioner": JacobiPreconditioner(num_samples=32)},
        {"pre_conditioner": NystroemPreconditioner(rank=20)},
        {"pre_conditioner": "nystroem", "use_block_cg": True},
    ],
    ids=["batched", "block", "jacobi", "nystroem", "block+nystroem"],
)
def test_cg_matches_direct(problem, options):
    model, x, y, loader, direct = problem
    cg = CgInfluence(model, nn.functional.cross_entropy, 0.1, rtol=1e-10, atol=1e-12, **options).fit(loader)
    expected = direct.influences(x[:10], y[:10], x[:40], y[:40])
    got = cg.influences(x[:10], y[:10], x[:40], y[:40])
    assert (got - expected).norm() / expected.norm() <= 1e-5
    info = cg.last_solve_info["model"]
    assert info["converged"] == 10 and info["iterations"] > 0


def test_preconditioning_reduces_iterations(problem):
    model, x, y, loader, _ = problem
    gn = SecondOrderMode.GAUSS_NEWTON
    plain = CgInfluence(model, nn.functional.cross_entropy, 0.01, rtol=1e-10, second_order_mode=gn).fit(loader)
    pre = CgInfluence(model, nn.functional.cross_entropy, 0.01, rtol=1e-10, second_order_mode=gn,
                      pre_conditioner=NystroemPreconditioner(rank=40)).fit(loader)
    plain.influence_factors(x[:5], y[:5])
    pre.influence_factors(x[:5], y[:5])
    assert pre.last_solve_info["model"]["iterations"] < plain.last_solve_info["model"]["iterations"]


def test_cg_perturbation_matches_direct(problem):
    model, x, y, loader, direct = problem
    cg = CgInfluence(model, nn.functional.cross_entropy, 0.1, rtol=1e-10, atol=1e-12).fit(loader)
    expected = direct.influences(x[:4], y[:4], x[:6], y[:6], mode=InfluenceMode.PERTURBATION)
    got = cg.influences(x[:4], y[:4], x[:6], y[:6], mode=InfluenceMode.PERTURBATION)
    assert (got - expected).norm() / expected.norm() <= 1e-5


def test_warns_when_not_converged(problem):
    model, x, y, loader, _ = problem
    cg = CgInfluence(model, nn.functional.cross_entropy, 0.1, maxiter=2).fit(loader)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        cg.influence_factors(x[:3], y[:3])
    assert cg.last_solve_info["model"]["converged"] < 3


def test_state_dict_needs_the_loader_and_restores_preconditioner(problem):
    model, x, y, loader, _ = problem
    cg = CgInfluence(model, nn.functional.cross_entropy, 0.1, pre_conditioner="jacobi").fit(loader)
    state = cg.state_dict()
    fresh = CgInfluence(model, nn.functional.cross_entropy, 0.1, pre_conditioner="jacobi")
    with pytest.raises(ValueError, match="train_loader"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(state, train_loader=loader)
    assert torch.equal(fresh.influence_factors(x[:3], y[:3]), cg.influence_factors(x[:3], y[:3]))


def test_rejects_bad_options(problem):
    model = problem[0]
    with pytest.raises(ValueError, match="maxiter"):
        CgInfluence(model, nn.functional.cross_entropy, maxiter=0)
    with pytest.raises(ValueError, match="pre_conditioner"):
        CgInfluence(model, nn.functional.cross_entropy, pre_conditioner="ilu")
