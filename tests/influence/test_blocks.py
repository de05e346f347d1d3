"""Block-diagonal curvature: every method against a hand-built block-diagonal solve, and the
errors of bad block mappings and per-block options."""

import pytest
import torch
from torch import nn

from kinfluence.influence import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    SecondOrderMode,
)

LOSS = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()  # 30 + 21 parameters
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (70,), generator=g)
    return model, x, y, [(x[:40], y[:40]), (x[40:], y[40:])]


def _hand_built(model, x, y, blocks: dict[str, list[str]], lam: dict[str, float], n_test: int) -> torch.Tensor:
    """sum_b g_b(test)^T (H_bb + lam_b I)^-1 g_b(train) with H from autograd's full Hessian of
    the mean loss and gradients from a loop of single-point backward passes."""
    named = dict(model.named_parameters())
    names = list(named)
    sizes = [named[n].numel() for n in names]
    starts = dict(zip(names, torch.tensor([0] + sizes).cumsum(0).tolist()))
    flat0 = torch.cat([named[n].detach().flatten() for n in names])

    def unflat(flat):
        return {n: flat[starts[n] : starts[n] + named[n].numel()].reshape(named[n].shape) for n in names}

    def loss_of(flat, xb, yb):
        return LOSS(torch.func.functional_call(model, unflat(flat), (xb,)), yb)

    hessian = torch.autograd.functional.hessian(lambda f: loss_of(f, x, y), flat0)
    grads = torch.stack([torch.autograd.functional.jacobian(lambda f: loss_of(f, x[i : i + 1], y[i : i + 1]), flat0)
                         for i in range(len(x))])
    total = torch.zeros(n_test, len(x), dtype=x.dtype)
    for block, members in blocks.items():
        idx = torch.cat([torch.arange(starts[n], starts[n] + named[n].numel()) for n in members])
        h = hessian[idx][:, idx] + lam[block] * torch.eye(len(idx), dtype=x.dtype)
        g = grads[:, idx]
        total += g[:n_test] @ torch.linalg.solve(h, g.T)
    return total


LAYERS = {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
PARAMS = {n: [n] for n in ["0.weight", "0.bias", "2.weight", "2.bias"]}
CUSTOM = {"head": ["2.weight", "2.bias", "0.bias"], "body": ["0.weight"]}  # not in model order


@pytest.mark.parametrize(
    "structure, blocks, lam",
    [
        (BlockMode.LAYER_WISE, LAYERS, {"0": 0.1, "2": 0.3}),
        (BlockMode.PARAMETER_WISE, PARAMS, {"0.weight": 0.1, "0.bias": 0.2, "2.weight": 0.3, "2.bias": 0.4}),
        (CUSTOM, CUSTOM, {"head": 0.2, "body": 0.1}),
    ],
    ids=["layer_wise", "parameter_wise", "custom"],
)
def test_direct_equals_a_hand_built_block_diagonal_solve(problem, structure, blocks, lam):
    model, x, y, loader = problem
    expected = _hand_built(model, x, y, blocks, lam, n_test=6)
    direct = DirectInfluence(model, LOSS, lam, block_structure=structure).fit(loader)
    assert list(direct.blocks) == list(blocks)
    got = direct.influences(x[:6], y[:6], x, y)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    full = DirectInfluence(model, LOSS, 0.2).fit(loader).influences(x[:6], y[:6], x, y)
    assert not torch.allclose(got, full, rtol=1e-2)  # the structure really changes the result


@pytest.mark.parametrize("method", [ArnoldiInfluence, NystroemSketchInfluence])
def test_low_rank_at_full_block_rank_equals_layer_wise_direct(problem, method):
    model, x, y, loader = problem
    gn = SecondOrderMode.GAUSS_NEWTON
    lam = {"0": 0.1, "2": 0.3}
    direct = DirectInfluence(model, LOSS, lam, second_order_mode=gn, block_structure="layer_wise").fit(loader)
    low = method(model, LOSS, lam, rank={"0": 30, "2": 21}, second_order_mode=gn, block_structure="layer_wise")
    low.fit(loader)
    expected = direct.influences(x[:5], y[:5], x, y)
    got = low.influences(x[:5], y[:5], x, y)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    # factors concatenate the blocks' rank-k coordinates
    small = method(model, LOSS, lam, rank={"0": 4, "2": 3}, second_order_mode=gn, block_structure="layer_wise")
    assert small.fit(loader).influence_factors(x[:5], y[:5]).shape == (5, 7)


def test_iterative_methods_follow_the_block_structure(problem):
    model, x, y, loader = problem
    lam = {"0": 0.5, "2": 0.5}
    expected = _hand_built(model, x, y, LAYERS, lam, n_test=4)
    cg = CgInfluence(model, LOSS, lam, rtol=1e-10, atol=1e-12, block_structure="layer_wise").fit(loader)
    torch.testing.assert_close(cg.influences(x[:4], y[:4], x, y), expected, rtol=1e-6, atol=1e-8)
    lissa = LissaInfluence(model, LOSS, lam, maxiter=3000, scale=5.0, rtol=1e-10, block_structure="layer_wise",
                           warn_on_max_iteration=False)
    got = lissa.fit([(x, y)]).influences(x[:4], y[:4], x, y)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-3


@pytest.mark.parametrize("method", [DirectInfluence, ArnoldiInfluence, NystroemSketchInfluence, CgInfluence])
@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"a": ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight"]}, r"unknown trainable parameters \['3.weight'\]"),
        ({"a": ["0.weight", "0.bias", "2.weight"], "b": ["2.weight", "2.bias"]},
         r"more than one block: \[\"2.weight \(in 'a' and 'b'\)\"\]"),
        ({"a": ["0.weight", "0.bias"]}, r"in no block: \['2.weight', '2.bias'\]"),
        ({"a": ["0.weight", "0.bias", "2.weight", "2.bias"], "b": []}, r"block_structure\['b'\]: is empty"),
        ({"a": "0.weight"}, r"block_structure\['a'\]: expected a list"),
        ("by_layer", "block_structure: expected one of"),
    ],
    ids=["unknown", "overlapping", "missing", "empty", "string", "bad_mode"],
)
def test_bad_block_mappings_are_named(problem, method, mapping, match):
    with pytest.raises(ValueError, match=match):
        method(problem[0], LOSS, 0.1, block_structure=mapping)


@pytest.mark.parametrize("method", [DirectInfluence, ArnoldiInfluence, NystroemSketchInfluence])
def test_per_block_regularization_must_name_every_block(problem, method):
    with pytest.raises(ValueError, match=r"regularization: .* unknown \['1'\], missing \['2'\]"):
        method(problem[0], LOSS, {"0": 0.1, "1": 0.1}, block_structure="layer_wise")
    with pytest.raises(ValueError, match="regularization: must be >= 0, got -0.1 for block '2'"):
        method(problem[0], LOSS, {"0": 0.1, "2": -0.1}, block_structure="layer_wise")


def test_rank_above_a_block_size_names_the_block(problem):
    with pytest.raises(ValueError, match="rank: 25 exceeds the 21 parameters of block '2'"):
        ArnoldiInfluence(problem[0], LOSS, 0.1, rank=25, block_structure="layer_wise")
    with pytest.raises(ValueError, match="rank: 4 exceeds the 3 parameters of block '2.bias'"):
        NystroemSketchInfluence(problem[0], LOSS, 0.1, rank=4, block_structure="parameter_wise")
