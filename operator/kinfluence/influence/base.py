"""The protocol every influence method implements, and what all of them share.

Sign convention (pyDVL's, kept everywhere in kinfluence):

    up-weighting:  I(z_test, z) = + grad l(z_test)^T (H + lambda I)^-1 grad l(z)
    perturbation:  I(z_test, z) = + grad l(z_test)^T (H + lambda I)^-1 d/dx grad l(z)

H is the MEAN Hessian (or Gauss-Newton matrix) of the training loss over all training
points. Positive means training point z helps z_test: removing z raises the test loss by
about I / n_train.

A method computes *factors* F = (H + lambda)^-1 grad l(z_test) (or a compressed version) once
per test point, a *train representation* R (gradients, or their projection onto a low-rank
basis) once per training point, and the influence block is the GEMM F @ R^T.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .blocks import BlockStructure, Regularization, resolve_blocks, resolve_regularization
from .errors import NotFittedException
from .functional import FunctionalModel, LossFn, ParamLayout, Params, trainable_parameters
from .modes import BlockMode, InfluenceMode, SecondOrderMode

Batches = Iterable[tuple[Tensor, Tensor]]


def check_xy(x: Tensor, y: Tensor, x_name: str = "x", y_name: str = "y") -> None:
    """x and y must be tensors with one row per point."""
    for t, name in ((x, x_name), (y, y_name)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{name}: expected one row per data point, got a 0-dim tensor")
    if len(x) != len(y):
        raise ValueError(f"{x_name} and {y_name}: have different lengths ({len(x)} and {len(y)})")


class InfluenceFunctionModel(ABC):
    """Base class: block layout, gradients, input checks, the fit/factor/influence protocol."""

    #: whether one instance may be used from several threads at once
    is_thread_safe: bool = False
    #: whether the fitted state alone is not enough: the method solves against the training
    #: data (CG, LiSSA), so load_state_dict needs the training loader too
    needs_train_loader: bool = False

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(f"loss: expected a callable loss(outputs, targets), got {type(loss).__name__}")
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model: has no trainable parameters (all have requires_grad=False)")
        self.model = model
        self.loss = loss
        self.second_order_mode = SecondOrderMode(second_order_mode)
        self.block_structure = block_structure
        self.blocks = resolve_blocks(list(params), block_structure)
        self.regularization = resolve_regularization(list(self.blocks), regularization)
        ordered = {n: params[n] for names in self.blocks.values() for n in names}
        self.layout = ParamLayout.of(ordered)
        slices = self.layout.slices()
        self.block_slices = {
            b: slice(slices[names[0]].start, slices[names[-1]].stop) for b, names in self.blocks.items()
        }
        self.fm = FunctionalModel(model, loss)
        self._fitted = False
        self._input_shape: Optional[tuple[int, ...]] = None

    # ---------------------------------------------------------------------------- facts

    @property
    def n_parameters(self) -> int:
        return self.layout.n_parameters

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    @property
    def device(self) -> torch.device:
        return self.fm.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fm.dtype

    def params(self, block: Optional[str] = None) -> Params:
        """Current trainable parameters (detached), all or one block's."""
        current = trainable_parameters(self.model)
        names = self.layout.names if block is None else self.blocks[block]
        return {n: current[n] for n in names}

    def parameters_summary(self) -> dict[str, Any]:
        """The constructor options that define the result (recorded next to outputs)."""
        return {
            "method": type(self).__name__,
            "regularization": self.regularization,
            "second_order_mode": self.second_order_mode.value,
            "blocks": {b: list(n) for b, n in self.blocks.items()},
            **self._options(),
        }

    def _options(self) -> dict[str, Any]:
        return {}

    # ---------------------------------------------------------------------------- fit

    def fit(self, train_loader: Batches) -> "InfluenceFunctionModel":
        """Build what the method needs from the training data (an iterable of (x, y) batches)."""
        first = next(iter(train_loader), None)
        if first is None:
            raise ValueError("train_loader: is empty (no batches)")
        x, y = first
        check_xy(x, y, "train_loader x", "train_loader y")
        self._check_loss(x, y)
        self._input_shape = tuple(x.shape[1:])
        self._fit(train_loader)
        self._fitted = True
        return self

    def _check_loss(self, x: Tensor, y: Tensor) -> None:
        x, y = self.fm.to_device(x, y)
        params = self.params()
        with torch.no_grad():
            value = self.fm.batch_loss(params, x, y)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"loss: must return a scalar (a mean over the batch, reduction='mean'), got {shape}"
            )
        if len(x) > 1:
            with torch.no_grad():
                # a few forward passes (no gradients) to tell a mean from a sum reduction
                per_sample = torch.stack(
                    [self.fm.batch_loss(params, x[i : i + 1], y[i : i + 1]) for i in range(min(len(x), 8))]
                )
                head = self.fm.batch_loss(params, x[: len(per_sample)], y[: len(per_sample)])
            if not torch.allclose(head, per_sample.mean(), rtol=1e-4, atol=1e-6):
                raise ValueError(
                    "loss: must average over the batch (reduction='mean'): on the first batch it "
                    f"gave {head.item():.6g} where the mean of per-sample losses is {per_sample.mean().item():.6g}"
                )

    @abstractmethod
    def _fit(self, train_loader: Batches) -> None: ...

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedException(type(self).__name__)

    # ---------------------------------------------------------------------------- gradients

    def _check_input(self, x: Tensor, y: Tensor, x_name: str, y_name: str) -> tuple[Tensor, Tensor]:
        check_xy(x, y, x_name, y_name)
        if self._input_shape is not None and tuple(x.shape[1:]) != self._input_shape:
            raise ValueError(
                f"{x_name}: feature shape {tuple(x.shape[1:])} differs from the training data's "
                f"{self._input_shape}"
            )
        return self.fm.to_device(x, y)

    def gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample gradients (n, p) in the block layout's order."""
        x, y = self._check_input(x, y, "x", "y")
        grads = self.fm.per_sample_gradients(self.params(), x, y)
        return self.layout.flatten(grads, batch_dims=1)

    def mixed_gradients(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample d/dx grad_theta l: (n, p, *x.shape[1:])."""
        x, y = self._check_input(x, y, "x", "y")
        mixed = self.fm.per_sample_mixed_gradients(self.params(), x, y)
        return self.layout.flatten_with_trailing(mixed, tuple(x.shape[1:]))

    # ---------------------------------------------------------------------------- protocol

    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """F = (H + lambda)^-1 grad l(z) per row (n, q); q = p, or the rank for low-rank methods."""
        self._require_fitted()
        return self._solve(self.gradients(x, y))

    @abstractmethod
    def _solve(self, rhs: Tensor) -> Tensor:
        """(H + lambda)^-1 applied block-wise to the rows of rhs (n, p)."""

    def train_representation(self, x: Tensor, y: Tensor, mode: InfluenceMode = InfluenceMode.UP) -> Tensor:
        """What the train side contributes to the GEMM: gradients (n, q) in up-weighting mode,
        mixed gradients (n, q, *x.shape[1:]) in perturbation mode."""
        self._require_fitted()
        mode = InfluenceMode(mode)
        if mode is InfluenceMode.UP:
            return self.gradients(x, y)
        return self.mixed_gradients(x, y)

    @staticmethod
    def influences_from_representations(
        factors: Tensor, representation: Tensor, mode: InfluenceMode = InfluenceMode.UP
    ) -> Tensor:
        """The influence block: factors (n_test, q) against representations (n_train, q, ...)."""
        if InfluenceMode(mode) is InfluenceMode.UP:
            return factors @ representation.T
        return torch.einsum("iq,jq...->ij...", factors, representation)

    def influences_from_factors(
        self, factors: Tensor, x: Tensor, y: Tensor, mode: InfluenceMode = InfluenceMode.UP
    ) -> Tensor:
        """Influences (n_test, n_train[, *features]) of (x, y) on the test points behind `factors`."""
        if not isinstance(factors, Tensor) or factors.dim() != 2:
            raise ValueError("factors: expected the (n_test, q) tensor returned by influence_factors")
        rep = self.train_representation(x, y, mode)
        return self.influences_from_representations(factors.to(rep.device, rep.dtype), rep, mode)

    def influences(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.UP,
    ) -> Tensor:
        """Influences of (x, y) on (x_test, y_test); x=None uses the test points themselves."""
        self._require_fitted()
        if (x is None) != (y is None):
            raise ValueError("x and y: give both or neither")
        check_xy(x_test, y_test, "x_test", "y_test")
        factors = self.influence_factors(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return self.influences_from_factors(factors, x, y, mode)

    # ---------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to use the fitted method elsewhere without refitting."""
        self._require_fitted()
        return {
            "method": type(self).__name__,
            "layout": {"names": list(self.layout.names), "shapes": [list(s) for s in self.layout.shapes]},
            "input_shape": list(self._input_shape or ()),
            "options": self.parameters_summary(),
            "state": self._state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], train_loader: Optional[Batches] = None) -> "InfluenceFunctionModel":
        """Restore a fitted state saved by `state_dict` (on this instance's device and dtype);
        methods that solve against the training data also take its loader."""
        if self.needs_train_loader:
            if train_loader is None:
                raise ValueError(f"train_loader: {type(self).__name__}.load_state_dict needs the training loader "
                                 "(its solves use the training data)")
            self._train_loader = train_loader
        if state.get("method") != type(self).__name__:
            raise ValueError(f"state: was saved by {state.get('method')!r}, not {type(self).__name__}")
        saved = dict(zip(state["layout"]["names"], (tuple(s) for s in state["layout"]["shapes"])))
        current = dict(zip(self.layout.names, (tuple(s) for s in self.layout.shapes)))
        if saved != current:
            diff = sorted(
                f"{n}: saved {saved.get(n)} vs model {current.get(n)}"
                for n in set(saved) | set(current)
                if saved.get(n) != current.get(n)
            )
            raise ValueError(f"state: the model changed since fit (parameter shapes differ): {diff}")
        ours = self.parameters_summary()
        theirs = state["options"]
        differs = sorted(k for k in set(ours) | set(theirs) if _jsonable(ours.get(k)) != _jsonable(theirs.get(k)))
        if differs:
            raise ValueError(
                "state: was fitted with other options: "
                + ", ".join(f"{k}={theirs.get(k)!r} (here {ours.get(k)!r})" for k in differs)
            )
        self._input_shape = tuple(state["input_shape"])
        self._load_state(_to(state["state"], self.device, self.dtype))
        self._fitted = True
        return self

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None: ...


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _to(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move every floating tensor of a nested state to device/dtype."""
    if isinstance(obj, Tensor):
        return obj.to(device, dtype if obj.is_floating_point() else None)
    if isinstance(obj, Mapping):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device, dtype) for v in obj)
    return obj
