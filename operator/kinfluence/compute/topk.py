"""Streaming top-k: per test point, the k largest (most helpful) and k smallest (most harmful)
influences over training points, merged block by block so the full matrix is never held."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TopK:
    """Per test point (rows), the k most helpful and most harmful training points.

    helpful_*: largest influences first; harmful_*: smallest (most negative) first.
    Indices are global training-point indices; where n_train < k the tail is padded with
    index -1 and value -inf (helpful) or +inf (harmful).
    """

    helpful_indices: Tensor
    helpful_values: Tensor
    harmful_indices: Tensor
    harmful_values: Tensor


def _padded_topk(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 of (values, indices), padded to width k."""
    n, m = values.shape
    kk = min(k, m)
    top, pos = torch.topk(values, kk, dim=1, largest=largest, sorted=True)
    idx = torch.gather(indices, 1, pos)
    if kk < k:
        fill = float("-inf") if largest else float("inf")
        top = torch.cat([top, torch.full((n, k - kk), fill, dtype=values.dtype, device=values.device)], 1)
        idx = torch.cat([idx, torch.full((n, k - kk), -1, dtype=idx.dtype, device=idx.device)], 1)
    return top, idx


def block_top_k(block: Tensor, train_offset: int, k: int) -> TopK:
    """Top-k candidates of one (n_test_chunk, n_train_chunk) block, with global train indices."""
    if block.dim() != 2:
        raise ValueError(f"top_k: needs a (test, train) block (up-weighting mode), got shape {tuple(block.shape)}")
    n, m = block.shape
    indices = (torch.arange(m, device=block.device) + train_offset).expand(n, m)
    hv, hi = _padded_topk(block, indices, k, largest=True)
    lv, li = _padded_topk(block, indices, k, largest=False)
    return TopK(hi, hv, li, lv)


def merge_top_k(parts: list[TopK], k: int) -> TopK:
    """Merge top-k candidates of the same test rows (e.g. from several train chunks)."""
    hv = torch.cat([p.helpful_values for p in parts], 1)
    hi = torch.cat([p.helpful_indices for p in parts], 1)
    lv = torch.cat([p.harmful_values for p in parts], 1)
    li = torch.cat([p.harmful_indices for p in parts], 1)
    hv, hi = _padded_topk(hv, hi, k, largest=True)
    lv, li = _padded_topk(lv, li, k, largest=False)
    return TopK(hi, hv, li, lv)
