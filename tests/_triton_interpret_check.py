"""Triton kernels under TRITON_INTERPRET=1 vs a float64 reference; exits non-zero on mismatch.

Run by tests/test_kernels.py in a subprocess: the variable must be set before triton loads.
Interpreter tiles are 16 wide, so V = 50 leaves a ragged last vocab block, the forward
splits the vocab over two programs, and a tiny chunk budget gives several backward chunks.
"""
import os
import sys

import torch

import ibtpo_fast.kernels.triton_logprob_entropy as tle
from ibtpo_fast.kernels import logprob_entropy

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def reference(h, w, y, temperature, bias):
    z = h.double() @ w.double().T + (0 if bias is None else bias.double())
    lsm = torch.log_softmax(z / temperature, -1)
    valid = y != -100
    logp = torch.where(valid, lsm.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1), 0.0)
    return logp, -(lsm.exp() * lsm).sum(-1)


def rel_err(got, want):
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def run_case(seed, n, d, v, dtype, temperature, with_bias, peaked=False):
    g = torch.Generator().manual_seed(seed)
    scale = 2e3 if peaked else 2.0
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * scale / d**0.5
    leaves = [h.to(dtype), w.to(dtype)] + ([torch.randn(v, generator=g).to(dtype)] if with_bias else [])
    y = torch.randint(0, v, (n,), generator=g)
    y[1::3] = -100
    up = [torch.randn(n, generator=g), torch.randn(n, generator=g)]

    fused = [x.clone().requires_grad_() for x in leaves]
    outs = logprob_entropy(fused[0], fused[1], y, temperature, *fused[2:], backend="triton")
    grads = torch.autograd.grad(outs, fused, up)
    ref = [x.double().requires_grad_() for x in leaves]
    ref_outs = reference(ref[0], ref[1], y, temperature, *(ref[2:] or [None]))
    ref_grads = torch.autograd.grad(ref_outs, ref, [u.double() for u in up])

    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    errors = dict(zip(names, map(rel_err, [*outs, *grads], [*ref_outs, *ref_grads])))
    if peaked:  # entropy is ~0 there: compare absolutely
        errors["entropy"] = (outs[1].double() - ref_outs[1]).abs().max().item() if n else 0.0
    finite = all(t.isfinite().all() for t in [*outs, *grads])
    ok = finite and all(e < TOL[dtype] for e in errors.values())
    label = f"n={n} d={d} v={v} {dtype} T={temperature} bias={with_bias} peaked={peaked}"
    print(("ok  " if ok else "FAIL"), label, {k: f"{e:.1e}" for k, e in errors.items()})
    return ok


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    tle.CUDA_CHUNK_BYTES = 3 * 50 * 4  # 3-token backward chunks at V = 50 in fp32
    cases = [
        (1, 7, 16, 50, torch.float32, 1.0, False),
        (2, 7, 20, 50, torch.float32, 0.7, True),
        (3, 1, 16, 50, torch.float32, 1.3, True),
        (4, 0, 16, 50, torch.float32, 1.0, True),
        (5, 18, 16, 37, torch.float32, 1.0, False),
        (6, 7, 16, 50, torch.bfloat16, 0.9, True),
    ]
    results = [run_case(*case) for case in cases]
    results.append(run_case(7, 5, 16, 50, torch.float32, 1.0, False, peaked=True))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
