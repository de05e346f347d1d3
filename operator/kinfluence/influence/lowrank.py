"""What Arnoldi and Nystroem influence share: a per-block low-rank eigenbasis of the curvature.

Each block b keeps H_bb ~ V_b diag(Lambda_b) V_b^T with V_b (p_b, k_b) orthonormal, and

    (H_bb + lambda_b I)^-1 ~ V_b (Lambda_b + lambda_b)^-1 V_b^T

(directions outside span V_b are dropped, as in pyDVL). Test factors and train
representations both live in the k-dimensional basis:

    F = G_test V (Lambda + lambda)^-1   (n_test, k),     R = G_train V   (n_train, k),

so an influence block is a k-dimensional GEMM F R^T. Blocks concatenate along k.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .base import Batches, InfluenceFunctionModel
from .blocks import BlockStructure, Regularization
from .errors import SingularHessianError
from .functional import LossFn, second_order_product
from .modes import BlockMode, InfluenceMode, SecondOrderMode

MatVec = Callable[[Tensor], Tensor]
Rank = Union[int, Mapping[str, int]]


@dataclass
class Eigen:
    """Top eigenpairs of a symmetric operator: values (k,), vectors (p, k) orthonormal columns."""

    values: Tensor
    vectors: Tensor
    converged: bool = True
    matvecs: int = 0


def lanczos_eigen(
    matvec: MatVec,
    size: int,
    rank: int,
    krylov_dimension: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Eigen:
    """The `rank` eigenpairs of largest magnitude of a symmetric operator (p, p), matrix-free.

    Thick-restart Lanczos with full reorthogonalization: the basis V (m, p) and the products
    W = A V are kept, the Rayleigh quotient T = V W^T is diagonalized, and once the basis
    reaches `krylov_dimension` it restarts from the `rank` best Ritz vectors Y = S^T V
    (with A Y = S^T W exact, no extra products) plus the next Krylov direction. Stops when
    every kept Ritz pair has ||A y - theta y|| <= tol * max|theta|, when the space is all
    of R^p (exact), or after `max_iter` products (then `converged` is False).
    """
    eps = torch.finfo(dtype).eps

    def random_unit(basis: Optional[Tensor]) -> Tensor:
        v = torch.randn(size, generator=generator, dtype=torch.float64).to(device, dtype)
        if basis is not None and len(basis):
            for _ in range(2):
                v = v - basis.T @ (basis @ v)
        return v / torch.linalg.norm(v)

    rows: list[Tensor] = []
    products: list[Tensor] = []
    nxt: Optional[Tensor] = random_unit(None)
    n_mv = 0
    while True:
        while len(rows) < krylov_dimension and nxt is not None:
            w = matvec(nxt[None])[0]
            n_mv += 1
            rows.append(nxt)
            products.append(w)
            nxt = None
            if len(rows) == size:
                break
            basis = torch.stack(rows)
            r = w
            for _ in range(2):  # full reorthogonalization, twice is enough
                r = r - basis.T @ (basis @ r)
            beta = torch.linalg.norm(r)
            scale = max(float(torch.linalg.norm(w)), 1.0)
            if float(beta) <= 100 * eps * scale:  # invariant subspace: continue from a fresh direction
                nxt = random_unit(basis)
            else:
                nxt = r / beta
            if n_mv >= max_iter:
                break
        basis, prods = torch.stack(rows), torch.stack(products)
        t = basis @ prods.T
        theta, s = torch.linalg.eigh((t + t.T) / 2)
        order = torch.argsort(theta.abs(), descending=True)[:rank]
        theta, s = theta[order], s[:, order]
        y, ay = s.T @ basis, s.T @ prods
        residual = torch.linalg.norm(ay - theta[:, None] * y, dim=1)
        top = float(theta.abs().max()) if len(theta) else 0.0
        exact = len(rows) == size
        converged = exact or bool((residual <= tol * max(top, eps)).all())
        if converged or n_mv >= max_iter:
            # the largest-magnitude pairs first; re-orthonormalize against rounding
            q, _ = torch.linalg.qr(y.T)
            signs = torch.sign(torch.sum(q * y.T, dim=0))
            return Eigen(theta, q * torch.where(signs == 0, torch.ones_like(signs), signs), converged, n_mv)
        rows, products = list(y), list(ay)


def nystroem_eigen(
    matvec: MatVec,
    size: int,
    rank: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    block: str,
) -> Eigen:
    """Randomized Nystroem approximation A ~ (A Omega)(Omega^T A Omega)^+ (A Omega)^T of a PSD
    operator, as eigenpairs (Tropp et al. 2017, stable form).

    Omega (p, k) is an orthonormalized Gaussian sketch drawn row by row, so the sketches of
    increasing rank are nested. One batched pass: Y = A Omega (k products at once, vmap).
    Shift nu = eps ||Y|| p for stability: Y_nu = Y + nu Omega, C = chol(Omega^T Y_nu),
    B = Y_nu C^-T, B = U Sigma W^T (thin SVD), eigenvalues max(Sigma^2 - nu, 0), vectors U.
    """
    sketch = torch.randn(rank, size, generator=generator, dtype=torch.float64)
    omega = torch.linalg.qr(sketch.T)[0].to(device, dtype)  # (p, k)
    y = matvec(omega.T).T  # (p, k)
    nu = torch.finfo(dtype).eps * float(torch.linalg.norm(y)) * size
    y_nu = y + nu * omega
    core = omega.T @ y_nu
    chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
    if int(info) != 0:
        raise ValueError(
            f"second_order_mode: the curvature of block {block!r} is not positive semi-definite "
            "(the Nystroem core Omega^T H Omega has no Cholesky factor); NystroemSketchInfluence "
            "needs PSD curvature: use second_order_mode='gauss_newton', or ArnoldiInfluence"
        )
    b = torch.linalg.solve_triangular(chol, y_nu.T, upper=False).T  # Y_nu C^-T
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)
    return Eigen((sigma**2 - nu).clamp_min(0.0), u, True, rank)


class LowRankInfluence(InfluenceFunctionModel):
    """Influence through a per-block rank-k eigenbasis of the curvature (see module docstring).

    Subclasses say how the eigenpairs of one block are found (`_eigen`).
    """

    is_thread_safe = False

    def __init__(
        self,
        model: nn.Module,
        loss: LossFn,
        regularization: Regularization = 0.0,
        rank: Rank = 10,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
        block_structure: BlockStructure = BlockMode.FULL,
    ) -> None:
        super().__init__(model, loss, regularization, second_order_mode, block_structure)
        self.ranks = self._resolve_ranks(rank)
        self.rank = rank
        self._eig: dict[str, dict[str, Tensor]] = {}
        #: per block: products used and whether the eigen-solver converged, from the last fit
        self.fit_info: dict[str, dict[str, Any]] = {}

    def block_size(self, block: str) -> int:
        sl = self.block_slices[block]
        return sl.stop - sl.start

    def _resolve_ranks(self, rank: Rank) -> dict[str, int]:
        if isinstance(rank, Mapping):
            unknown = sorted(set(rank) - set(self.blocks))
            missing = [b for b in self.blocks if b not in rank]
            if unknown or missing:
                raise ValueError(
                    f"rank: a per-block mapping must name exactly the blocks {list(self.blocks)}; "
                    f"unknown {unknown}, missing {missing}"
                )
            ranks = dict(rank)
        else:
            ranks = {b: rank for b in self.blocks}
        for b, k in ranks.items():
            if isinstance(k, bool) or not isinstance(k, int):
                raise ValueError(f"rank: expected a positive integer, got {k!r} for block {b!r}")
            if k <= 0:
                raise ValueError(f"rank: must be > 0, got {k} for block {b!r}")
            if k > self.block_size(b):
                raise ValueError(
                    f"rank: {k} exceeds the {self.block_size(b)} parameters of block {b!r}; "
                    f"use rank <= {self.block_size(b)} (or a per-block mapping)"
                )
        return ranks

    @property
    def q(self) -> int:
        """Width of factors and train representations: the sum of the block ranks."""
        return sum(self.ranks.values())

    def _options(self) -> dict[str, Any]:
        return {"rank": dict(self.ranks)}

    # ---------------------------------------------------------------------------- fit

    def _curvature(self, block: str, train_loader: Batches) -> MatVec:
        params = self.params(block)

        def matvec(v: Tensor) -> Tensor:
            return second_order_product(self.fm, params, train_loader, v, self.second_order_mode)

        return matvec

    @abstractmethod
    def _eigen(self, block: str, matvec: MatVec, size: int, rank: int) -> Eigen: ...

    def _fit(self, train_loader: Batches) -> None:
        eig, info = {}, {}
        for block in self.blocks:
            result = self._eigen(block, self._curvature(block, train_loader), self.block_size(block), self.ranks[block])
            shifted = result.values + self.regularization[block]
            scale = float(result.values.abs().max()) if len(result.values) else 0.0
            if float(shifted.abs().min()) <= 10 * torch.finfo(self.dtype).eps * max(scale, 1.0):
                raise SingularHessianError(
                    f"regularization: an eigenvalue of block {block!r} plus regularization="
                    f"{self.regularization[block]} is zero ({float(shifted.abs().min()):.3g}); "
                    "add regularization or lower the rank"
                )
            eig[block] = {"eigenvalues": result.values, "basis": result.vectors}
            info[block] = {"matvecs": result.matvecs, "converged": result.converged}
        self._eig, self.fit_info = eig, info

    def eigen(self, block: str) -> tuple[Tensor, Tensor]:
        """Fitted (eigenvalues (k,), basis (p_b, k)) of one block."""
        self._require_fitted()
        e = self._eig[block]
        return e["eigenvalues"], e["basis"]

    # ---------------------------------------------------------------------------- protocol

    def influence_factors(self, x: Tensor, y: Tensor) -> Tensor:
        """F = G V (Lambda + lambda)^-1 per block, concatenated: (n, sum_b k_b)."""
        self._require_fitted()
        g = self.gradients(x, y)
        parts = []
        for block, sl in self.block_slices.items():
            values, basis = self.eigen(block)
            parts.append((g[:, sl] @ basis) / (values + self.regularization[block]))
        return torch.cat(parts, dim=1)

    def train_representation(self, x: Tensor, y: Tensor, mode: InfluenceMode = InfluenceMode.UP) -> Tensor:
        """Gradients projected on the basis: G V (n, q); in perturbation mode the mixed
        gradients projected: (n, q, *x.shape[1:])."""
        self._require_fitted()
        mode = InfluenceMode(mode)
        full = self.gradients(x, y) if mode is InfluenceMode.UP else self.mixed_gradients(x, y)
        parts = []
        for block, sl in self.block_slices.items():
            _, basis = self.eigen(block)
            parts.append(torch.einsum("np...,pk->nk...", full[:, sl], basis))
        return torch.cat(parts, dim=1)

    def _solve(self, rhs: Tensor) -> Tensor:
        """V (Lambda + lambda)^-1 V^T applied block-wise to the rows of rhs (n, p)."""
        out = torch.empty_like(rhs)
        for block, sl in self.block_slices.items():
            values, basis = self.eigen(block)
            out[:, sl] = ((rhs[:, sl] @ basis) / (values + self.regularization[block])) @ basis.T
        return out

    # ---------------------------------------------------------------------------- state

    def _state(self) -> dict[str, Any]:
        return {"eigen": {b: dict(e) for b, e in self._eig.items()}}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        eig = {}
        for block in self.blocks:
            e = state["eigen"][block]
            if tuple(e["basis"].shape) != (self.block_size(block), self.ranks[block]):
                raise ValueError(
                    f"state: block {block!r} has a basis of shape {tuple(e['basis'].shape)}, expected "
                    f"{(self.block_size(block), self.ranks[block])}"
                )
            eig[block] = {"eigenvalues": e["eigenvalues"], "basis": e["basis"]}
        self._eig = eig


def warn_not_converged(method: str, block: str, matvecs: int, hint: str) -> None:
    """Warn that an iterative eigen-solver stopped at its iteration limit."""
    warnings.warn(
        f"{method}: the eigen-solver for block {block!r} did not converge in {matvecs} "
        f"curvature-vector products; {hint}",
        RuntimeWarning,
        stacklevel=4,
    )
