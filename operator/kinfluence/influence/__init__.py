"""Influence functions in torch: gradients, curvature operators and influence methods.

Sign convention: I(z_test, z) = + grad l(z_test)^T (H + lambda I)^-1 grad l(z), with H the
mean Hessian (or Gauss-Newton matrix) over all training points; positive = z helps z_test.
"""

from .arnoldi import ArnoldiInfluence
from .base import InfluenceFunctionModel
from .cg import CgInfluence
from .direct import DirectInfluence
from .ekfac import EkfacInfluence
from .errors import NotFittedException, SingularHessianError
from .lissa import LissaInfluence
from .modes import BlockMode, InfluenceMode, SecondOrderMode
from .nystroem import NystroemSketchInfluence
from .preconditioners import JacobiPreconditioner, NystroemPreconditioner, Preconditioner

__all__ = [
    "ArnoldiInfluence",
    "BlockMode",
    "CgInfluence",
    "DirectInfluence",
    "EkfacInfluence",
    "InfluenceFunctionModel",
    "InfluenceMode",
    "JacobiPreconditioner",
    "LissaInfluence",
    "NotFittedException",
    "NystroemPreconditioner",
    "NystroemSketchInfluence",
    "Preconditioner",
    "SecondOrderMode",
    "SingularHessianError",
]
