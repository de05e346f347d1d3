"""Building the influence method a spec names (imported lazily: not every method may exist)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import JobError, MethodUnavailableError
from .loading import LossFn
from .spec import MethodBase

#: spec method name -> class name in kinfluence.influence
METHOD_CLASSES: dict[str, str] = {
    "direct": "DirectInfluence",
    "cg": "CgInfluence",
    "lissa": "LissaInfluence",
    "arnoldi": "ArnoldiInfluence",
    "nystroem": "NystroemSketchInfluence",
    "ekfac": "EkfacInfluence",
}


def method_class(name: str) -> type:
    """The influence class for a spec method name, or a clear error if it is not installed."""
    import kinfluence.influence as influence

    class_name = METHOD_CLASSES[name]
    cls = getattr(influence, class_name, None)
    if cls is None:
        available = [n for n, c in METHOD_CLASSES.items() if hasattr(influence, c)]
        raise MethodUnavailableError(
            f"spec.method.name: method {name!r} ({class_name}) is not available in this version of "
            f"kinfluence; available: {', '.join(available)}"
        )
    return cls


def build_method(method: MethodBase, model: nn.Module, loss: LossFn) -> Any:
    """An unfitted influence method configured from the spec's `method` options."""
    cls = method_class(method.name)  # type: ignore[attr-defined]
    try:
        return cls(model, loss, **method.common_kwargs(), **method.options())
    except (ValueError, TypeError) as err:
        raise JobError(f"spec.method: {err}") from None
