"""Bundled tasks and models: multi-step arithmetic and tiny char-level Qwen2 models that solve it.

`arithmetic` is the quick default (3 to 5 operations); `arithmetic_hard` mixes 2 to 9 operations in
equal shares, so that the long problems, mostly failed at first, are common and many GRPO groups
carry no signal. Each task
has its own model, trained for its range by `python -m ibtpo_fast.tasks.make_tiny_model --task NAME`.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    response_budget,
)

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class BundledTask:
    name: str
    problems: ArithmeticConfig
    model: str  # directory under ibtpo_fast/assets

    @property
    def model_path(self) -> Path:
        """Directory of the task's tiny model (HF format: weights, config, tokenizer)."""
        return _ASSETS / self.model

    @property
    def max_new_tokens(self) -> int:
        return response_budget(self.problems)

    def prompt_rows(self, split: str, n: int) -> list[PromptRow]:
        """The first n problems of a split, as the trainer's and evaluator's prompt rows."""
        return [PromptRow(p.prompt, p.answer, DATA_SOURCE, {}, i) for i, p in enumerate(make_split(split, n, self.problems))]


BUNDLED: dict[str, BundledTask] = {
    "arithmetic": BundledTask("arithmetic", ArithmeticConfig(), "tiny_model"),
    "arithmetic_hard": BundledTask("arithmetic_hard", ArithmeticConfig(num_ops_min=2, num_ops_max=9, balance_ops=True),
                                   "tiny_model_hard"),
}


def tiny_model_path() -> Path:
    """Directory of the default bundled task's tiny model."""
    return BUNDLED["arithmetic"].model_path


__all__ = [
    "BUNDLED",
    "DATA_SOURCE",
    "STEP_DELIMITER",
    "ArithmeticConfig",
    "BundledTask",
    "Problem",
    "compute_score",
    "extract_answer",
    "iter_problems",
    "make_split",
    "tiny_model_path",
]
