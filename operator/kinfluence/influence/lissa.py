"""LiSSA influence: a stochastic Neumann-series estimate of (H + lambda)^-1 (Agarwal et al. 2017)."""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from .base import Batches, InfluenceFunctionModel
from .blocks import BlockStructure, Regularization
from .functional import LossFn, second_order_product
from .modes import BlockMode, SecondOrderMode


class LissaInfluence(InfluenceFunctionModel):
    """Influence by the LiSSA recursion, one training batch per step:

        h_0 = b,   h_{t+1} = b + (1 - dampen) h_t - (H_batch + lambda) h_t / scale,
        (H + lambda)^-1 b ~ h_T / scale,

    which converges when scale exceeds the largest eigenvalue of H + lambda. `samples`
    independent recursions are averaged. Stops early when the relative change of every
    row falls below rtol; warns when the iteration diverges or hits maxiter (the depth).
    """

    is_thread_safe = False
    needs_train_loader = True

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        maxiter: int = 1000,
        dampen: float = 0.0,
        scale: float = 10.0,
        samples: int = 1,
        rtol: float = 1e-4,
        warn_on_max_iteration: bool = True,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        super().__init__(model, loss, regularization, second_order_mode, block_structure)
        for name, value, ok in (
            ("maxiter", maxiter, maxiter > 0),
            ("scale", scale, scale > 0),
            ("samples", samples, samples > 0),
            ("dampen", dampen, 0 <= dampen < 1),
            ("rtol", rtol, rtol >= 0),
        ):
            if not ok:
                raise ValueError(f"{name}: invalid value {value!r} (maxiter, scale, samples > 0; 0 <= dampen < 1)")
        self.maxiter, self.dampen, self.scale = maxiter, dampen, scale
        self.samples, self.rtol = samples, rtol
        self.warn_on_max_iteration = warn_on_max_iteration
        self._train_loader: Optional[Batches] = None
        #: per block: the largest eigenvalue of H + lambda estimated at fit (power iteration)
        self.largest_eigenvalue: dict[str, float] = {}

    def _options(self) -> dict[str, Any]:
        return {"maxiter": self.maxiter, "dampen": self.dampen, "scale": self.scale,
                "samples": self.samples, "rtol": self.rtol}

    def _fit(self, train_loader: Batches) -> None:
        self._train_loader = train_loader
        first = [next(iter(train_loader))]
        self.largest_eigenvalue = {}
        for block, sl in self.block_slices.items():
            params = self.params(block)
            gen = torch.Generator().manual_seed(0)
            v = torch.randn(1, sl.stop - sl.start, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
            estimate = 0.0
            for _ in range(20):
                hv = second_order_product(self.fm, params, first, v, self.second_order_mode)
                estimate = float(torch.linalg.norm(hv))
                v = hv / max(estimate, torch.finfo(self.dtype).tiny)
            top = estimate + self.regularization[block]
            self.largest_eigenvalue[block] = top
            if top >= self.scale:
                warnings.warn(
                    f"LissaInfluence: scale={self.scale} is below the estimated largest eigenvalue "
                    f"{top:.3g} of the curvature of block {block!r}: the recursion will diverge; "
                    f"use scale >= {2 * top:.3g}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        assert self._train_loader is not None
        while True:
            empty = True
            for batch in self._train_loader:
                empty = False
                yield batch
            if empty:
                raise ValueError("train_loader: is empty (no batches)")

    def _solve(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        for block, sl in self.block_slices.items():
            out[:, sl] = self._solve_block(block, rhs[:, sl])
        return out

    def _solve_block(self, block: str, b: Tensor) -> Tensor:
        params = self.params(block)
        reg = self.regularization[block]
        estimates = []
        for _ in range(self.samples):
            batches = self._batches()
            h = b.clone()
            converged = False
            for it in range(self.maxiter):
                x, y = next(batches)
                hh = second_order_product(self.fm, params, [(x, y)], h, self.second_order_mode) + reg * h
                new = b + (1 - self.dampen) * h - hh / self.scale
                if not bool(torch.isfinite(new).all()) or float(new.abs().max()) > 1e12 * (1 + float(b.abs().max())):
                    warnings.warn(
                        f"LissaInfluence: the recursion diverged at iteration {it} for block {block!r}; "
                        f"increase scale (now {self.scale}) above the largest eigenvalue of H + lambda "
                        f"(~{self.largest_eigenvalue.get(block, float('nan')):.3g}) or add dampen",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    return torch.full_like(b, float("nan"))
                change = torch.linalg.norm(new - h, dim=1) / torch.linalg.norm(new, dim=1).clamp_min(
                    torch.finfo(b.dtype).tiny
                )
                h = new
                if float(change.max()) < self.rtol:
                    converged = True
                    break
            if not converged and self.warn_on_max_iteration:
                warnings.warn(
                    f"LissaInfluence: did not reach rtol={self.rtol} in maxiter={self.maxiter} iterations "
                    f"for block {block!r}; raise maxiter or scale",
                    RuntimeWarning,
                    stacklevel=4,
                )
            estimates.append(h / self.scale)
        return torch.stack(estimates).mean(dim=0)

    def _state(self) -> dict[str, Any]:
        return {"largest_eigenvalue": {b: torch.tensor(v, dtype=torch.float64) for b, v in self.largest_eigenvalue.items()}}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.largest_eigenvalue = {b: float(v) for b, v in state["largest_eigenvalue"].items()}
