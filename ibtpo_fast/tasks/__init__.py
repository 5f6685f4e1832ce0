"""Bundled task and model: multi-step arithmetic and a tiny char-level Qwen2 that solves it."""
from __future__ import annotations

from pathlib import Path

from ibtpo_fast.tasks.arithmetic import (
    DATA_SOURCE,
    STEP_DELIMITER,
    ArithmeticConfig,
    Problem,
    compute_score,
    extract_answer,
    iter_problems,
    make_split,
)


def tiny_model_path() -> Path:
    """Directory of the bundled tiny model (HF format: weights, config, tokenizer)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_model"


__all__ = [
    "DATA_SOURCE",
    "STEP_DELIMITER",
    "ArithmeticConfig",
    "Problem",
    "compute_score",
    "extract_answer",
    "iter_problems",
    "make_split",
    "tiny_model_path",
]
