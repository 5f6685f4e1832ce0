"""How many tokens one chunk of the fused kernels holds: shared by the torch and Triton paths."""
from __future__ import annotations


def rows_per_chunk(n: int, width: int, itemsize: int, budget: int) -> int:
    """Largest token chunk whose [chunk, width] buffer fits `budget` bytes (at least 1)."""
    return max(1, min(n, budget // max(1, width * itemsize)))
