"""Shipping a fitted influence model to dask workers as bytes, unpickled once per process (once
per thread for a model that is not thread-safe).

torch.func's functional_call swaps a module's parameters for wrapped tensors while a task runs,
and such a module cannot be pickled then ("Cannot access storage of TensorWrapper"). A model
scattered as a live object is pickled again whenever dask moves it between workers (a peer's
`get_data`, a replacement worker, spilling), which can happen while a task uses it. So what dask
holds and moves is a `ShippedModel`: the bytes of the model, pickled once on the client while
nothing runs. The same swap makes one live model wrong when two threads compute with it at once,
so a model that is not thread-safe gets a live copy per thread.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from typing import Union

import cloudpickle

from ..influence.base import InfluenceFunctionModel

#: live models per process: token -> (thread id, or 0 for a thread-safe model) -> model
_LIVE: "OrderedDict[str, dict[int, InfluenceFunctionModel]]" = OrderedDict()
_LIVE_MAX = 4  # tokens kept (one per calculator in use); older ones are dropped
_LOCK = threading.Lock()


def _slot(model: InfluenceFunctionModel) -> int:
    return 0 if model.is_thread_safe else threading.get_ident()


class ShippedModel:
    """A fitted influence model as bytes; `get()` is the live model of this process (thread)."""

    def __init__(self, model: InfluenceFunctionModel) -> None:
        self.token = uuid.uuid4().hex
        self.payload = cloudpickle.dumps(model)
        self.thread_safe = model.is_thread_safe
        with _LOCK:  # the client's own thread uses the model it already has
            _models(self.token)[_slot(model)] = model

    def get(self) -> InfluenceFunctionModel:
        """The live model: unpickled on first use in this process (thread), then reused."""
        slot = 0 if self.thread_safe else threading.get_ident()
        with _LOCK:
            models = _models(self.token)
            model = models.get(slot)
            if model is None:
                model = models[slot] = cloudpickle.loads(self.payload)
            return model

    def __sizeof__(self) -> int:  # what dask accounts for in worker memory
        return len(self.payload)


def _models(token: str) -> dict[int, InfluenceFunctionModel]:
    """The live models of one token (most recently used last); call with _LOCK held."""
    models = _LIVE.setdefault(token, {})
    _LIVE.move_to_end(token)
    while len(_LIVE) > _LIVE_MAX:
        _LIVE.popitem(last=False)
    return models


def live_model(model: Union[InfluenceFunctionModel, ShippedModel]) -> InfluenceFunctionModel:
    """The model a task computes with, whether it was given live or shipped."""
    return model.get() if isinstance(model, ShippedModel) else model
