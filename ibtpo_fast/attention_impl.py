"""A Hugging Face model's attention: its head size, and switching its implementation for a block.

transformers reads `config._attn_implementation` at every forward, so one set of weights can
decode through SDPA (explicit padded masks) and train through a tree-aware attention.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Run the model's attention layers through `name` for the duration of the block."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved


def head_dim(config: Any) -> int:
    """Dimensions per attention head: `head_dim` where the config sets it, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
