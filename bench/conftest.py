import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

# Benchmarks reuse the tests' reference oracles and forest builders.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

# Qwen2.5-0.5B's shape: what a step costs does not depend on what the weights say.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)


@pytest.fixture
def qwen25_05b(benchmark) -> Qwen2ForCausalLM:
    """A Qwen2.5-0.5B-shaped model with random weights, bf16 on CUDA (2 layers in a smoke run)."""
    torch.manual_seed(0)
    layers = 2 if benchmark.disabled else QWEN25_05B["num_hidden_layers"]
    cfg = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    with torch.device("cuda"):
        return Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()


@pytest.fixture
def claim(benchmark) -> Callable[..., None]:
    """`claim(name, value, target=None, higher_is_better=True, slack=2.0)`: record a measured ratio in
    extra_info with its stated target and floor (the target eased `slack` times: the machines are noisy;
    a ceiling where lower is better), and assert the floor only when benchmarking, where timings are real."""
    def record(name: str, value: float, target: float | None = None, higher_is_better: bool = True,
               slack: float = 2.0) -> None:
        benchmark.extra_info[name] = value
        if target is None:
            return
        floor = target / slack if higher_is_better else target * slack
        benchmark.extra_info.update({f"{name}_target": target, f"{name}_floor": floor})
        if not benchmark.disabled:
            assert (value >= floor) if higher_is_better else (value <= floor), \
                f"{name} = {value:.3g}, floor {floor:.3g} (target {target:.3g})"
    return record
