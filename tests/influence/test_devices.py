"""Methods run on the model's device and dtype; CUDA results equal CPU results."""

import pytest
import torch
from torch import nn

from kinfluence.influence import CgInfluence, DirectInfluence, LissaInfluence, SecondOrderMode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 4, generator=g).to(dtype), torch.randint(0, 2, (64,), generator=g)
    return model, x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", [DirectInfluence, CgInfluence, LissaInfluence])
def test_result_takes_the_model_dtype(method, dtype):
    model, x, y = _problem(dtype)
    kwargs = {"second_order_mode": SecondOrderMode.GAUSS_NEWTON}
    if method is LissaInfluence:
        kwargs.update(maxiter=50, scale=5.0, warn_on_max_iteration=False)
    infl = method(model, nn.functional.cross_entropy, 0.1, **kwargs).fit([(x, y)])
    out = infl.influences(x[:3], y[:3], x[:5], y[:5])
    assert out.dtype == dtype and out.shape == (3, 5) and torch.isfinite(out).all()


@cuda
@pytest.mark.parametrize("method", [DirectInfluence, CgInfluence])
def test_cuda_equals_cpu(method):
    model, x, y = _problem(torch.float64)
    cpu = method(model, nn.functional.cross_entropy, 0.1).fit([(x, y)]).influences(x[:4], y[:4], x, y)
    gpu_model = model.to("cuda")
    gpu = method(gpu_model, nn.functional.cross_entropy, 0.1).fit([(x, y)]).influences(x[:4], y[:4], x, y)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)
