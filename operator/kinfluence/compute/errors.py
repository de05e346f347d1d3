"""Errors raised by the calculators and the output store; each message says what was given
and what is needed."""

from __future__ import annotations


class ThreadSafetyViolationError(RuntimeError):
    """A model that is not thread-safe would run on a dask worker with several threads."""

    def __init__(self, method: str, nthreads: dict[str, int]) -> None:
        multi = {w: n for w, n in nthreads.items() if n > 1}
        super().__init__(
            f"client: {method} is not thread-safe, but workers {multi} run more than one thread; "
            "start the workers with threads_per_worker=1 (LocalCluster(threads_per_worker=1) or "
            "`dask worker --nthreads 1`), or pass DisableClientSingleThreadCheck to skip this check"
        )


class UnalignedChunksError(ValueError):
    """Two arrays that are split together (x and y) have different chunks along axis 0."""

    def __init__(self, x_name: str, x_chunks: tuple[int, ...], y_name: str, y_chunks: tuple[int, ...]) -> None:
        super().__init__(
            f"{x_name} and {y_name}: chunks along the first axis must be equal, got {x_chunks} and "
            f"{y_chunks}; rechunk both the same way, e.g. {y_name}.rechunk({{0: {x_name}.chunks[0]}})"
        )


class InvalidDimensionChunksError(ValueError):
    """An array is chunked along a dimension that must stay whole, or irregularly where the
    output store needs regular chunks."""


class StoreExistsError(FileExistsError):
    """The output store already holds results and neither resume nor overwrite was asked for."""


class StoreMismatchError(ValueError):
    """resume=True into a store written by a different computation (method, parameters,
    fingerprints, shapes or outputs differ)."""

    def __init__(self, url: str, differences: dict[str, tuple[object, object]]) -> None:
        self.differences = differences
        lines = "; ".join(f"{k}: store has {old!r}, this run has {new!r}" for k, (old, new) in differences.items())
        super().__init__(
            f"url: cannot resume into {url}: it was written by a different computation ({lines}); "
            "use overwrite=True to start fresh or another url"
        )
