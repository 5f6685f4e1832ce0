"""Fused log-prob / entropy kernels and segment sums against float64 torch references."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibtpo_fast.kernels import logprob_entropy, logprob_entropy_from_logits, segment_sum

le = importlib.import_module("ibtpo_fast.kernels.logprob_entropy")  # the package re-exports a same-named function

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(seed, n, d, v, dtype=torch.float32, device="cpu", bias=False, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (scale / d**0.5)
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    grads = torch.randn(n, generator=g), torch.randn(n, generator=g)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), targets.to(device), [x.to(device) for x in grads]


def reference_from_logits(z, targets, ignore_index=-100):
    lsm = torch.log_softmax(z, -1)
    valid = targets != ignore_index
    logp = torch.where(valid, lsm.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1), 0.0)
    return logp, -(lsm.exp() * lsm).sum(-1)


def reference(hidden, weight, targets, temperature=1.0, bias=None, ignore_index=-100):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return reference_from_logits(z / temperature, targets, ignore_index)


def rel_err(got, want):
    if want.numel() == 0:
        return 0.0
    scale = want.abs().max().clamp(min=1e-30)
    return ((got.double() - want).abs().max() / scale).item()


def outputs_and_grads(fn, leaves, upstream):
    leaves = [x.detach().requires_grad_() for x in leaves]
    outs = fn(*leaves)
    grads = torch.autograd.grad(outs, leaves, [u.to(outs[0].dtype) for u in upstream])
    return [o.detach() for o in outs], grads


def check_vs_reference(hidden, weight, bias, targets, upstream, tol, temperature=1.0, ignore_index=-100, **kw):
    leaves = [hidden, weight] + ([] if bias is None else [bias])

    def fused(h, w, b=None):
        return logprob_entropy(h, w, targets, temperature, b, ignore_index, **kw)

    def ref(h, w, b=None):
        return reference(h, w, targets, temperature, b, ignore_index)

    outs, grads = outputs_and_grads(fused, leaves, upstream)
    ref_outs, ref_grads = outputs_and_grads(ref, [x.double() for x in leaves], upstream)
    assert all(o.dtype == torch.float32 for o in outs)
    assert [g.dtype for g in grads] == [x.dtype for x in leaves]
    for name, got, want in zip(["logp", "entropy"], outs, ref_outs):
        assert rel_err(got, want) < tol, name
    for name, got, want in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert rel_err(got, want) < tol, f"grad {name}"


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token chunks on test shapes (budget of ~8 rows at V=300)."""
    monkeypatch.setattr(le, "CPU_CHUNK_BYTES", 8 * 300 * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_matches_reference(small_chunks, dtype, bias):
    seed = 10 + 2 * [torch.float32, torch.bfloat16, torch.float16].index(dtype) + bias
    h, w, b, y, up = make_inputs(seed, 37, 24, 300, dtype, bias=bias)
    y[[3, 20]] = -100
    check_vs_reference(h, w, b, y, up, TOL[dtype], temperature=0.7)


def test_cpu_single_chunk_default_budget():
    h, w, b, y, up = make_inputs(20, 16, 32, 128, bias=True)
    check_vs_reference(h, w, b, y, up, 1e-5)


def test_gradcheck_float64(small_chunks):
    h, w, b, y, _ = make_inputs(21, 11, 3, 7, torch.float64, bias=True)
    y[4] = -1
    leaves = [x.requires_grad_() for x in (h, w, b)]
    fn = lambda h, w, b: logprob_entropy(h, w, y, 1.3, b, ignore_index=-1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_ignore_index_gives_zero_logp_and_no_logp_grad():
    h, w, _, y, _ = make_inputs(22, 6, 8, 30)
    y[:] = 7
    y[[1, 4]] = 99
    h.requires_grad_()
    logp, ent = logprob_entropy(h, w, y, ignore_index=99)
    assert logp[[1, 4]].eq(0).all() and ent[[1, 4]].gt(0).all()
    (grad,) = torch.autograd.grad(logp.sum(), h)
    assert grad[[1, 4]].eq(0).all() and grad[0].ne(0).any()


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_batches(n):
    h, w, b, y, up = make_inputs(23 + n, n, 8, 30, bias=True)
    check_vs_reference(h, w, b, y, up, 1e-5)


def test_empty_batch_grads_are_zero():
    h, w, _, y, _ = make_inputs(25, 0, 8, 30)
    w.requires_grad_()
    logp, ent = logprob_entropy(h, w, y)
    assert logp.shape == ent.shape == (0,)
    (grad,) = torch.autograd.grad((logp + ent).sum(), w)
    assert grad.shape == w.shape and grad.eq(0).all()


def test_non_contiguous_inputs(small_chunks):
    g = torch.Generator().manual_seed(26)
    hidden = torch.randn(24, 2 * 19, generator=g).t()[::2]  # [19, 24], transposed then sliced
    weight = (torch.randn(24, 300, generator=g) / 4).t()  # [300, 24], column-major
    y = torch.randint(0, 300, (19,), generator=g)
    up = [torch.randn(19, generator=g), torch.randn(19, generator=g)]
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    check_vs_reference(hidden, weight, None, y, up, 1e-5)


def test_peaked_distribution_is_finite():
    h, w, _, y, up = make_inputs(27, 9, 16, 300, scale=2e3)
    y[0] = (h[0] @ w.T).argmax()
    leaves = [h.requires_grad_(), w.requires_grad_()]
    logp, ent = logprob_entropy(h, w, y)
    grads = torch.autograd.grad([logp, ent], leaves, up)
    assert all(t.isfinite().all() for t in (logp, ent, *grads))
    ref_logp, ref_ent = reference(h, w, y)
    assert rel_err(logp, ref_logp) < 1e-5
    assert (ent.double() - ref_ent).abs().max() < 1e-3 and logp[0].abs() < 1e-3


def test_temperature_scales_logits():
    h, w, _, y, _ = make_inputs(28, 5, 8, 40)
    hot = logprob_entropy(h, w, y, temperature=2.5)
    ref = logprob_entropy(h / 2.5, w, y)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(hot, ref))


def test_from_logits_matches_reference(small_chunks):
    for seed, dtype in [(29, torch.float32), (30, torch.bfloat16)]:
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(21, 300, generator=g) * 3).to(dtype)
        y = torch.randint(0, 300, (21,), generator=g)
        y[5] = -100
        up = [torch.randn(21, generator=g), torch.randn(21, generator=g)]
        fused = lambda z: logprob_entropy_from_logits(z, y, temperature=0.8)  # noqa: E731
        ref = lambda z: reference_from_logits(z / 0.8, y)  # noqa: E731
        outs, (grad,) = outputs_and_grads(fused, [logits], up)
        ref_outs, (ref_grad,) = outputs_and_grads(ref, [logits.double()], up)
        assert grad.dtype == dtype
        for got, want in zip([*outs, grad], [*ref_outs, ref_grad]):
            assert rel_err(got, want) < TOL[dtype]


def test_from_logits_gradcheck(small_chunks):
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(10, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (10,), generator=g)
    y[2] = -100
    assert torch.autograd.gradcheck(lambda z: logprob_entropy_from_logits(z, y, temperature=0.6), [logits])


def test_rejects_bad_inputs():
    h, w, _, y, _ = make_inputs(32, 4, 8, 30)
    with pytest.raises(ValueError):
        logprob_entropy(h, w[:, :4], y)
    with pytest.raises(TypeError):
        logprob_entropy(h.double(), w, y)
    with pytest.raises(ValueError):
        logprob_entropy(h, w, y.float())
    with pytest.raises(ValueError):
        logprob_entropy(h, w, y, temperature=0.0)
    with pytest.raises(ValueError):
        logprob_entropy(h, w, y, bias=torch.zeros(3))
    with pytest.raises(ValueError):
        logprob_entropy(h, w, y, backend="numba")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter allows CPU tensors")
def test_triton_backend_needs_cuda_or_interpreter():
    h, w, _, y, _ = make_inputs(33, 4, 8, 30)
    with pytest.raises(ValueError):
        logprob_entropy(h, w, y, backend="triton")


def test_rows_per_chunk_respects_budget():
    assert le.rows_per_chunk(4096, 32768, 4, 128 * 2**20) == 1024
    assert le.rows_per_chunk(10, 32768, 4, 128 * 2**20) == 10
    assert le.rows_per_chunk(10, 2**40, 4, 1) == 1


def test_segment_sum_matches_loop_and_backprops():
    g = torch.Generator().manual_seed(34)
    values = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (50,), generator=g)
    ids[ids == 3] = 4  # leave segment 3 empty
    out = segment_sum(values, ids, 9)
    want = torch.stack([values[ids == s].sum() for s in range(9)])
    assert torch.allclose(out, want) and out[3] == 0 and out[8] == 0
    weights = torch.randn(9, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), values)
    assert torch.equal(grad, weights[ids])
    assert torch.autograd.gradcheck(lambda x: segment_sum(x, ids, 9), [values])


def test_segment_sum_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        segment_sum(torch.ones(5), torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError):
        segment_sum(torch.ones(5), torch.zeros(5), 2)


def test_segment_sum_of_logprobs_per_node():
    h, w, _, y, _ = make_inputs(35, 12, 8, 30)
    node = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    logp, ent = logprob_entropy(h, w, y)
    sums = segment_sum(logp, node, 4)
    assert torch.allclose(sums[2], logp[5:9].sum()) and torch.allclose(segment_sum(ent, node, 4).sum(), ent.sum())


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    script = Path(__file__).with_name("_triton_interpret_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference_on_gpu(dtype):
    seed = 40 + [torch.float32, torch.bfloat16, torch.float16].index(dtype)
    h, w, b, y, up = make_inputs(seed, 300, 256, 5000, dtype, device="cuda", bias=True)
    y[::7] = -100
    check_vs_reference(h, w, b, y, up, TOL[dtype], temperature=0.9, backend="triton")


@gpu
@needs_cuda
def test_triton_chunked_backward_and_edges_on_gpu(monkeypatch):
    import ibtpo_fast.kernels.triton_logprob_entropy as tle

    monkeypatch.setattr(tle, "CUDA_CHUNK_BYTES", 100 * 1001 * 4)  # several token chunks
    h, w, _, y, up = make_inputs(44, 333, 96, 1001, device="cuda")
    check_vs_reference(h.t().contiguous().t(), w, None, y, up, 1e-5, backend="triton")
    for n in (0, 1):
        h, w, b, y, up = make_inputs(45 + n, n, 64, 1001, device="cuda", bias=True)
        check_vs_reference(h, w, b, y, up, 1e-5, backend="triton")
    h, w, _, y, _ = make_inputs(47, 64, 64, 1001, device="cuda", scale=2e3)
    outs = logprob_entropy(h, w, y, backend="triton")
    assert all(o.isfinite().all() for o in outs)
