"""What a run writes (OutputSelection) and what it reports back (WriteSummary)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

ValuesReduction = Literal["mean", "sum"]


@dataclass(frozen=True)
class OutputSelection:
    """Which outputs to write into the store.

    full_matrix: the influence array (test, train[, features]).
    top_k: k most helpful (largest) and most harmful (smallest) training points per test point
        (up-weighting mode only), or None.
    values: a per-training-point data value, the "mean" or "sum" of its influence over all test
        points, or None.
    """

    full_matrix: bool = True
    top_k: Optional[int] = None
    values: Optional[ValuesReduction] = None

    def __post_init__(self) -> None:
        if not isinstance(self.full_matrix, bool):
            raise TypeError(f"outputs.full_matrix: expected a bool, got {self.full_matrix!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k <= 0):
            raise ValueError(f"outputs.top_k: expected a positive int or None, got {self.top_k!r}")
        if self.values not in (None, "mean", "sum"):
            raise ValueError(f"outputs.values: expected None, 'mean' or 'sum', got {self.values!r}")
        if not self.full_matrix and self.top_k is None and self.values is None:
            raise ValueError("outputs: selects nothing; set full_matrix=True, top_k or values")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WriteSummary:
    """What one to_zarr call did: blocks in the grid, skipped (done by an earlier run) and
    computed now; test-factor chunks computed now; this run's id (recorded in each block's
    completion record)."""

    url: str
    run_id: str
    total_blocks: int
    skipped_blocks: int
    computed_blocks: int
    computed_factor_chunks: int
    total_factor_chunks: int
    complete: bool
    outputs: dict[str, Any] = field(default_factory=dict)
