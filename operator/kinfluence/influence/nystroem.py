"""Nystroem sketch influence: a randomized low-rank approximation of PSD curvature."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import BlockStructure, Regularization
from .functional import LossFn
from .lowrank import Eigen, LowRankInfluence, MatVec, Rank, nystroem_eigen
from .modes import BlockMode, SecondOrderMode


class NystroemSketchInfluence(LowRankInfluence):
    """Influence through a rank-k randomized Nystroem approximation of each block:

        H_bb ~ (H Omega)(Omega^T H Omega)^+ (H Omega)^T = U diag(s) U^T,
        (H_bb + lambda_b)^-1 ~ U (diag(s) + lambda_b)^-1 U^T,

    from ONE pass over the training data per block (k curvature-vector products at once).
    Needs PSD curvature: use Gauss-Newton unless H is known to be PSD (convex losses).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        rank: Rank = 10,
        seed: int = 0,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        super().__init__(model, loss, regularization, rank, second_order_mode, block_structure)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.seed = seed

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "seed": self.seed}

    def _eigen(self, block: str, matvec: MatVec, size: int, rank: int) -> Eigen:
        offset = list(self.blocks).index(block)
        gen = torch.Generator().manual_seed(self.seed + offset)
        return nystroem_eigen(matvec, size, rank, gen, self.device, self.dtype, block)
