"""One-step word problems with small numbers, for a real pretrained model (SmolLM2-135M-Instruct).

A problem is a short story about a person and a count of things: "Mia has 3 apples. Mia gets 2
more. How many apples does Mia have now?". Numbers stay small (1-5 to start with, changes of 1-4,
answers 0-9). The prompt is a chat: one worked example (a question and a three-line answer ending
"The answer is N."), then the question. SmolLM2-135M-Instruct then answers about half of them in two
or three lines, so the rewards within a tree differ and the lines are the tree's steps (`"\\n"`). A
response is graded by its last number, as free-form answers are (GSM8K-style).

Version 3. Version 1 had one- and two-step problems and the question alone; version 2 one-step
problems and an instruction to answer line by line. SmolLM2 answered 13% of each, most of its
answers wandering past the length limit (`docs/algorithm.md`, section 9).

Train and test problems are told apart by a CRC32 hash of the question, as in the arithmetic task.
"""
from __future__ import annotations

import itertools
import random
import re
import zlib

from ibtpo_fast.data import PromptRow

DATA_SOURCE = "word_problems"
STEP_DELIMITER = "\n"
MAX_NEW_TOKENS = 96
_TEST_BUCKETS = 5  # one question in five belongs to the test split
_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Ella")
_THINGS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "shells")
EXAMPLE = ("Sam has 2 books. Sam gets 3 more. How many books does Sam have now?",
           "Sam starts with 2 books.\nHe gets 3 more, so 2 + 3 = 5.\nThe answer is 5.")


def _count(n: int, things: str) -> str:
    return f"{n} {things[:-1] if n == 1 else things}"


def _story(who: str, what: str, start: int, change: int, gets: bool) -> tuple[str, int]:
    """(question, answer) of one problem: a start, one change, a question."""
    said = f"{who} gets {change} more." if gets else f"{who} gives away {_count(change, what)}."
    question = f"{who} has {_count(start, what)}. {said} How many {what} does {who} have now?"
    return question, start + change if gets else start - change


def _all_problems() -> list[tuple[str, int]]:
    """Every problem once but the worked example (2,175): starts 1-5, changes 1-4, never giving away more than
    there is."""
    problems = [_story(who, what, start, change, gets)
                for who, what, start, change in itertools.product(_NAMES, _THINGS, range(1, 6), range(1, 5))
                for gets in (True, False) if gets or change <= start]
    return [p for p in problems if p[0] != EXAMPLE[0]]


def _is_test(question: str) -> bool:
    return zlib.crc32(question.encode()) % _TEST_BUCKETS == 0


def split_problems(split: str, seed: int = 0) -> list[tuple[str, int]]:
    """Every (question, answer) pair of `split` ("train": 1,744, "test": 431), in a fixed order per seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    problems = [p for p in _all_problems() if _is_test(p[0]) == (split == "test")]
    random.Random(seed).shuffle(problems)
    return problems


def prompt_rows(split: str, n: int, seed: int = 0) -> list[PromptRow]:
    """The first n problems of a split (all of them when it holds fewer) as chat prompts, the worked example
    first, with their answers as ground truth."""
    example = [{"role": "user", "content": EXAMPLE[0]}, {"role": "assistant", "content": EXAMPLE[1]}]
    return [PromptRow([*example, {"role": "user", "content": q}], str(a), DATA_SOURCE, {}, i)
            for i, (q, a) in enumerate(split_problems(split, seed)[:n])]


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 when the response's last number is the answer, else 0.0 (verl's compute_score contract)."""
    numbers = re.findall(r"\d+", solution_str)
    return float(bool(numbers) and numbers[-1] == str(ground_truth).strip())
