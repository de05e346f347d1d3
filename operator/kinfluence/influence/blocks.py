"""Block structure of the curvature matrix: which trainable parameters share a block.

Influence with blocks B is  sum_b grad_b l(z_test)^T (H_bb + lambda_b I)^-1 grad_b l(z),
i.e. H is replaced by its block-diagonal part.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

from .modes import BlockMode

BlockStructure = Union[BlockMode, str, Mapping[str, Sequence[str]]]
Regularization = Union[float, Mapping[str, float]]


def resolve_blocks(param_names: Sequence[str], structure: BlockStructure) -> dict[str, tuple[str, ...]]:
    """Map block name -> parameter names (model order) for a BlockMode or a custom mapping.

    A custom mapping must partition the trainable parameters exactly: unknown,
    repeated or missing names are errors that list them.
    """
    if isinstance(structure, Mapping):
        return _validate_custom(param_names, structure)
    try:
        mode = BlockMode(structure)
    except ValueError:
        raise ValueError(
            f"block_structure: expected one of {[m.value for m in BlockMode]} or a mapping "
            f"of block name -> parameter names, got {structure!r}"
        ) from None
    if mode is BlockMode.FULL:
        return {"model": tuple(param_names)}
    if mode is BlockMode.PARAMETER_WISE:
        return {name: (name,) for name in param_names}
    blocks: dict[str, list[str]] = {}
    for name in param_names:
        layer = name.rsplit(".", 1)[0] if "." in name else name
        blocks.setdefault(layer, []).append(name)
    return {k: tuple(v) for k, v in blocks.items()}


def _validate_custom(
    param_names: Sequence[str], mapping: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    known = set(param_names)
    seen: dict[str, str] = {}
    unknown, overlapping = [], []
    for block, names in mapping.items():
        if isinstance(names, str):
            raise ValueError(
                f"block_structure[{block!r}]: expected a list of parameter names, got the string {names!r}"
            )
        if not names:
            raise ValueError(f"block_structure[{block!r}]: is empty")
        for n in names:
            if n not in known:
                unknown.append(n)
            elif n in seen:
                overlapping.append(f"{n} (in {seen[n]!r} and {block!r})")
            else:
                seen[n] = block
    if unknown:
        raise ValueError(
            f"block_structure: names unknown trainable parameters {unknown}; "
            f"trainable parameters are {list(param_names)}"
        )
    if overlapping:
        raise ValueError(f"block_structure: parameters in more than one block: {overlapping}")
    missing = [n for n in param_names if n not in seen]
    if missing:
        raise ValueError(f"block_structure: trainable parameters in no block: {missing}")
    return {block: tuple(names) for block, names in mapping.items()}


def resolve_regularization(blocks: Sequence[str], regularization: Regularization) -> dict[str, float]:
    """Per-block lambda from a float or a per-block mapping (every block must be named)."""
    if isinstance(regularization, Mapping):
        unknown = sorted(set(regularization) - set(blocks))
        missing = [b for b in blocks if b not in regularization]
        if unknown or missing:
            raise ValueError(
                f"regularization: per-block mapping must name exactly the blocks {list(blocks)}; "
                f"unknown {unknown}, missing {missing}"
            )
        values = {b: float(regularization[b]) for b in blocks}
    else:
        try:
            values = {b: float(regularization) for b in blocks}
        except (TypeError, ValueError):
            raise ValueError(
                f"regularization: expected a non-negative number or a mapping block -> number, "
                f"got {regularization!r}"
            ) from None
    for b, v in values.items():
        if not v >= 0:
            raise ValueError(f"regularization: must be >= 0, got {v} for block {b!r}")
    return values
