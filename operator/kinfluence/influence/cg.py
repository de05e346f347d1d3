"""Conjugate gradient influence: matrix-free solves with many right-hand sides at once."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from .base import Batches, InfluenceFunctionModel
from .blocks import BlockStructure, Regularization
from .functional import LossFn, second_order_product
from .modes import BlockMode, SecondOrderMode
from .preconditioners import JacobiPreconditioner, NystroemPreconditioner, Preconditioner

logger = logging.getLogger(__name__)

MatVec = Callable[[Tensor], Tensor]


@dataclass
class CgResult:
    """Outcome of one batched solve: iterations used, which right-hand sides converged."""

    solution: Tensor
    iterations: int
    converged: Tensor  # (k,) bool
    relative_residual: Tensor  # (k,)


def batched_cg(
    matvec: MatVec,
    rhs: Tensor,
    precondition: Optional[MatVec] = None,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    maxiter: int = 100,
) -> CgResult:
    """Preconditioned CG on A X = B for the k rows of rhs at once (one matvec per iteration
    serves all rows); each row stops updating when ||r|| <= max(rtol ||b||, atol)."""
    precondition = precondition or (lambda r: r)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    b_norm = torch.linalg.norm(rhs, dim=1)
    threshold = torch.maximum(rtol * b_norm, torch.full_like(b_norm, atol))
    done = torch.linalg.norm(r, dim=1) <= threshold
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum(dim=1)
    it = 0
    while not bool(done.all()) and it < maxiter:
        it += 1
        ap = matvec(p)
        pap = (p * ap).sum(dim=1)
        active = ~done & (pap != 0)
        alpha = torch.where(active, rz / torch.where(active, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        done = done | (torch.linalg.norm(r, dim=1) <= threshold)
        z = precondition(r)
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(~done & (rz != 0), rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    rel = torch.linalg.norm(r, dim=1) / b_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    return CgResult(x, it, done, rel)


def _orth(m: Tensor) -> Tensor:
    """Orthonormal basis of the column space of m (p, k), dropping dependent directions."""
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if len(s) == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    keep = s > s[0] * torch.finfo(m.dtype).eps * max(m.shape) * 10
    return u[:, keep]


def block_cg(
    matvec: MatVec,
    rhs: Tensor,
    precondition: Optional[MatVec] = None,
    rtol: float = 1e-7,
    atol: float = 1e-7,
    maxiter: int = 100,
) -> CgResult:
    """Breakdown-free block preconditioned CG (Ji & Li 2017): the k right-hand sides share
    one Krylov space, so related right-hand sides converge in fewer iterations.

    Column form, A = H + lambda, R residuals, Z = M^-1 R, orthonormal directions P:
        alpha = (P^T A P)^-1 P^T R,  X += P alpha,  R -= A P alpha,
        beta = -(P^T A P)^-1 (A P)^T Z,  P = orth(Z + P beta).
    Re-orthonormalizing P drops directions that became dependent (rank deficiency as
    right-hand sides converge), which breaks plain block CG.
    """
    precondition = precondition or (lambda r: r)
    b = rhs.T  # (p, k)
    x = torch.zeros_like(b)
    r = b.clone()
    b_norm = torch.linalg.norm(b, dim=0)
    threshold = torch.maximum(rtol * b_norm, torch.full_like(b_norm, atol))
    done = torch.linalg.norm(r, dim=0) <= threshold
    p = _orth(precondition(r.T).T)
    it = 0
    while not bool(done.all()) and it < maxiter and p.shape[1] > 0:
        it += 1
        q = matvec(p.T).T  # (p, r)
        ptq = p.T @ q
        ptq = (ptq + ptq.T) / 2
        alpha = torch.linalg.solve(ptq, p.T @ r)
        x += p @ alpha
        r -= q @ alpha
        done = torch.linalg.norm(r, dim=0) <= threshold
        z = precondition(r.T).T
        beta = -torch.linalg.solve(ptq, q.T @ z)
        p = _orth(z + p @ beta)
    rel = torch.linalg.norm(r, dim=0) / b_norm.clamp_min(torch.finfo(rhs.dtype).tiny)
    return CgResult(x.T, it, done, rel)


def make_preconditioner(spec: Any) -> Optional[Preconditioner]:
    """A Preconditioner from an instance, a name ('jacobi', 'nystroem') or None."""
    if spec is None or isinstance(spec, Preconditioner):
        return spec
    if spec == "jacobi":
        return JacobiPreconditioner()
    if spec == "nystroem":
        return NystroemPreconditioner()
    raise ValueError(
        f"pre_conditioner: expected None, 'jacobi', 'nystroem' or a Preconditioner, got {spec!r}"
    )


class CgInfluence(InfluenceFunctionModel):
    """Influence by conjugate gradient on (H_bb + lambda_b I) X = grad l(z_test), matrix-free.

    All test points of a call are solved together: one pass over the training data per
    iteration computes the curvature products for every right-hand side (vmap).
    `use_block_cg` shares one Krylov space across right-hand sides. Keeps a reference
    to the training loader, which the solves need.
    """

    is_thread_safe = False
    needs_train_loader = True

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        rtol: float = 1e-7,
        atol: float = 1e-7,
        maxiter: Optional[int] = None,
        pre_conditioner: Any = None,
        use_block_cg: bool = False,
        warn_on_max_iteration: bool = True,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        super().__init__(model, loss, regularization, second_order_mode, block_structure)
        if not rtol >= 0 or not atol >= 0:
            raise ValueError(f"rtol and atol: must be >= 0, got rtol={rtol}, atol={atol}")
        if maxiter is not None and maxiter <= 0:
            raise ValueError(f"maxiter: must be > 0 or None, got {maxiter}")
        self.rtol, self.atol, self.maxiter = rtol, atol, maxiter
        self.use_block_cg = use_block_cg
        self.warn_on_max_iteration = warn_on_max_iteration
        self._preconditioner_spec = make_preconditioner(pre_conditioner)
        self._preconditioners: dict[str, Preconditioner] = {}
        self._train_loader: Optional[Batches] = None
        #: per block: iterations, converged count and worst relative residual of the last solve
        self.last_solve_info: dict[str, dict[str, float]] = {}

    def _options(self) -> dict[str, Any]:
        pre = self._preconditioner_spec
        return {
            "rtol": self.rtol, "atol": self.atol, "maxiter": self.maxiter,
            "use_block_cg": self.use_block_cg,
            "pre_conditioner": None if pre is None else pre.options(),
        }

    def _matvec(self, block: str) -> MatVec:
        params = self.params(block)
        reg = self.regularization[block]
        loader = self._train_loader
        assert loader is not None

        def matvec(v: Tensor) -> Tensor:
            return second_order_product(self.fm, params, loader, v, self.second_order_mode) + reg * v

        return matvec

    def _fit(self, train_loader: Batches) -> None:
        self._train_loader = train_loader
        self._preconditioners = {}
        pre = self._preconditioner_spec
        if pre is None:
            return
        for block, sl in self.block_slices.items():
            reg = self.regularization[block]
            params = self.params(block)

            def curvature(v: Tensor, params: dict = params) -> Tensor:
                return second_order_product(self.fm, params, train_loader, v, self.second_order_mode)

            self._preconditioners[block] = self._new_preconditioner().fit(
                curvature, sl.stop - sl.start, reg, self.device, self.dtype
            )

    def _solve(self, rhs: Tensor) -> Tensor:
        out = torch.empty_like(rhs)
        solver = block_cg if self.use_block_cg else batched_cg
        for block, sl in self.block_slices.items():
            size = sl.stop - sl.start
            maxiter = self.maxiter or min(2 * size, 1000)
            pre = self._preconditioners.get(block)
            result = solver(
                self._matvec(block), rhs[:, sl], pre.solve if pre else None, self.rtol, self.atol, maxiter
            )
            out[:, sl] = result.solution
            n_bad = int((~result.converged).sum())
            self.last_solve_info[block] = {
                "iterations": result.iterations,
                "converged": int(result.converged.sum()),
                "max_relative_residual": float(result.relative_residual.max()) if len(rhs) else 0.0,
            }
            logger.debug("CG block %s: %s", block, self.last_solve_info[block])
            if n_bad and self.warn_on_max_iteration:
                warnings.warn(
                    f"CgInfluence: CG did not converge in maxiter={maxiter} iterations for {n_bad} of "
                    f"{len(rhs)} right-hand sides of block {block!r} (worst relative residual "
                    f"{self.last_solve_info[block]['max_relative_residual']:.3g}); raise maxiter, add "
                    "regularization or use a pre_conditioner",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return out

    def _state(self) -> dict[str, Any]:
        return {"preconditioners": {b: p.state_dict() for b, p in self._preconditioners.items()}}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._preconditioners = {}
        for block, sd in state["preconditioners"].items():
            fresh = self._new_preconditioner()
            fresh.load_state_dict(dict(sd))
            self._preconditioners[block] = fresh

    def _new_preconditioner(self) -> Preconditioner:
        """An unfitted copy of the configured preconditioner (one per block)."""
        pre = self._preconditioner_spec
        assert pre is not None
        return type(pre)(**{k: v for k, v in pre.options().items() if k != "name"})
