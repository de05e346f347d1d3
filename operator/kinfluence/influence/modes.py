"""Enumerations that select what an influence method computes."""

from enum import Enum


class InfluenceMode(str, Enum):
    """Up-weighting (effect of a training point's weight) or perturbation (of its features).

    UP:           I(z_test, z) = grad l(z_test)^T (H + lambda I)^-1 grad l(z)
    PERTURBATION: I(z_test, z) = grad l(z_test)^T (H + lambda I)^-1 d/dx grad l(z),
                  shape (n_test, n_train, *x.shape[1:])
    """

    UP = "up"
    PERTURBATION = "perturbation"


class SecondOrderMode(str, Enum):
    """Curvature used in place of H: the exact Hessian or the Gauss-Newton matrix J^T H_out J."""

    HESSIAN = "hessian"
    GAUSS_NEWTON = "gauss_newton"


class BlockMode(str, Enum):
    """Block structure of the curvature: one block, one per layer (module), one per parameter."""

    FULL = "full"
    LAYER_WISE = "layer_wise"
    PARAMETER_WISE = "parameter_wise"
