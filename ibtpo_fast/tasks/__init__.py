"""Bundled task and model: multi-step arithmetic and a tiny char-level Qwen2 that solves it."""
from __future__ import annotations

from pathlib import Path

from ibtpo_fast.data import PromptRow
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


def prompt_rows(split: str, n: int) -> list[PromptRow]:
    """The first n problems of a split, as the trainer's and evaluator's prompt rows."""
    return [PromptRow(p.prompt, p.answer, DATA_SOURCE, {}, i) for i, p in enumerate(make_split(split, n))]


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
    "prompt_rows",
    "tiny_model_path",
]
