"""Fused log-prob/entropy (forward + backward) vs naive full-logits torch: time and peak memory.

    pytest bench/bench_kernels.py --benchmark-only      # full shapes
    pytest bench/bench_kernels.py --benchmark-disable   # smoke run on small shapes

The naive variant materialises fp32 logits [N, V], then log_softmax -> gather and
entropy, and backpropagates through all of it. Ratios land in benchmark.extra_info.
CPU peak memory is the resident-set growth of a fresh subprocess per variant, since
torch's CPU allocations are invisible to tracemalloc.
"""
import json
import subprocess
import sys
import time

import pytest
import torch

from ibtpo_fast.kernels import logprob_entropy

CPU_SHAPE, CPU_SMOKE_SHAPE = (4096, 512, 32768), (256, 64, 2048)
GPU_SHAPE, GPU_SMOKE_SHAPE = (8192, 4096, 151936), (512, 256, 4096)
H100_DENSE_BF16_TFLOPS = 989.0


def naive_logprob_entropy(hidden, weight, targets):
    lsm = torch.log_softmax((hidden @ weight.T).float(), -1)
    return lsm.gather(1, targets[:, None]).squeeze(1), -(lsm.exp() * lsm).sum(-1)


def fused_logprob_entropy(hidden, weight, targets):
    return logprob_entropy(hidden, weight, targets)


VARIANTS = {"fused": fused_logprob_entropy, "naive": naive_logprob_entropy}


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """Random inputs built in place, so building them leaves no transient RSS peak."""
    n, d, v = shape
    torch.manual_seed(seed)
    hidden = torch.randn(n, d, device=device).to(dtype)
    weight = torch.randn(v, d, device=device).mul_(2 / d**0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    upstream = [torch.randn(n, device=device) for _ in range(2)]
    return hidden, weight, targets, upstream


def train_step(fn, hidden, weight, targets, upstream) -> None:
    """Forward both outputs and backpropagate random upstream grads into hidden and weight."""
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    torch.autograd.backward(fn(h, w, targets), upstream)
    if h.is_cuda:
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def peak_rss_growth(variant: str, shape) -> int:
    """Peak resident-set growth of one train_step of `variant`, in a fresh subprocess."""
    cmd = [sys.executable, __file__, variant, *map(str, shape)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout)["peak_growth_bytes"]


def _naive_timer(times, step):
    """pedantic setup hook: time one naive step so both variants interleave under the same load."""
    def setup():
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return setup


# Targets: fused time <= 1.0x naive; peak memory <= 0.25x naive, asserted as is (peaks are not noisy).
TIME_TARGET, PEAK_TARGET = 1.0, 0.25


def _compare(benchmark, claim, shape, dtype, device, rounds, warmup):
    inputs = make_inputs(shape, dtype, device)
    naive_times: list[float] = []
    benchmark.pedantic(
        train_step, args=(fused_logprob_entropy, *inputs), rounds=rounds, warmup_rounds=warmup,
        setup=_naive_timer(naive_times, lambda: train_step(naive_logprob_entropy, *inputs)),
    )
    if benchmark.disabled:
        return None
    naive_times = naive_times[warmup:]
    fused = benchmark.stats.stats
    benchmark.extra_info.update(
        shape_NDV=list(shape), dtype=str(dtype), rounds=rounds,
        fused_min_s=fused.min, fused_mean_s=fused.mean,
        naive_min_s=min(naive_times), naive_mean_s=sum(naive_times) / len(naive_times),
        mean_time_ratio_vs_naive=fused.mean * len(naive_times) / sum(naive_times),
    )
    claim("time_ratio_vs_naive", fused.min / min(naive_times), TIME_TARGET, higher_is_better=False)
    return fused.min


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for RSS")
def test_cpu_fused_vs_naive(benchmark, claim):
    shape = CPU_SMOKE_SHAPE if benchmark.disabled else CPU_SHAPE
    benchmark.group = "logprob_entropy cpu"
    _compare(benchmark, claim, shape, torch.float32, "cpu", rounds=3, warmup=0)
    fused_mem, naive_mem = peak_rss_growth("fused", shape), peak_rss_growth("naive", shape)
    benchmark.extra_info.update(fused_peak_mib=fused_mem / 2**20, naive_peak_mib=naive_mem / 2**20)
    # Smoke shapes are too small for the resident set to show the difference: asserted only when benchmarking.
    claim("peak_mem_ratio_vs_naive", fused_mem / naive_mem, PEAK_TARGET, higher_is_better=False, slack=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_vs_naive(benchmark, claim):
    shape = GPU_SMOKE_SHAPE if benchmark.disabled else GPU_SHAPE
    benchmark.group = "logprob_entropy gpu"
    fused_min = _compare(benchmark, claim, shape, torch.bfloat16, "cuda", rounds=5, warmup=1)
    if fused_min is None:
        return
    n, d, v = shape
    tflops = 8 * n * d * v / fused_min / 1e12
    inputs = make_inputs(shape, torch.bfloat16, "cuda")
    peaks = {}
    for name, fn in VARIANTS.items():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(fn, *inputs)
        peaks[name] = torch.cuda.max_memory_allocated() - base
    benchmark.extra_info.update(
        tflops=tflops, fraction_of_989_tflops=tflops / H100_DENSE_BF16_TFLOPS,
        fused_peak_mib=peaks["fused"] / 2**20, naive_peak_mib=peaks["naive"] / 2**20,
    )
    claim("peak_mem_ratio_vs_naive", peaks["fused"] / peaks["naive"], PEAK_TARGET, higher_is_better=False, slack=1.0)


if __name__ == "__main__":  # child for peak_rss_growth: VARIANT N D V
    name, *dims = sys.argv[1:]
    args = make_inputs(tuple(map(int, dims)))
    before = _status_bytes("VmRSS")
    train_step(VARIANTS[name], *args)
    print(json.dumps({"peak_growth_bytes": _status_bytes("VmHWM") - before}))
