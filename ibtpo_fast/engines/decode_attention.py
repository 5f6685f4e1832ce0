"""Attention for TorchEngine's batched decode: grouped-query attention reading each K/V head once.

With a padding mask on CUDA, transformers' sdpa path repeats every K/V head across its query group
(SDPA's masked kernels take no grouped heads there), copying the whole cache at every layer of
every step. A decode step has one query per row, which needs no fused kernel: two batched matmuls
over the grouped heads read the cache where it lies. Prefill (several queries a row) stays on sdpa.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

DECODE_ATTENTION = "ibtpo_decode"


def decode_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, H, q, D], key/value [B, H_kv, L, D], a boolean
    mask [B, 1, q, L]; returns [B, q, H, D]."""
    rows, heads, q_len, dim = query.shape
    if q_len != 1 or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    blocked = None if attention_mask is None else ~attention_mask
    out = grouped_decode_attention(query.reshape(rows, heads, dim), key, value, blocked,
                                   dim**-0.5 if scaling is None else scaling)
    return out.view(rows, 1, heads, dim), None


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             blocked: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One query a row: query [B, H, D], key/value [B, H_kv, L, D], `blocked` [B, 1, 1, L] (True: not
    attended) -> [B, H, D]. Scores and softmax in fp32."""
    rows, heads, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # the query heads sharing each K/V head
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)
    return out.view(rows, heads, dim)


AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
