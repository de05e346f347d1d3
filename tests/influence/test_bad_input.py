"""Every misuse gets an error that names the argument at fault."""

import pytest
import torch
from torch import nn

from kinfluence.influence import CgInfluence, DirectInfluence, LissaInfluence, NotFittedException

X = torch.randn(10, 3, dtype=torch.float64)
Y = torch.randn(10, 1, dtype=torch.float64)


def _model() -> nn.Module:
    return nn.Linear(3, 1).double()


@pytest.mark.parametrize("method", [DirectInfluence, CgInfluence, LissaInfluence])
def test_influence_before_fit(method):
    with pytest.raises(NotFittedException, match="fit"):
        method(_model(), nn.functional.mse_loss, 0.1).influences(X, Y)


def test_x_and_y_of_different_lengths():
    infl = DirectInfluence(_model(), nn.functional.mse_loss, 0.1).fit([(X, Y)])
    with pytest.raises(ValueError, match=r"x_test and y_test: have different lengths \(10 and 9\)"):
        infl.influences(X, Y[:9])
    with pytest.raises(ValueError, match=r"x and y: have different lengths"):
        infl.influences(X, Y, X[:4], Y[:3])
    with pytest.raises(ValueError, match="train_loader x and train_loader y"):
        DirectInfluence(_model(), nn.functional.mse_loss, 0.1).fit([(X, Y[:5])])


def test_feature_shape_differs_from_training():
    infl = DirectInfluence(_model(), nn.functional.mse_loss, 0.1).fit([(X, Y)])
    with pytest.raises(ValueError, match=r"feature shape \(4,\) differs"):
        infl.influences(torch.randn(2, 4, dtype=torch.float64), Y[:2])


def test_loss_that_is_not_a_scalar():
    def per_sample(out, y):
        return ((out - y) ** 2).squeeze(1)

    with pytest.raises(ValueError, match="loss: must return a scalar"):
        DirectInfluence(_model(), per_sample, 0.1).fit([(X, Y)])


def test_loss_that_sums_instead_of_averaging():
    def summed(out, y):
        return ((out - y) ** 2).sum()

    with pytest.raises(ValueError, match="reduction='mean'"):
        DirectInfluence(_model(), summed, 0.1).fit([(X, Y)])


def test_model_without_trainable_parameters():
    model = _model().requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no trainable parameters"):
        DirectInfluence(model, nn.functional.mse_loss, 0.1)


def test_empty_loader():
    with pytest.raises(ValueError, match="train_loader: is empty"):
        DirectInfluence(_model(), nn.functional.mse_loss, 0.1).fit([])


def test_negative_regularization():
    with pytest.raises(ValueError, match="regularization: must be >= 0"):
        DirectInfluence(_model(), nn.functional.mse_loss, -1.0)


def test_not_a_module_or_not_a_loss():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        DirectInfluence(lambda x: x, nn.functional.mse_loss)
    with pytest.raises(TypeError, match="loss: expected a callable"):
        DirectInfluence(_model(), "mse")


def test_state_of_another_method_or_changed_model():
    state = DirectInfluence(_model(), nn.functional.mse_loss, 0.1).fit([(X, Y)]).state_dict()
    with pytest.raises(ValueError, match="saved by 'DirectInfluence'"):
        CgInfluence(_model(), nn.functional.mse_loss, 0.1).load_state_dict(state, train_loader=[(X, Y)])
    with pytest.raises(ValueError, match="parameter shapes differ"):
        DirectInfluence(nn.Linear(3, 2).double(), nn.functional.mse_loss, 0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="regularization"):
        DirectInfluence(_model(), nn.functional.mse_loss, 0.2).load_state_dict(state)
