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
    bias = None if attention_mask is None else attention_bias(attention_mask, key.shape[1], query.dtype)
    out = grouped_decode_attention(query.reshape(rows, heads, dim), key, value, bias,
                                   dim**-0.5 if scaling is None else scaling)
    return out.view(rows, 1, heads, dim), None


def attention_bias(mask: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [B, 1, 1, L] (True: attended) as the additive bias [B * kv_heads, 1, L] that
    `grouped_decode_attention` takes."""
    rows, length = mask.shape[0], mask.shape[-1]
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.expand(rows, kv_heads, 1, length).reshape(rows * kv_heads, 1, length)


def grouped_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """One query a row: query [B, H, D], key/value [B, H_kv, L, D], `bias` [B * H_kv, 1, L] (0 where
    attended, -inf where not) -> [B, H, D]. Scaling and bias fold into the scores' matmul; softmax in fp32."""
    rows, heads, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(rows * kv_heads, heads // kv_heads, dim)  # the query heads sharing each K/V head
    keys = key.reshape(rows * kv_heads, length, dim).transpose(1, 2)
    if bias is None:
        scores = torch.bmm(grouped, keys).mul_(scaling)
    else:
        scores = torch.baddbmm(bias, grouped, keys, alpha=scaling)
    weights = scores.softmax(-1, dtype=torch.float32).to(value.dtype)
    return torch.bmm(weights, value.reshape(rows * kv_heads, length, dim)).view(rows, heads, dim)

AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
