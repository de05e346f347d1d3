"""EK-FAC influence: eigenvalue-corrected Kronecker factors of the Gauss-Newton matrix, per layer.

For an nn.Linear layer with input a (bias folded in as a trailing 1: a_bar = [a, 1]) and
pre-activation s, a per-sample gradient is the outer product D = ds a_bar^T
(d_out, d_in + 1). The Gauss-Newton matrix of the layer, with the output Hessian
H_out = L L^T of each sample's loss (for cross-entropy diag(p) - p p^T, the true Fisher),

    G_l = mean_i sum_c vec(ds_ic a_bar_i^T) vec(ds_ic a_bar_i^T)^T,   ds_ic = J_s^T L_i[:, c],

is approximated (K-FAC) by S (x) A with S = mean_i sum_c ds_ic ds_ic^T and
A = mean_i a_bar_i a_bar_i^T. With S = Q_S diag(l_S) Q_S^T and A = Q_A diag(l_A) Q_A^T,
EK-FAC keeps the eigenbasis Q_S (x) Q_A and replaces the eigenvalues by the exact
second moments of the gradients in that basis (George et al. 2018):

    Lambda[o, k] = mean_i sum_c (Q_S^T ds_ic)_o^2 (Q_A^T a_bar_i)_k^2      (update_diagonal)
    Lambda[o, k] = l_S[o] l_A[k]                                            (plain K-FAC)

Influence per layer, in the eigenbasis (u = Q_S^T ds, v = Q_A^T a_bar):

    I_l(z_test, z) = sum_{o,k} u_test[o] v_test[k] u[o] v[k] / (Lambda[o, k] + lambda_l),

and I = sum_l I_l (the curvature is block-diagonal by layer). Everything is computed from
(ds, a) of one layer at a time; no per-sample gradient of the whole model is ever formed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from .base import Batches, InfluenceFunctionModel, check_xy
from .blocks import Regularization
from .functional import LossFn
from .modes import InfluenceMode, SecondOrderMode

LOSSES: dict[str, LossFn] = {
    "cross_entropy": nn.functional.cross_entropy,
    "mse": nn.functional.mse_loss,
}


@dataclass(frozen=True)
class LinearLayer:
    """One supported layer: its module path, sizes and the parameter names it contributes."""

    name: str
    module: nn.Linear
    has_bias: bool
    param_names: tuple[str, ...]

    @property
    def d_in(self) -> int:
        return self.module.in_features + (1 if self.has_bias else 0)

    @property
    def d_out(self) -> int:
        return self.module.out_features


def find_linear_layers(model: nn.Module) -> list[LinearLayer]:
    """The nn.Linear layers with trainable weights; any other module owning trainable
    parameters is refused, by name."""
    layers, unsupported = [], []
    for name, module in model.named_modules():
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        label = name or "<root>"
        if type(module) is not nn.Linear:
            unsupported.append(f"{label} ({type(module).__name__})")
            continue
        if "weight" not in own:
            unsupported.append(f"{label} (nn.Linear with a frozen weight but a trainable bias)")
            continue
        prefix = f"{name}." if name else ""
        has_bias = "bias" in own
        names = (prefix + "weight",) + ((prefix + "bias",) if has_bias else ())
        layers.append(LinearLayer(name or "linear", module, has_bias, names))
    if unsupported:
        raise ValueError(
            "model: EkfacInfluence supports nn.Linear layers only, but these modules have trainable "
            f"parameters: {unsupported}; freeze them (requires_grad_(False)) or use another method "
            "(ArnoldiInfluence, NystroemSketchInfluence, CgInfluence)"
        )
    return layers


class EkfacInfluence(InfluenceFunctionModel):
    """Influence through EK-FAC (see the module docstring) of the Gauss-Newton matrix,
    block-diagonal by nn.Linear layer.

    `loss` is a callable loss(outputs, targets) with mean reduction, or "cross_entropy" /
    "mse". Its per-sample output Hessian is computed exactly (torch.func) for each point
    and factored, so the Fisher expectation over classes is exact, not sampled: cost
    O(d_out^3) per point and one backward pass per output dimension. Assumes every layer
    runs once per forward on (batch, features) inputs and that samples do not interact
    (e.g. no batch norm in training mode).
    """

    is_thread_safe = False  # registers forward hooks on the model

    def __init__(
        self,
        model: nn.Module,
        loss: Union[str, LossFn] = "cross_entropy",
        update_diagonal: bool = True,
        hessian_regularization: Regularization = 1e-5,
        progress: bool = False,
    ) -> None:
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"loss: expected one of {sorted(LOSSES)} or a callable, got {loss!r}")
            loss = LOSSES[loss]
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        layers = find_linear_layers(model)
        if not layers:
            raise ValueError("model: has no nn.Linear layer with trainable parameters")
        blocks = {layer.name: list(layer.param_names) for layer in layers}
        super().__init__(model, loss, hessian_regularization, SecondOrderMode.GAUSS_NEWTON, blocks)
        self.layers = {layer.name: layer for layer in layers}
        self.update_diagonal = bool(update_diagonal)
        self.progress = progress
        self._kfac: dict[str, dict[str, Tensor]] = {}

    def _options(self) -> dict[str, Any]:
        return {"update_diagonal": self.update_diagonal}

    # ---------------------------------------------------------------------------- per-layer capture

    def _forward(self, x: Tensor) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Model outputs and, per layer, (a_bar (n, d_in[+1]), pre-activation s (n, d_out))."""
        captured: dict[str, tuple[Tensor, Tensor]] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                if name in captured:
                    raise ValueError(
                        f"model: layer {name!r} ran twice in one forward pass; EkfacInfluence needs "
                        "each nn.Linear to be used once (no weight sharing)"
                    )
                captured[name] = (inputs[0], output)

            return record

        handles = [layer.module.register_forward_hook(hook(name)) for name, layer in self.layers.items()]
        try:
            with torch.enable_grad():
                out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        result = {}
        for name, layer in self.layers.items():
            if name not in captured:
                raise ValueError(f"model: layer {name!r} did not run in the forward pass")
            a, s = captured[name]
            if a.dim() != 2:
                raise ValueError(
                    f"model: layer {name!r} got input of shape {tuple(a.shape)}; EkfacInfluence "
                    "supports nn.Linear on (batch, features) inputs only"
                )
            if layer.has_bias:
                a = torch.cat([a, torch.ones(len(a), 1, device=a.device, dtype=a.dtype)], dim=1)
            result[name] = (a, s)
        return out, result

    def _loss_gradients(
        self, x: Tensor, y: Tensor, create_graph: bool = False
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer (a_bar, ds) of each sample's own loss: ds_i = d l(z_i) / d s_i."""
        out, layers = self._forward(x)
        names = list(layers)
        total = self.loss(out, y) * len(x)  # mean reduction: the sum of per-sample losses
        grads = torch.autograd.grad(total, [layers[n][1] for n in names], create_graph=create_graph)
        return {n: (layers[n][0] if create_graph else layers[n][0].detach(), g) for n, g in zip(names, grads)}

    def _fisher_gradients(self, x: Tensor, y: Tensor) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        """Per output-Hessian column c, per layer (a_bar, ds_c) with ds_ic = J_s^T L_i[:, c]."""
        out, layers = self._forward(x)
        names = list(layers)
        o = out.detach()
        flat = o.reshape(len(o), -1)
        shape = o.shape[1:]

        def sample_loss(oi: Tensor, yi: Tensor) -> Tensor:
            return self.loss(oi.reshape(1, *shape), yi.unsqueeze(0))

        hess = vmap(jacrev(jacrev(sample_loss)))(flat, y)  # (n, C, C)
        evals, evecs = torch.linalg.eigh((hess + hess.transpose(1, 2)) / 2)
        factor = evecs * evals.clamp_min(0.0).sqrt()[:, None, :]  # H_out = L L^T, columns of L
        keep = (evals > 0).any(dim=0)
        for c in torch.nonzero(keep).flatten().tolist():
            grads = torch.autograd.grad(
                out, [layers[n][1] for n in names], grad_outputs=factor[:, :, c].reshape(o.shape), retain_graph=True
            )
            yield {n: (layers[n][0].detach(), g) for n, g in zip(names, grads)}

    # ---------------------------------------------------------------------------- fit

    def _batches(self, train_loader: Batches, desc: str) -> Iterator[tuple[Tensor, Tensor]]:
        batches: Any = train_loader
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(train_loader, desc=f"EkfacInfluence: {desc}")
        for x, y in batches:
            check_xy(x, y, "train_loader x", "train_loader y")
            yield self.fm.to_device(x, y)

    def _fit(self, train_loader: Batches) -> None:
        dev, dt = self.device, self.dtype
        cov_a = {n: torch.zeros(l.d_in, l.d_in, device=dev, dtype=dt) for n, l in self.layers.items()}
        cov_s = {n: torch.zeros(l.d_out, l.d_out, device=dev, dtype=dt) for n, l in self.layers.items()}
        n_total = 0
        for x, y in self._batches(train_loader, "covariances"):
            n_total += len(x)
            first = True
            for per_layer in self._fisher_gradients(x, y):
                for name, (a, ds) in per_layer.items():
                    if first:
                        cov_a[name] += a.T @ a
                    cov_s[name] += ds.T @ ds
                first = False
        kfac = {}
        for name in self.layers:
            ev_a, q_a = torch.linalg.eigh(cov_a[name] / n_total)
            ev_s, q_s = torch.linalg.eigh(cov_s[name] / n_total)
            kfac[name] = {"q_a": q_a, "q_s": q_s, "eigenvalues": torch.outer(ev_s, ev_a).clamp_min(0.0)}
        if self.update_diagonal:
            corrected = {n: torch.zeros_like(k["eigenvalues"]) for n, k in kfac.items()}
            for x, y in self._batches(train_loader, "eigenvalue correction"):
                for per_layer in self._fisher_gradients(x, y):
                    for name, (a, ds) in per_layer.items():
                        u, v = ds @ kfac[name]["q_s"], a @ kfac[name]["q_a"]
                        corrected[name] += (u**2).T @ (v**2)
            for name in kfac:
                kfac[name]["eigenvalues"] = corrected[name] / n_total
        self._kfac = kfac

    # ---------------------------------------------------------------------------- protocol

    def _rotated(self, name: str, a: Tensor, ds: Tensor) -> Tensor:
        """Per-sample gradients of one layer in its eigenbasis, flattened: (n, d_out * d_in)."""
        k = self._kfac[name]
        u, v = ds @ k["q_s"], a @ k["q_a"]
        return (u[:, :, None] * v[:, None, :]).reshape(len(a), -1)

    def _inverse_eigenvalues(self, name: str) -> Tensor:
        return 1.0 / (self._kfac[name]["eigenvalues"].reshape(-1) + self.regularization[name])

    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """Per layer, the test gradient in the eigenbasis divided by (Lambda + lambda),
        concatenated in layer order: (n, p)."""
        self._require_fitted()
        x, y = self._check_input(x, y, "x", "y")
        per_layer = self._loss_gradients(x, y)
        return torch.cat(
            [self._rotated(n, a, ds) * self._inverse_eigenvalues(n) for n, (a, ds) in per_layer.items()], dim=1
        )

    def train_representation(self, x: Tensor, y: Tensor, mode: InfluenceMode = InfluenceMode.UP) -> Tensor:
        """Per-layer training gradients in the eigenbasis, concatenated: (n, p)."""
        self._require_fitted()
        if InfluenceMode(mode) is not InfluenceMode.UP:
            raise ValueError(
                "mode: EkfacInfluence.train_representation supports mode='up' only (a perturbation "
                "representation is a (n, p, *features) tensor of the whole model); use "
                "influences / influences_from_factors / influences_by_layer, which compute "
                "perturbation influences layer by layer"
            )
        x, y = self._check_input(x, y, "x", "y")
        per_layer = self._loss_gradients(x, y)
        return torch.cat([self._rotated(n, a, ds) for n, (a, ds) in per_layer.items()], dim=1)

    def _check_factors(self, factors: Tensor) -> None:
        if not isinstance(factors, Tensor) or factors.dim() != 2 or factors.shape[1] != self.n_parameters:
            shape = tuple(factors.shape) if isinstance(factors, Tensor) else type(factors).__name__
            raise ValueError(
                f"factors: expected the (n_test, {self.n_parameters}) tensor returned by influence_factors, got {shape}"
            )

    def _influences_per_layer(
        self, factors: Tensor, x: Tensor, y: Tensor, mode: InfluenceMode, by_layer: bool
    ) -> dict[str, Tensor]:
        """Influence blocks per layer (by_layer) or their sum under the key 'total'."""
        self._require_fitted()
        self._check_factors(factors)
        mode = InfluenceMode(mode)
        x, y = self._check_input(x, y, "x", "y")
        factors = factors.to(self.device, self.dtype)
        if mode is InfluenceMode.UP:
            per_layer = self._loss_gradients(x, y)
            out = {}
            for name, (a, ds) in per_layer.items():
                out[name] = factors[:, self.block_slices[name]] @ self._rotated(name, a, ds).T
            return out if by_layer else {"total": sum(out.values())}
        # perturbation: d/dx_j of I(z_test_i, z_j), by a second backward pass through ds(x)
        x = x.detach().clone().requires_grad_(True)
        per_layer = self._loss_gradients(x, y, create_graph=True)
        blocks = {n: factors[:, self.block_slices[n]] @ self._rotated(n, a, ds).T for n, (a, ds) in per_layer.items()}
        groups = blocks if by_layer else {"total": sum(blocks.values())}
        out = {}
        names = list(groups)
        for gi, (name, m) in enumerate(groups.items()):
            rows = []
            for i in range(len(m)):
                last = gi == len(names) - 1 and i == len(m) - 1
                (g,) = torch.autograd.grad(m[i].sum(), x, retain_graph=not last, allow_unused=True)
                rows.append(torch.zeros_like(x) if g is None else g)
            out[name] = torch.stack(rows) if rows else x.new_zeros((0, *x.shape))
        return out

    def influences_from_factors(
        self, factors: Tensor, x: Tensor, y: Tensor, mode: InfluenceMode = InfluenceMode.UP
    ) -> Tensor:
        """Sum over layers of the per-layer influence blocks (n_test, n_train[, *features])."""
        return self._influences_per_layer(factors, x, y, mode, by_layer=False)["total"].detach()

    def influences_by_layer(
        self,
        x_test: Tensor,
        y_test: Tensor,
        x: Optional[Tensor] = None,
        y: Optional[Tensor] = None,
        mode: InfluenceMode = InfluenceMode.UP,
    ) -> dict[str, Tensor]:
        """Influences split by layer: {layer name: (n_test, n_train[, *features])}; they sum to
        `influences`."""
        self._require_fitted()
        if (x is None) != (y is None):
            raise ValueError("x and y: give both or neither")
        check_xy(x_test, y_test, "x_test", "y_test")
        factors = self.influence_factors(x_test, y_test)
        if x is None:
            x, y = x_test, y_test
        return {n: m.detach() for n, m in self._influences_per_layer(factors, x, y, mode, by_layer=True).items()}

    def _solve(self, rhs: Tensor) -> Tensor:
        """EK-FAC's (G_l + lambda_l)^-1 applied layer-wise to rows of rhs (n, p) in parameter layout:
        D -> Q_S [(Q_S^T D Q_A) / (Lambda + lambda)] Q_A^T on each layer's (d_out, d_in[+1]) matrix."""
        self._require_fitted()
        out = torch.empty_like(rhs)
        for name, layer in self.layers.items():
            sl = self.block_slices[name]
            block = rhs[:, sl]
            n_w = layer.d_out * layer.module.in_features
            mat = block[:, :n_w].reshape(len(rhs), layer.d_out, layer.module.in_features)
            if layer.has_bias:
                mat = torch.cat([mat, block[:, n_w:, None]], dim=2)
            k = self._kfac[name]
            rot = k["q_s"].T @ mat @ k["q_a"]
            rot = rot / (k["eigenvalues"] + self.regularization[name])
            back = k["q_s"] @ rot @ k["q_a"].T
            out[:, sl] = torch.cat(
                [back[:, :, : layer.module.in_features].reshape(len(rhs), -1)]
                + ([back[:, :, -1]] if layer.has_bias else []),
                dim=1,
            )
        return out

    # ---------------------------------------------------------------------------- state

    def _state(self) -> dict[str, Any]:
        return {"layers": {n: dict(k) for n, k in self._kfac.items()}}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        kfac = {}
        for name, layer in self.layers.items():
            k = state["layers"][name]
            if tuple(k["eigenvalues"].shape) != (layer.d_out, layer.d_in):
                raise ValueError(
                    f"state: layer {name!r} has eigenvalues of shape {tuple(k['eigenvalues'].shape)}, "
                    f"expected {(layer.d_out, layer.d_in)}"
                )
            kfac[name] = {"q_a": k["q_a"], "q_s": k["q_s"], "eigenvalues": k["eigenvalues"]}
        self._kfac = kfac
