"""EkfacInfluence against Gauss-Newton DirectInfluence, exact Kronecker cases and finite differences."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kinfluence.influence import DirectInfluence, EkfacInfluence, InfluenceMode, SecondOrderMode
from kinfluence.influence.functional import FunctionalModel

from influence_problems import pearson, relative

GN = SecondOrderMode.GAUSS_NEWTON


@pytest.fixture(scope="module")
def classifier():
    """A small MLP trained for a while with cross-entropy on three noisy classes."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()  # p = 147
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] ** 2 + 0.5 * torch.randn(300, generator=g, dtype=torch.float64) > 0.5).long()
    y = y + (x[:, 2] > 1.0).long()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y, DataLoader(TensorDataset(x, y), batch_size=100)


@pytest.mark.parametrize("update_diagonal", [True, False])
def test_single_linear_layer_with_mse_equals_gauss_newton_direct(update_diagonal):
    """Linear model, MSE: G = (2/m) I (x) E[a a^T] is exactly a Kronecker product."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = torch.randn(80, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    loader = DataLoader(TensorDataset(x, y), batch_size=25)
    direct = DirectInfluence(model, nn.functional.mse_loss, 0.01, second_order_mode=GN).fit(loader)
    ekfac = EkfacInfluence(model, "mse", update_diagonal=update_diagonal, hessian_regularization=0.01).fit(loader)
    expected = direct.influences(x[:6], y[:6], x, y)
    assert relative(ekfac.influences(x[:6], y[:6], x, y), expected) <= 1e-10
    layers = ekfac.influences_by_layer(x[:6], y[:6], x, y)
    assert list(layers) == ["linear"] and relative(layers["linear"], expected) <= 1e-10


def test_mlp_with_cross_entropy_correlates_with_gauss_newton_direct(classifier):
    model, x, y, loader = classifier
    lam = 0.1
    full = DirectInfluence(model, nn.functional.cross_entropy, lam, second_order_mode=GN).fit(loader)
    layer_wise = DirectInfluence(model, nn.functional.cross_entropy, lam, second_order_mode=GN,
                                 block_structure="layer_wise").fit(loader)
    ekfac = EkfacInfluence(model, nn.functional.cross_entropy, hessian_regularization=lam).fit(loader)
    got = ekfac.influences(x[:30], y[:30], x, y)
    c_full = pearson(got, full.influences(x[:30], y[:30], x, y))
    c_layer = pearson(got, layer_wise.influences(x[:30], y[:30], x, y))
    print(f"\nEK-FAC vs Gauss-Newton Direct (MLP 5-16-3, cross-entropy, 300 points, lambda={lam}): "
          f"Pearson {c_full:.4f} (full GN), {c_layer:.4f} (layer-wise GN)")
    assert c_full >= 0.9
    assert c_layer >= 0.95


def test_corrected_eigenvalues_are_the_exact_curvature_in_the_eigenbasis(classifier):
    """Lambda[o, k] = e_ok^T G_l e_ok for e_ok = q_s[:, o] (x) q_a[:, k], G_l the layer's exact
    Gauss-Newton block (= true Fisher for cross-entropy), built here by DirectInfluence."""
    model, x, y, loader = classifier
    ekfac = EkfacInfluence(model, nn.functional.cross_entropy, hessian_regularization=0.0).fit(loader)
    shift = 1e-3  # the softmax makes the last layer's G singular: shift for Direct, then remove
    direct = DirectInfluence(model, nn.functional.cross_entropy, shift, second_order_mode=GN,
                             block_structure="layer_wise").fit(loader)
    for name, layer in ekfac.layers.items():
        k = ekfac._kfac[name]
        d_out, d_in = layer.module.out_features, layer.module.in_features
        # basis matrices (d_out, d_in + 1) -> parameter layout [weight row-major, bias]
        mats = k["q_s"].T[:, None, :, None] * k["q_a"].T[None, :, None, :]  # (o, k, d_out, d_in+1)
        mats = mats.reshape(-1, d_out, d_in + 1)
        vecs = torch.cat([mats[:, :, :d_in].reshape(len(mats), -1), mats[:, :, d_in]], dim=1)
        gn = direct._factors[name]["matrix"] - shift * torch.eye(len(vecs), dtype=vecs.dtype)
        expected = torch.einsum("bp,pq,bq->b", vecs, gn, vecs).reshape(d_out, d_in + 1)
        torch.testing.assert_close(k["eigenvalues"], expected, rtol=1e-8, atol=1e-12)


def test_layers_sum_to_the_total_and_factors_match_the_parameter_space_solve(classifier):
    model, x, y, loader = classifier
    ekfac = EkfacInfluence(model, nn.functional.cross_entropy, hessian_regularization={"0": 0.1, "2": 0.05})
    ekfac.fit(loader)
    total = ekfac.influences(x[:4], y[:4], x[:9], y[:9])
    layers = ekfac.influences_by_layer(x[:4], y[:4], x[:9], y[:9])
    assert list(layers) == ["0", "2"]
    torch.testing.assert_close(sum(layers.values()), total)
    # eigenbasis factors vs the same inverse applied in parameter space to full gradients
    dense = ekfac.gradients(x[:4], y[:4]) @ ekfac._solve(ekfac.gradients(x[:9], y[:9])).T
    torch.testing.assert_close(total, dense, rtol=1e-9, atol=1e-12)
    # the calculators' protocol: factors (n, p) against representations (n, p)
    rep = ekfac.train_representation(x[:9], y[:9])
    torch.testing.assert_close(ekfac.influences_from_representations(ekfac.influence_factors(x[:4], y[:4]), rep), total)


def test_perturbation_matches_finite_differences(classifier):
    model, x, y, loader = classifier
    ekfac = EkfacInfluence(model, nn.functional.cross_entropy, hessian_regularization=0.1).fit(loader)
    pert = ekfac.influences(x[:3], y[:3], x[:4], y[:4], mode=InfluenceMode.PERTURBATION)
    assert pert.shape == (3, 4, 5)
    by_layer = ekfac.influences_by_layer(x[:3], y[:3], x[:4], y[:4], mode="perturbation")
    torch.testing.assert_close(sum(by_layer.values()), pert)
    factors = ekfac.influence_factors(x[:3], y[:3])
    eps = 1e-6
    for j in range(4):
        for k in range(5):
            plus, minus = x[j : j + 1].clone(), x[j : j + 1].clone()
            plus[0, k] += eps
            minus[0, k] -= eps
            diff = ekfac.influences_from_factors(factors, plus, y[j : j + 1]) - ekfac.influences_from_factors(
                factors, minus, y[j : j + 1]
            )
            torch.testing.assert_close(pert[:, j, k], (diff / (2 * eps))[:, 0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="mode: EkfacInfluence.train_representation supports mode='up' only"):
        ekfac.train_representation(x[:2], y[:2], mode="perturbation")


def test_never_forms_whole_model_per_sample_gradients(classifier, monkeypatch):
    """Fit, factors and influences run per layer: the whole-model per-sample gradient
    routines must never be called."""
    model, x, y, loader = classifier

    def forbidden(*args, **kwargs):
        raise AssertionError("EkfacInfluence formed a whole-model per-sample gradient")

    monkeypatch.setattr(FunctionalModel, "per_sample_gradients", forbidden)
    monkeypatch.setattr(FunctionalModel, "per_sample_mixed_gradients", forbidden)
    ekfac = EkfacInfluence(model, nn.functional.cross_entropy, hessian_regularization=0.1).fit(loader)
    out = ekfac.influences(x[:5], y[:5], x, y)
    assert out.shape == (5, 300) and torch.isfinite(out).all()
    assert ekfac.influences(x[:2], y[:2], x[:3], y[:3], mode="perturbation").shape == (2, 3, 5)


def test_frozen_unsupported_layers_are_allowed():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    conv.requires_grad_(False)
    x, y = torch.randn(20, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    ekfac = EkfacInfluence(model, "cross_entropy", hessian_regularization=0.1).fit([(x, y)])
    assert ekfac.n_parameters == 32 * 3 + 3
    direct = DirectInfluence(model, nn.functional.cross_entropy, 0.1, second_order_mode=GN).fit([(x, y)])
    # a single trainable linear layer after frozen features: K-FAC is not exact for CE but close
    assert pearson(ekfac.influences(x[:5], y[:5], x, y), direct.influences(x[:5], y[:5], x, y)) > 0.9


def test_refuses_unsupported_layers_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"model: EkfacInfluence supports nn.Linear layers only.*'0 \(Conv2d\)'"):
        EkfacInfluence(model)
    norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1 \(LayerNorm\)'"):
        EkfacInfluence(norm)


def test_refuses_shared_layers_sequence_inputs_and_unknown_losses():
    layer = nn.Linear(4, 4).double()
    shared = nn.Sequential(layer, nn.Tanh(), layer).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    with pytest.raises(ValueError, match="ran twice in one forward pass"):
        EkfacInfluence(shared).fit([(x, y)])
    seq = nn.Sequential(nn.Linear(4, 2), nn.Flatten()).double()
    with pytest.raises(ValueError, match=r"got input of shape \(10, 3, 4\)"):
        EkfacInfluence(seq).fit([(torch.randn(10, 3, 4, dtype=torch.float64), torch.randint(0, 6, (10,)))])
    with pytest.raises(ValueError, match="loss: expected one of"):
        EkfacInfluence(nn.Linear(2, 2), loss="hinge")
    with pytest.raises(ValueError, match="regularization: must be >= 0"):
        EkfacInfluence(nn.Linear(2, 2), hessian_regularization=-1.0)
    with pytest.raises(ValueError, match="factors: expected the"):
        fitted = EkfacInfluence(nn.Linear(4, 4).double()).fit([(x, y)])
        fitted.influences_from_factors(torch.zeros(2, 3, dtype=torch.float64), x, y)
