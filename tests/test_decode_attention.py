"""The engine's decode attention equals SDPA over repeated K/V heads, padding masked out. (Prefill,
several queries a row, goes to transformers' sdpa: the engine tests check it against a full forward.)"""
import pytest
import torch
import torch.nn.functional as F

from ibtpo_fast.engines.decode_attention import decode_attention_forward


@pytest.mark.parametrize("heads, kv_heads, dtype, tol", [
    (6, 2, torch.float32, 1e-6), (4, 4, torch.float32, 1e-6), (6, 3, torch.bfloat16, 2e-2)])
def test_matches_sdpa_with_repeated_heads(heads, kv_heads, dtype, tol):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    rows, length, dim = 5, 11, 16
    q = torch.randn(rows, heads, 1, dim, generator=g).to(dtype)
    k, v = (torch.randn(rows, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
    pads = torch.tensor([0, 3, 7, 1, 10])  # left padding per row; the last row sees one token
    mask = (torch.arange(length)[None, :] >= pads[:, None])[:, None, None, :]
    out, _ = decode_attention_forward(torch.nn.Module(), q, k, v, mask, scaling=0.3)
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(rep, 1),
                                         v.float().repeat_interleave(rep, 1), attn_mask=mask, scale=0.3)
    assert out.shape == (rows, 1, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=tol, atol=tol)
