import sys
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
