"""Switching a Hugging Face model's attention implementation for the length of a block.

transformers reads `config._attn_implementation` at every forward, so one set of weights can
decode through SDPA (explicit padded masks) and train through a tree-aware attention.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Run the model's attention layers through `name` for the duration of the block."""
    saved = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = saved
