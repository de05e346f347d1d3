"""SequentialInfluenceCalculator and the aggregators, against in-memory influences()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compute_problems import METHODS, make_problem
from kinfluence.compute import (
    BlockAggregator,
    InfluenceBlock,
    MaxAggregator,
    MinAggregator,
    NestedTorchCatAggregator,
    SequentialInfluenceCalculator,
    TopKAggregator,
    TorchCatAggregator,
    ValuesAggregator,
)
from kinfluence.influence import DirectInfluence


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["up", "perturbation"])
def test_sequential_equals_in_memory(method: str, mode: str) -> None:
    p = make_problem(method)
    test_loader, train_loader = p.loaders(4, 7)
    got = SequentialInfluenceCalculator(p.model).influences(test_loader, train_loader, mode=mode)
    result = got.compute(aggregator=NestedTorchCatAggregator()).numpy()
    expected = p.reference(mode)
    assert result.shape == expected.shape == ((11, 40) if mode == "up" else (11, 40, 3))
    assert np.abs(result - expected).max() <= 1e-10


def test_factors_sequence_concatenates() -> None:
    p = make_problem("direct")
    lazy = SequentialInfluenceCalculator(p.model).influence_factors(p.loaders(3, 8)[0])
    torch.testing.assert_close(lazy.compute(TorchCatAggregator()), p.model.influence_factors(p.x_test, p.y_test),
                               rtol=0, atol=1e-12)


class CountingDirect(DirectInfluence):
    """DirectInfluence that counts factor and representation calls (the real computation runs)."""

    factor_calls = 0
    representation_calls = 0

    def influence_factors(self, x, y):  # type: ignore[no-untyped-def]
        type(self).factor_calls += 1
        return super().influence_factors(x, y)

    def train_representation(self, x, y, mode="up"):  # type: ignore[no-untyped-def]
        type(self).representation_calls += 1
        return super().train_representation(x, y, mode)


def test_lazy_until_compute_and_each_chunk_once() -> None:
    p = make_problem("direct")
    counting = CountingDirect(p.model.model, p.model.loss, regularization=0.1)
    counting.fit(DataLoader(TensorDataset(p.x, p.y), batch_size=16))
    CountingDirect.factor_calls = CountingDirect.representation_calls = 0
    lazy = SequentialInfluenceCalculator(counting).influences(*p.loaders(4, 5))  # 3 test x 8 train chunks
    assert (CountingDirect.factor_calls, CountingDirect.representation_calls) == (0, 0)
    lazy.compute()
    assert (CountingDirect.factor_calls, CountingDirect.representation_calls) == (3, 8)


def test_streaming_top_k_equals_top_k_of_full_matrix() -> None:
    p = make_problem("cg", n_train=60)
    full = torch.from_numpy(p.reference())
    top = SequentialInfluenceCalculator(p.model).influences(*p.loaders(4, 9)).compute(TopKAggregator(5))
    helpful = full.topk(5, dim=1, largest=True)
    harmful = full.topk(5, dim=1, largest=False)
    assert torch.equal(top.helpful_indices, helpful.indices)
    assert torch.equal(top.harmful_indices, harmful.indices)
    torch.testing.assert_close(top.helpful_values, helpful.values, rtol=0, atol=1e-10)
    torch.testing.assert_close(top.harmful_values, harmful.values, rtol=0, atol=1e-10)


def test_top_k_larger_than_a_chunk_and_padding() -> None:
    p = make_problem("direct", n_train=6)
    full = torch.from_numpy(p.reference())
    top = SequentialInfluenceCalculator(p.model).influences(*p.loaders(5, 2)).compute(TopKAggregator(8))
    assert torch.equal(top.helpful_indices[:, :6], full.topk(6, 1).indices)
    assert (top.helpful_indices[:, 6:] == -1).all() and torch.isinf(top.helpful_values[:, 6:]).all()


def test_min_max_and_values_aggregators() -> None:
    p = make_problem("direct")
    full = torch.from_numpy(p.reference())
    calc = SequentialInfluenceCalculator(p.model)
    lazy = calc.influences(*p.loaders(4, 7))
    torch.testing.assert_close(lazy.compute(MaxAggregator()), full.max(1).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(lazy.compute(MinAggregator()), full.min(1).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(lazy.compute(ValuesAggregator("mean")), full.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(lazy.compute(ValuesAggregator("sum")), full.sum(0), rtol=0, atol=1e-12)
    pert = torch.from_numpy(p.reference("perturbation"))
    values = calc.influences(*p.loaders(4, 7), mode="perturbation").compute(ValuesAggregator("sum"))
    torch.testing.assert_close(values, pert.sum(0), rtol=0, atol=1e-12)


def test_user_written_aggregator() -> None:
    """A user aggregator sees every block once, with its place in the grid."""

    class CountPositive(BlockAggregator):
        def start(self, n_test: int, n_train: int) -> None:
            self.count, self.cells = 0, 0

        def add(self, block: InfluenceBlock) -> None:
            self.count += int((block.data > 0).sum())
            self.cells += block.data.numel()

        def result(self) -> tuple[int, int]:
            return self.count, self.cells

    p = make_problem("direct")
    full = p.reference()
    assert SequentialInfluenceCalculator(p.model).influences(*p.loaders(4, 7)).compute(CountPositive()) == (
        int((full > 0).sum()), full.size)


def test_bad_inputs_name_the_argument() -> None:
    p = make_problem("direct")
    calc = SequentialInfluenceCalculator(p.model)
    test_loader, train_loader = p.loaders(4, 7)
    with pytest.raises(ValueError, match="train_loader: shuffles"):
        calc.influences(test_loader, DataLoader(TensorDataset(p.x, p.y), batch_size=7, shuffle=True))
    with pytest.raises(TypeError, match="test_loader: is a one-shot iterator"):
        calc.influences(iter(test_loader), train_loader)
    with pytest.raises(ValueError, match="TopKAggregator: needs up-weighting"):
        calc.influences(test_loader, train_loader, mode="perturbation").compute(TopKAggregator(2))
    with pytest.raises(ValueError, match="k: expected a positive int"):
        TopKAggregator(0)
    unfitted = DirectInfluence(p.model.model, p.model.loss, 0.1)
    with pytest.raises(Exception, match="not fitted"):
        SequentialInfluenceCalculator(unfitted)
