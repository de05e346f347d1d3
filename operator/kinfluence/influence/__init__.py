"""Influence functions in torch: gradients, curvature operators and influence methods.

Sign convention: I(z_test, z) = + grad l(z_test)^T (H + lambda I)^-1 grad l(z), with H the
mean Hessian (or Gauss-Newton matrix) over all training points; positive = z helps z_test.
"""

from .base import InfluenceFunctionModel
from .direct import DirectInfluence
from .errors import NotFittedException, SingularHessianError
from .modes import BlockMode, InfluenceMode, SecondOrderMode

__all__ = [
    "BlockMode",
    "DirectInfluence",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "NotFittedException",
    "SecondOrderMode",
    "SingularHessianError",
]
