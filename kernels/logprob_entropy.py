"""Per-token log-probabilities and entropies of softmax((hidden @ weight.T + bias) / T).

The [N, V] logits are never materialised: CPU work runs over token chunks sized by a
memory budget, CUDA work runs in Triton kernels with an online log-sum-exp over vocab
blocks. Backward recomputes logits from the saved per-token (LSE, entropy).

Conventions: targets equal to `ignore_index` get logp = 0 and no logp gradient; their
entropy is still computed (it does not depend on the target). Statistics are computed
and returned in fp32 (fp64 for fp64 inputs, which only the torch backend takes);
gradients come back in each input's dtype.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .chunking import rows_per_chunk

Backend = Literal["auto", "torch", "triton"]

# The CPU path is chunked torch: its time is the MKL matmuls, and a numba row epilogue
# measured no faster on the CPU benchmark.
CPU_CHUNK_BYTES = 128 * 2**20  # per [chunk, V] work buffer; two are live at once

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_into(out: Tensor, h: Tensor, w: Tensor, b: Tensor | None, inv_t: float) -> Tensor:
    torch.mm(h, w.t(), out=out)
    if b is not None:
        out.add_(b)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _softmax_stats(z: Tensor, work: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(LSE, entropy, z_y - LSE) per row of logits z; clobbers z and work."""
    m = z.amax(1, keepdim=True)
    z.sub_(m)
    e = torch.exp(z, out=work)
    s = e.sum(1)
    # sum e * (z - m) as a batched dot: no [n, V] temporary. Shifting by m keeps
    # entropy = log s - t / s free of cancellation between two large numbers.
    t = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
    log_s = s.log()
    return m.squeeze(1) + log_s, log_s - t / s, z.gather(1, y[:, None]).squeeze(1) - log_s


def _dlogits_(
    z: Tensor, work: Tensor, y: Tensor, lse: Tensor, ent: Tensor, g_logp: Tensor, g_ent: Tensor
) -> Tensor:
    """Overwrite logits z with dL/dz = g_logp * (onehot_y - p) - g_ent * p * (log p + H)."""
    z.sub_(lse[:, None])  # log p
    p = torch.exp(z, out=work)
    z.mul_(-g_ent[:, None]).sub_((g_ent * ent + g_logp)[:, None]).mul_(p)
    return z.scatter_add_(1, y[:, None], g_logp[:, None])


def _chunk_views(like: Tensor, n: int, v: int, dtype: torch.dtype):
    """Yield (rows, z, work) per token chunk: [k, V] views of two buffers reused across
    chunks, since fresh multi-MB CPU allocations page-fault on every chunk."""
    rows = rows_per_chunk(n, v, torch.finfo(dtype).bits // 8, CPU_CHUNK_BYTES)
    z_buf, work = (like.new_empty(rows * v, dtype=dtype) for _ in range(2))
    for start in range(0, n, rows):
        k = min(rows, n - start)
        yield slice(start, start + k), z_buf[: k * v].view(k, v), work[: k * v].view(k, v)


def _torch_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, inv_t: float):
    cdt = _compute_dtype(hidden.dtype)
    n, v = hidden.shape[0], weight.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    lse, ent, logp = (hidden.new_empty(n, dtype=cdt) for _ in range(3))
    for sl, z, work in _chunk_views(hidden, n, v, cdt):
        _logits_into(z, hidden[sl].to(cdt), w, b, inv_t)
        lse[sl], ent[sl], logp[sl] = _softmax_stats(z, work, y[sl])
    return logp, lse, ent


def _torch_backward(hidden, weight, bias, y, lse, ent, g_logp, g_ent, inv_t, needs):
    cdt = lse.dtype
    (n, d), v = hidden.shape, weight.shape[0]
    w = weight.to(cdt)
    b = None if bias is None else bias.to(cdt)
    gh = hidden.new_empty(n, d, dtype=cdt) if needs[0] else None
    gw = weight.new_zeros(v, d, dtype=cdt) if needs[1] else None
    gb = weight.new_zeros(v, dtype=cdt) if needs[2] else None
    for sl, z, work in _chunk_views(hidden, n, v, cdt):
        h = hidden[sl].to(cdt)
        _logits_into(z, h, w, b, inv_t)
        dz = _dlogits_(z, work, y[sl], lse[sl], ent[sl], g_logp[sl], g_ent[sl])
        if gh is not None:
            torch.mm(dz, w, out=gh[sl])
        if gw is not None:
            gw.addmm_(dz.t(), h)
        if gb is not None:
            gb += dz.sum(0)
    return gh, gw, gb


def _backend_fns(use_triton: bool):
    if use_triton:
        from . import triton_logprob_entropy as tle  # lazy: triton is optional

        return tle.forward, tle.backward
    return _torch_forward, _torch_backward


def _upstream(g_logp: Tensor, g_ent: Tensor, valid: Tensor, inv_t: float, dtype: torch.dtype):
    """Upstream grads in the compute dtype, already chained through the 1/T scaling."""
    g_logp = torch.where(valid, g_logp.to(dtype), 0.0) * inv_t
    return g_logp, g_ent.to(dtype) * inv_t


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad is None else grad.to(like.dtype)


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_t, ignore_index, use_triton):
        valid = targets != ignore_index
        y = torch.where(valid, targets, 0)
        logp, lse, ent = _backend_fns(use_triton)[0](hidden, weight, bias, y, inv_t)
        logp.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, y, valid, lse, ent)
        ctx.inv_t, ctx.use_triton = inv_t, use_triton
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, y, valid, lse, ent = ctx.saved_tensors
        g_logp, g_ent = _upstream(g_logp, g_ent, valid, ctx.inv_t, lse.dtype)
        needs = ctx.needs_input_grad[:3]
        gh, gw, gb = _backend_fns(ctx.use_triton)[1](
            hidden, weight, bias, y, lse, ent, g_logp, g_ent, ctx.inv_t, needs
        )
        return _cast(gh, hidden), _cast(gw, weight), _cast(gb, bias), None, None, None, None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(backend: Backend, x: Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda and x.dtype != torch.float64 and _triton_available()
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    if x.dtype == torch.float64:
        raise ValueError("the triton backend takes fp32, bf16 or fp16 inputs")
    return True


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, bias: Tensor | None) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight need one float dtype, got {hidden.dtype} and {weight.dtype}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"need integer targets [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"need bias of shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """(logp [N], entropy [N]) of softmax((hidden @ weight.T + bias) / temperature) at `targets`.

    Differentiable w.r.t. hidden, weight and bias through both outputs. backend="auto"
    runs Triton on CUDA tensors and chunked torch on CPU; "triton" on CPU tensors needs
    TRITON_INTERPRET=1.
    """
    _check(hidden, weight, targets, temperature, bias)
    use_triton = _use_triton(backend, hidden)
    inv_t = 1.0 / temperature
    return _LogprobEntropy.apply(hidden, weight, bias, targets.long(), inv_t, ignore_index, use_triton)


def _scaled_chunks(logits: Tensor, inv_t: float):
    """Yield (rows, z, work): fp32 copies of logit chunks divided by T, plus scratch."""
    for sl, z, work in _chunk_views(logits, *logits.shape, _compute_dtype(logits.dtype)):
        z.copy_(logits[sl])
        yield sl, (z.mul_(inv_t) if inv_t != 1.0 else z), work


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_t, ignore_index):
        valid = targets != ignore_index
        y = torch.where(valid, targets, 0)
        cdt = _compute_dtype(logits.dtype)
        lse, ent, logp = (logits.new_empty(logits.shape[0], dtype=cdt) for _ in range(3))
        for sl, z, work in _scaled_chunks(logits, inv_t):
            lse[sl], ent[sl], logp[sl] = _softmax_stats(z, work, y[sl])
        ctx.save_for_backward(logits, y, valid, lse, ent)
        ctx.inv_t = inv_t
        return logp.masked_fill_(~valid, 0.0), ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        logits, y, valid, lse, ent = ctx.saved_tensors
        g_logp, g_ent = _upstream(g_logp, g_ent, valid, ctx.inv_t, lse.dtype)
        grad = torch.empty_like(logits)
        for sl, z, work in _scaled_chunks(logits, ctx.inv_t):
            grad[sl] = _dlogits_(z, work, y[sl], lse[sl], ent[sl], g_logp[sl], g_ent[sl])
        return grad, None, None, None


def logprob_entropy_from_logits(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """(logp [N], entropy [N]) of softmax(logits / temperature), differentiable w.r.t. logits."""
    if logits.dim() != 2 or logits.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"need float logits [N, V], got {logits.dtype} {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"need integer targets [{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _FromLogits.apply(logits, targets.long(), 1.0 / temperature, ignore_index)
