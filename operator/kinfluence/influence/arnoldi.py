"""Arnoldi (Lanczos) influence: a low-rank eigen-approximation of H from curvature-vector products."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .blocks import BlockStructure, Regularization
from .functional import LossFn
from .lowrank import Eigen, LowRankInfluence, MatVec, Rank, lanczos_eigen, warn_not_converged
from .modes import BlockMode, SecondOrderMode


class ArnoldiInfluence(LowRankInfluence):
    """Influence through the top-`rank` eigenpairs (largest magnitude) of each block of H (or G):

        (H_bb + lambda_b)^-1 ~ V_b (Lambda_b + lambda_b)^-1 V_b^T,

    found by thick-restart Lanczos (the symmetric Arnoldi iteration) on curvature-vector
    products only: one pass over the training data per product, memory 2 * krylov_dimension * p_b.
    Factors and train representations are rank-k (see kinfluence.influence.lowrank).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        rank: Rank = 10,
        krylov_dimension: Optional[int] = None,
        tol: float = 1e-6,
        max_iter: Optional[int] = None,
        seed: int = 0,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        super().__init__(model, loss, regularization, rank, second_order_mode, block_structure)
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol: must be a number > 0, got {tol!r}")
        if max_iter is not None and (not isinstance(max_iter, int) or max_iter <= 0):
            raise ValueError(f"max_iter: must be a positive integer or None, got {max_iter!r}")
        if krylov_dimension is not None:
            if not isinstance(krylov_dimension, int) or isinstance(krylov_dimension, bool):
                raise ValueError(f"krylov_dimension: expected an integer or None, got {krylov_dimension!r}")
            for block, k in self.ranks.items():
                size = self.block_size(block)
                if krylov_dimension > size or krylov_dimension < k or (krylov_dimension == k < size):
                    raise ValueError(
                        f"krylov_dimension: must exceed rank={k} and be at most the {size} parameters "
                        f"of block {block!r} (or equal both), got {krylov_dimension}"
                    )
        self.krylov_dimension = krylov_dimension
        self.tol, self.max_iter, self.seed = float(tol), max_iter, seed

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "krylov_dimension": self.krylov_dimension, "tol": self.tol,
                "max_iter": self.max_iter, "seed": self.seed}

    def krylov_dimension_of(self, block: str) -> int:
        """The Krylov space size used for a block: given, or min(p_b, max(2 k + 1, 20))."""
        if self.krylov_dimension is not None:
            return self.krylov_dimension
        return min(self.block_size(block), max(2 * self.ranks[block] + 1, 20))

    def _eigen(self, block: str, matvec: MatVec, size: int, rank: int) -> Eigen:
        m = self.krylov_dimension_of(block)
        max_iter = self.max_iter or max(20 * m, size)
        offset = list(self.blocks).index(block)
        gen = torch.Generator().manual_seed(self.seed + offset)
        result = lanczos_eigen(matvec, size, rank, m, self.tol, max_iter, gen, self.device, self.dtype)
        if not result.converged:
            warn_not_converged(
                "ArnoldiInfluence", block, result.matvecs,
                f"raise max_iter (now {max_iter}) or krylov_dimension (now {m}), or loosen tol={self.tol}",
            )
        return result
