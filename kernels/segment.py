"""Segment reductions: per-node sums of per-token values given a token -> node index."""
from __future__ import annotations

from torch import Tensor


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """out[s] = sum of values[i] with segment_ids[i] == s; differentiable w.r.t. values.

    values: [N, ...]; segment_ids: [N] integers in [0, num_segments); empty segments give 0.
    """
    if segment_ids.dim() != 1 or values.shape[:1] != segment_ids.shape:
        shapes = f"{tuple(values.shape)} and {tuple(segment_ids.shape)}"
        raise ValueError(f"need values [N, ...] and segment_ids [N], got {shapes}")
    if segment_ids.dtype.is_floating_point or num_segments < 0:
        raise ValueError("segment_ids must be integers and num_segments non-negative")
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add(0, segment_ids.long(), values)
