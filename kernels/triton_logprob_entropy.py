"""Triton kernels for `logprob_entropy`: online-LSE forward and a dlogits backward.

Forward: each program owns a block of tokens and a contiguous range of vocab blocks; it
computes logit tiles with tl.dot and keeps a running (max, sum exp, sum exp * shifted
logit, target logit). The per-range partials are merged on the host, so all tokens run
in one launch with no [N, V] buffer. Backward: per token chunk a kernel recomputes the
logits and writes dL/dz for that chunk; cuBLAS then forms grad_hidden and accumulates
grad_weight in fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunking import rows_per_chunk

# [chunk, V] dlogits buffer in the input dtype. Large on purpose: every chunk re-reads and
# re-writes the fp32 [V, D] grad_weight accumulator, which costs as much as a small matmul.
CUDA_CHUNK_BYTES = 2**30
_NEG = tl.constexpr(-1.0e30)  # finite -inf: keeps 0 * (z - max) free of NaNs


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, inv_t,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile (hidden[rows] @ weight[cols].T + bias[cols]) * inv_t."""
    row_ok = rows < N
    col_ok = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * D
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if CAST_F32:  # the interpreter mis-computes low-precision tl.dot
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _forward_kernel(h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, N, V, D, inv_t, V_PER_PROG,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), _NEG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * (z - m)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = tl.program_id(1) * V_PER_PROG
    for v0 in range(v_lo, v_lo + V_PER_PROG, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, inv_t,
                         HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, CAST_F32, PRECISION)
        z = tl.where(col_ok, z, _NEG)
        m_new = tl.maximum(m, tl.max(z, 1))
        shifted = z - m_new[:, None]
        e = tl.where(col_ok, tl.exp(shifted), 0.0)
        alpha = tl.exp(m - m_new)
        t = alpha * (t + s * (m - m_new)) + tl.sum(e * shifted, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
    out = part_ptr + tl.program_id(1) * 4 * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + N, s, mask=row_ok)
    tl.store(out + 2 * N, t, mask=row_ok)
    tl.store(out + 3 * N, zy, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dz_ptr,
                    N, V, D, inv_t,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, inv_t,
                     HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, CAST_F32, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    dz = -p * (g_ent[:, None] * (log_p + ent[:, None]) + g_logp[:, None])
    dz += tl.where(cols[None, :] == y[:, None], g_logp[:, None], 0.0)
    out = dz_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and dot precision; small tiles keep the interpreter fast."""
    if _interpreting():
        return dict(BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, CAST_F32=True, PRECISION="ieee")
    if dtype == torch.float32:  # full fp32 products: tf32 would break fp32 accuracy
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, CAST_F32=False, PRECISION="ieee",
                    num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, CAST_F32=False, PRECISION="tf32",
                num_warps=8, num_stages=3)


def _target_programs(device: torch.device) -> int:
    if _interpreting() or device.type != "cuda":
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _vocab_split(n_row_blocks: int, n_v_blocks: int, target: int) -> tuple[int, int]:
    """(programs per row block, vocab blocks per program): every program starts inside V."""
    split = max(1, min(n_v_blocks, triton.cdiv(target, max(1, n_row_blocks))))
    per_prog = triton.cdiv(n_v_blocks, split)
    return triton.cdiv(n_v_blocks, per_prog), per_prog


def _merge(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-range (max, sum exp, sum exp * shifted, z_y) into (LSE, entropy, z_y)."""
    m, s, t, zy = part.unbind(1)
    top = m.amax(0)
    scale = torch.exp(m - top)
    total = (scale * s).sum(0)
    tilt = (scale * (t + s * (m - top))).sum(0)
    log_total = total.log()
    return top + log_total, log_total - tilt / total, zy.sum(0)


def forward(hidden, weight, bias, y, inv_t):
    """(z_y - LSE, LSE, entropy) per token, fp32."""
    h, w = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    (n, d), v = h.shape, w.shape[0]
    cfg = _launch_config(h.dtype)
    n_row_blocks = triton.cdiv(n, cfg["BLOCK_N"])
    split, per_prog = _vocab_split(n_row_blocks, triton.cdiv(v, cfg["BLOCK_V"]), _target_programs(h.device))
    part = torch.empty(split, 4, n, device=h.device, dtype=torch.float32)
    if n > 0:
        _forward_kernel[(n_row_blocks, split)](
            h, w, w if bias is None else bias, y, part, n, v, d, inv_t, per_prog * cfg["BLOCK_V"],
            HAS_BIAS=bias is not None, **cfg,
        )
    lse, ent, zy = _merge(part)
    return zy - lse, lse, ent


def _dlogits(dz, h, w, bias, y, lse, ent, g_logp, g_ent, inv_t, cfg):
    (n, d), v = h.shape, w.shape[0]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
    _dlogits_kernel[grid](
        h, w, w if bias is None else bias, y, lse, ent, g_logp, g_ent, dz, n, v, d, inv_t,
        HAS_BIAS=bias is not None, **cfg,
    )
    return dz


def backward(hidden, weight, bias, y, lse, ent, g_logp, g_ent, inv_t, needs):
    """(grad_hidden, grad_weight, grad_bias) in fp32 or the input dtype; None where not needed."""
    h, w = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    (n, d), v = h.shape, w.shape[0]
    cfg = _launch_config(h.dtype)
    rows = rows_per_chunk(n, v, h.element_size(), CUDA_CHUNK_BYTES)
    dz_buf = h.new_empty(rows * v)
    gh = torch.empty_like(h) if needs[0] else None
    gw = w.new_zeros(v, d, dtype=torch.float32) if needs[1] else None
    gb = w.new_zeros(v, dtype=torch.float32) if needs[2] else None
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        k = min(rows, n - start)
        dz = _dlogits(dz_buf[: k * v].view(k, v), h[sl], w, bias, y[sl], lse[sl], ent[sl],
                      g_logp[sl].contiguous(), g_ent[sl].contiguous(), inv_t, cfg)
        if gh is not None:
            torch.mm(dz, w, out=gh[sl])
        if gw is not None:
            _accumulate_mm(gw, dz.t(), h[sl])
        if gb is not None:
            gb += dz.sum(0, dtype=torch.float32)
    return gh, gw, gb


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in fp32; 16-bit products come out of cuBLAS fp32-accumulated per chunk."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)
