"""Functional building blocks on torch.func: flat parameter layouts, per-sample gradients,
mixed (d/dx) gradients, Hessian- and Gauss-Newton-vector products streamed over a loader.

Everything here is vectorized (vmap); nothing loops over single-sample backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .modes import SecondOrderMode

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = dict[str, Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """The order and shapes of a set of parameters laid out as one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> "ParamLayout":
        return cls(tuple(params), tuple(t.shape for t in params.values()))

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def n_parameters(self) -> int:
        return sum(self.numels)

    def slices(self) -> dict[str, slice]:
        """Position of each parameter inside the flat vector."""
        out, start = {}, 0
        for name, n in zip(self.names, self.numels):
            out[name] = slice(start, start + n)
            start += n
        return out

    def flatten(self, params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate `params` (each with `batch_dims` leading dims) into (..., p)."""
        parts = []
        for name in self.names:
            t = params[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=batch_dims)

    def flatten_with_trailing(self, params: Mapping[str, Tensor], trailing: tuple[int, ...]) -> Tensor:
        """Flatten (n, *shape, *trailing) tensors into (n, p, *trailing) (mixed gradients)."""
        parts = []
        for name in self.names:
            t = params[name]
            parts.append(t.reshape(t.shape[0], -1, *trailing))
        return torch.cat(parts, dim=1)

    def unflatten(self, vec: Tensor) -> Params:
        """Split (..., p) into a dict of (..., *shape) tensors."""
        lead = vec.shape[:-1]
        out = {}
        for (name, sl), shape in zip(self.slices().items(), self.shapes):
            out[name] = vec[..., sl].reshape(*lead, *shape)
        return out


def trainable_parameters(model: nn.Module) -> Params:
    """Detached trainable parameters (requires_grad=True); frozen ones are excluded."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter."""
    for p in model.parameters():
        return p.device, p.dtype
    raise ValueError("model: has no parameters")


class FunctionalModel:
    """A model and loss viewed as pure functions of a subset of its parameters.

    The remaining parameters and all buffers are held fixed (detached), so
    derivatives are taken with respect to `names` only: this is what restricts a
    Hessian to one block of a block-diagonal structure.
    """

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        self.model = model
        self.loss = loss
        self.device, self.dtype = model_device_dtype(model)

    def _fixed(self, variable: Iterable[str]) -> Params:
        variable = set(variable)
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if n not in variable}
        fixed.update({n: b for n, b in self.model.named_buffers()})
        return fixed

    def to_device(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Move a batch to the model's device; floating tensors take the model's dtype."""
        x = x.to(self.device, self.dtype if x.is_floating_point() else None)
        y = y.to(self.device, self.dtype if y.is_floating_point() else None)
        return x, y

    def outputs_fn(self, params: Params) -> Callable[[Tensor], Tensor]:
        fixed = self._fixed(params)
        return lambda x: functional_call(self.model, {**fixed, **params}, (x,))

    def batch_loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Loss of one batch (the loss's own reduction, a mean over the batch)."""
        fixed = self._fixed(params)
        return self._batch_loss(params, fixed, x, y)

    def _batch_loss(self, params: Params, fixed: Params, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, {**fixed, **params}, (x,))
        return self.loss(out, y)

    # per-sample quantities -------------------------------------------------------------

    def per_sample_gradients(self, params: Params, x: Tensor, y: Tensor) -> Params:
        """grad_theta l(z_i) for every row: dict of (n, *shape)."""
        fixed = self._fixed(params)

        def sample_loss(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
            return self._batch_loss(p, fixed, xi.unsqueeze(0), yi.unsqueeze(0))

        return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)

    def per_sample_mixed_gradients(self, params: Params, x: Tensor, y: Tensor) -> Params:
        """d/dx grad_theta l(z_i): dict of (n, *shape, *x.shape[1:]).

        Reverse-over-forward (grad_theta of a jvp along each input direction) when the
        input is smaller than the parameter vector, reverse-over-reverse otherwise.
        """
        fixed = self._fixed(params)
        feature_shape = tuple(x.shape[1:])
        n_in = int(torch.Size(feature_shape).numel())
        n_par = sum(int(t.numel()) for t in params.values())

        def sample_loss(p: Params, xi: Tensor, yi: Tensor) -> Tensor:
            return self._batch_loss(p, fixed, xi.unsqueeze(0), yi.unsqueeze(0))

        if n_in > n_par:
            def by_reverse(xi: Tensor, yi: Tensor) -> Params:
                return jacrev(lambda xx: grad(sample_loss)(params, xx, yi))(xi)

            return vmap(by_reverse)(x, y)

        directions = torch.eye(n_in, device=x.device, dtype=x.dtype).reshape(n_in, *feature_shape)

        def by_forward(xi: Tensor, yi: Tensor) -> Params:
            def along(e: Tensor) -> Params:
                return grad(lambda p: jvp(lambda xx: sample_loss(p, xx, yi), (xi,), (e,))[1])(params)

            cols = vmap(along)(directions)  # (n_in, *shape)
            return {k: v.movedim(0, -1).reshape(*v.shape[1:], *feature_shape) for k, v in cols.items()}

        return vmap(by_forward)(x, y)

    # curvature-vector products on one batch ------------------------------------------

    def batch_hvp(self, params: Params, x: Tensor, y: Tensor, vectors: Params) -> Params:
        """Hessian of the batch loss times k vectors (dict of (k, *shape)).

        Reverse-over-forward (grad of a jvp): the same cost as forward-over-reverse, and
        it also works for losses whose backward has no forward-mode rule (mse_loss in torch 2.13).
        """
        fixed = self._fixed(params)

        def one(v: Params) -> Params:
            return grad(lambda p: jvp(lambda q: self._batch_loss(q, fixed, x, y), (p,), (v,))[1])(params)

        return vmap(one)(vectors)

    def batch_gnvp(self, params: Params, x: Tensor, y: Tensor, vectors: Params) -> Params:
        """Gauss-Newton matrix J^T (d^2 loss / d out^2) J of the batch times k vectors."""
        fixed = self._fixed(params)

        def forward(p: Params) -> Tensor:
            return functional_call(self.model, {**fixed, **p}, (x,))

        out, pullback = vjp(forward, params)
        out = out.detach()

        def loss_hvp(u: Tensor) -> Tensor:
            return grad(lambda o: jvp(lambda oo: self.loss(oo, y), (o,), (u,))[1])(out)

        def one(v: Params) -> Params:
            jv = jvp(forward, (params,), (v,))[1]
            return pullback(loss_hvp(jv))[0]

        return vmap(one)(vectors)


def second_order_product(
    fm: FunctionalModel,
    params: Params,
    batches: Iterable[tuple[Tensor, Tensor]],
    vectors: Tensor,
    mode: SecondOrderMode,
) -> Tensor:
    """M @ V for V (k, p): M the MEAN Hessian (or Gauss-Newton matrix) over all points.

    Each batch's mean-loss curvature is weighted by its size n_b / N, so a short
    last batch counts per point, not as a full batch.
    """
    layout = ParamLayout.of(params)
    v = layout.unflatten(vectors)
    product = fm.batch_hvp if mode is SecondOrderMode.HESSIAN else fm.batch_gnvp
    total = torch.zeros_like(vectors)
    n_total = 0
    for x, y in batches:
        x, y = fm.to_device(x, y)
        n_b = len(x)
        total += n_b * layout.flatten(product(params, x, y, v), batch_dims=1)
        n_total += n_b
    if n_total == 0:
        raise ValueError("train_loader: is empty (no batches)")
    return total / n_total


def second_order_matrix(
    fm: FunctionalModel,
    params: Params,
    batches: Iterable[tuple[Tensor, Tensor]],
    mode: SecondOrderMode,
    column_chunk: int = 256,
) -> Tensor:
    """The explicit (p, p) mean Hessian / Gauss-Newton matrix, from products with chunks of
    identity columns, in ONE pass over the data."""
    layout = ParamLayout.of(params)
    p = layout.n_parameters
    eye = torch.eye(p, device=fm.device, dtype=fm.dtype)
    chunks = [layout.unflatten(eye[i : i + column_chunk]) for i in range(0, p, column_chunk)]
    product = fm.batch_hvp if mode is SecondOrderMode.HESSIAN else fm.batch_gnvp
    total = torch.zeros(p, p, device=fm.device, dtype=fm.dtype)
    n_total = 0
    for x, y in batches:
        x, y = fm.to_device(x, y)
        n_b = len(x)
        for i, v in zip(range(0, p, column_chunk), chunks):
            total[i : i + column_chunk] += n_b * layout.flatten(product(params, x, y, v), batch_dims=1)
        n_total += n_b
    if n_total == 0:
        raise ValueError("train_loader: is empty (no batches)")
    m = total / n_total
    return (m + m.T) / 2
