"""Preconditioners for conjugate gradient on (H + lambda I) X = B.

Each is fitted from a matrix-free operator `matvec(V (k, p)) -> (k, p)` and then applies an
approximation of (H + lambda I)^-1 to the rows of a (k, p) tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


class Preconditioner(ABC):
    """Approximate inverse of the regularized curvature, fitted once per block."""

    @abstractmethod
    def fit(self, matvec: MatVec, size: int, regularization: float, device: torch.device, dtype: torch.dtype) -> "Preconditioner": ...

    @abstractmethod
    def solve(self, rhs: Tensor) -> Tensor:
        """M^-1 applied to the rows of rhs (k, p)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Tensor]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def options(self) -> dict[str, object]:
        return {"name": type(self).__name__}


class JacobiPreconditioner(Preconditioner):
    """M = diag(H) + lambda, with diag(H) estimated by Hutchinson's estimator
    E[v * (H v)] over `num_samples` Rademacher vectors (exact in expectation)."""

    def __init__(self, num_samples: int = 16, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples: must be > 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.diagonal: Optional[Tensor] = None

    def fit(self, matvec: MatVec, size: int, regularization: float, device: torch.device, dtype: torch.dtype) -> "JacobiPreconditioner":
        gen = torch.Generator().manual_seed(self.seed)
        v = (torch.randint(0, 2, (self.num_samples, size), generator=gen) * 2 - 1).to(device, dtype)
        diag = (v * matvec(v)).mean(dim=0) + regularization
        # Hutchinson can undershoot on tiny diagonals: keep the preconditioner positive
        floor = max(regularization, 1e-8 * float(diag.abs().max()))
        self.diagonal = diag.clamp_min(floor)
        return self

    def solve(self, rhs: Tensor) -> Tensor:
        assert self.diagonal is not None
        return rhs / self.diagonal

    def state_dict(self) -> dict[str, Tensor]:
        assert self.diagonal is not None
        return {"diagonal": self.diagonal}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.diagonal = state["diagonal"]

    def options(self) -> dict[str, object]:
        return {"name": "jacobi", "num_samples": self.num_samples, "seed": self.seed}


class NystroemPreconditioner(Preconditioner):
    """Randomized Nystroem preconditioner (Frangella, Tropp, Udell 2023).

    With the rank-r approximation H ~ U diag(s) U^T from the sketch H Omega:
        M^-1 = (s_r + lambda) U (diag(s) + lambda)^-1 U^T + (I - U U^T).
    """

    def __init__(self, rank: int = 10, seed: int = 0) -> None:
        if rank <= 0:
            raise ValueError(f"rank: must be > 0, got {rank}")
        self.rank = rank
        self.seed = seed
        self.basis: Optional[Tensor] = None
        self.eigenvalues: Optional[Tensor] = None
        self.regularization = 0.0

    def fit(self, matvec: MatVec, size: int, regularization: float, device: torch.device, dtype: torch.dtype) -> "NystroemPreconditioner":
        rank = min(self.rank, size)
        gen = torch.Generator().manual_seed(self.seed)
        omega = torch.linalg.qr(torch.randn(size, rank, generator=gen, dtype=torch.float64))[0]
        omega = omega.to(device, dtype)
        y = matvec(omega.T).T  # (p, r) = H Omega
        shift = torch.finfo(dtype).eps * float(torch.linalg.norm(y)) * size
        y = y + shift * omega
        core = omega.T @ y
        chol, info = torch.linalg.cholesky_ex((core + core.T) / 2)
        if int(info) != 0:  # indefinite curvature: fall back to an eigen-split of the core
            evals, evecs = torch.linalg.eigh((core + core.T) / 2)
            keep = evals > shift
            b = y @ evecs[:, keep] / evals[keep].sqrt()
        else:
            b = torch.linalg.solve_triangular(chol, y.T, upper=False).T
        u, sv, _ = torch.linalg.svd(b, full_matrices=False)
        self.basis = u
        self.eigenvalues = (sv**2 - shift).clamp_min(0.0)
        self.regularization = regularization
        return self

    def solve(self, rhs: Tensor) -> Tensor:
        assert self.basis is not None and self.eigenvalues is not None
        lam = self.regularization
        smallest = self.eigenvalues[-1]
        coeff = rhs @ self.basis  # (k, r)
        scaled = coeff * ((smallest + lam) / (self.eigenvalues + lam))
        return rhs - coeff @ self.basis.T + scaled @ self.basis.T

    def state_dict(self) -> dict[str, Tensor]:
        assert self.basis is not None and self.eigenvalues is not None
        return {"basis": self.basis, "eigenvalues": self.eigenvalues,
                "regularization": torch.tensor(self.regularization, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.basis = state["basis"]
        self.eigenvalues = state["eigenvalues"]
        self.regularization = float(state["regularization"])

    def options(self) -> dict[str, object]:
        return {"name": "nystroem", "rank": self.rank, "seed": self.seed}
