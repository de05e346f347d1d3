"""Direct influence: the explicit (block) Hessian or Gauss-Newton matrix, factorized once."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .base import Batches, InfluenceFunctionModel
from .blocks import BlockStructure, Regularization
from .errors import SingularHessianError
from .functional import LossFn, second_order_matrix
from .modes import BlockMode, SecondOrderMode


def factorize(matrix: Tensor, block: str, regularization: float) -> dict[str, Tensor]:
    """Cholesky of a regularized symmetric matrix, or an LU fallback when it is indefinite.

    Refuses a numerically singular matrix, naming the regularization that would fix it.
    """
    eig = torch.linalg.eigvalsh(matrix)
    scale = eig.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    tol = matrix.shape[0] * torch.finfo(matrix.dtype).eps * scale * 10
    if eig.abs().min() <= tol:
        raise SingularHessianError(
            f"regularization: the curvature matrix of block {block!r} is singular "
            f"(smallest |eigenvalue| {eig.abs().min().item():.3g}, largest {scale.item():.3g}) "
            f"with regularization={regularization}; add regularization (e.g. {max(scale.item() * 1e-3, 1e-6):.2g})"
        )
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return {"matrix": matrix, "cholesky": chol}
    lu, pivots = torch.linalg.lu_factor(matrix)
    return {"matrix": matrix, "lu": lu, "pivots": pivots}


def solve_factorized(factor: Mapping[str, Tensor], rhs: Tensor) -> Tensor:
    """Rows of rhs (n, p) times the inverse of the factorized matrix."""
    if "cholesky" in factor:
        return torch.cholesky_solve(rhs.T, factor["cholesky"]).T
    return torch.linalg.lu_solve(factor["lu"], factor["pivots"], rhs.T).T


class DirectInfluence(InfluenceFunctionModel):
    """Exact influence through the explicit per-block matrix (H_bb + lambda_b I), factorized.

    Cost: p_b curvature-vector products per block at fit (one pass over the data) and
    O(p_b^2) memory; refuses blocks above `max_parameters` (use CG, Arnoldi, Nystroem
    or EK-FAC, or a layer-wise block structure, for larger models).
    """

    is_thread_safe = False

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
        max_parameters: int = 20_000,
    ) -> None:
        super().__init__(model, loss, regularization, second_order_mode, block_structure)
        largest = max(self.blocks, key=lambda b: self._block_size(b))
        if self._block_size(largest) > max_parameters:
            raise ValueError(
                f"model: block {largest!r} has {self._block_size(largest)} trainable parameters, above "
                f"DirectInfluence's max_parameters={max_parameters} (it builds a p x p matrix); use "
                "CgInfluence, ArnoldiInfluence, NystroemSketchInfluence or EkfacInfluence, a "
                "layer-wise block_structure, or raise max_parameters"
            )
        self.max_parameters = max_parameters
        self._factors: dict[str, dict[str, Tensor]] = {}

    def _block_size(self, block: str) -> int:
        sl = self.block_slices[block]
        return sl.stop - sl.start

    def _fit(self, train_loader: Batches) -> None:
        factors = {}
        for block in self.blocks:
            m = second_order_matrix(self.fm, self.params(block), train_loader, self.second_order_mode)
            reg = self.regularization[block]
            m = m + reg * torch.eye(len(m), device=m.device, dtype=m.dtype)
            factors[block] = factorize(m, block, reg)
        self._factors = factors

    def _solve(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        for block, sl in self.block_slices.items():
            out[:, sl] = solve_factorized(self._factors[block], rhs[:, sl])
        return out

    def _state(self) -> dict[str, Any]:
        return {"factors": self._factors}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._factors = {b: dict(f) for b, f in state["factors"].items()}
