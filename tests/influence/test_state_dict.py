"""Fitted states survive torch.save / torch.load(weights_only=True) into ANOTHER process and
give bit-identical influences there, without the training data."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kinfluence.influence import (
    ArnoldiInfluence,
    DirectInfluence,
    EkfacInfluence,
    InfluenceFunctionModel,
    NystroemSketchInfluence,
)

HERE = Path(__file__).parent
LOSS = nn.functional.cross_entropy


def build_model(hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def build_methods(model: nn.Module) -> dict[str, InfluenceFunctionModel]:
    """The same constructor options on both sides of the round trip."""
    return {
        "direct": DirectInfluence(model, LOSS, 0.1, block_structure="layer_wise"),
        "arnoldi": ArnoldiInfluence(model, LOSS, 0.1, rank=12, krylov_dimension=30),
        "nystroem": NystroemSketchInfluence(model, LOSS, {"0": 0.1, "2": 0.2}, rank={"0": 6, "2": 4},
                                            second_order_mode="gauss_newton", block_structure="layer_wise"),
        "ekfac": EkfacInfluence(model, LOSS, hessian_regularization=0.05),
    }


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)


CHILD = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_state_dict import build_methods, build_model

    bundle = torch.load(sys.argv[2], weights_only=True)
    model = build_model()
    model.load_state_dict(bundle["model"])
    methods = build_methods(model)
    x, y = bundle["x"], bundle["y"]
    out = {}
    for name, state in bundle["states"].items():
        methods[name].load_state_dict(state)
        out[name] = methods[name].influences(x[:7], y[:7], x, y)
        out[name + "/perturbation"] = methods[name].influences(x[:2], y[:2], x[:3], y[:3], mode="perturbation")
    torch.save(out, sys.argv[3])
    """
)


def test_round_trip_in_another_process_is_bit_identical(tmp_path):
    model = build_model()
    x, y = data()
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    methods = build_methods(model)
    expected, states = {}, {}
    for name, method in methods.items():
        method.fit(loader)
        states[name] = method.state_dict()
        expected[name] = method.influences(x[:7], y[:7], x, y)
        expected[name + "/perturbation"] = method.influences(x[:2], y[:2], x[:3], y[:3], mode="perturbation")
    bundle, result = tmp_path / "bundle.pt", tmp_path / "result.pt"
    torch.save({"model": model.state_dict(), "x": x, "y": y, "states": states}, bundle)

    proc = subprocess.run([sys.executable, "-c", CHILD, str(HERE), str(bundle), str(result)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(result, weights_only=True)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name}: differs after the round trip"


@pytest.mark.parametrize("name", ["direct", "arnoldi", "nystroem", "ekfac"])
def test_a_changed_model_is_detected_on_load(name):
    x, y = data()
    fitted = build_methods(build_model())[name].fit([(x, y)])
    wider = build_methods(build_model(hidden=9))[name]
    with pytest.raises(ValueError, match=r"state: the model changed since fit \(parameter shapes differ\).*0.weight"):
        wider.load_state_dict(fitted.state_dict())


def test_other_options_or_another_method_are_refused():
    x, y = data()
    model = build_model()
    state = build_methods(model)["arnoldi"].fit([(x, y)]).state_dict()
    with pytest.raises(ValueError, match="state: was fitted with other options: rank="):
        ArnoldiInfluence(model, LOSS, 0.1, rank=5, krylov_dimension=30).load_state_dict(state)
    with pytest.raises(ValueError, match="state: was saved by 'ArnoldiInfluence', not NystroemSketchInfluence"):
        NystroemSketchInfluence(model, LOSS, 0.1, rank=12).load_state_dict(state)
    ekfac = build_methods(model)["ekfac"].fit([(x, y)]).state_dict()
    with pytest.raises(ValueError, match="update_diagonal"):
        EkfacInfluence(model, LOSS, update_diagonal=False, hessian_regularization=0.05).load_state_dict(ekfac)


def test_a_float64_state_loads_into_a_float32_model():
    x, y = data()
    methods64 = build_methods(build_model())
    methods32 = build_methods(build_model().float())
    for name in ["arnoldi", "ekfac"]:
        state = methods64[name].fit([(x, y)]).state_dict()
        got = methods32[name].load_state_dict(state).influences(x[:4], y[:4], x, y)
        expected = methods64[name].influences(x[:4], y[:4], x, y)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
