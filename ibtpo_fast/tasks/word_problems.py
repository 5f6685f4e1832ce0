"""One- and two-step word problems with small numbers, for a real pretrained model (SmolLM2-135M-Instruct).

A problem is a short story about a person and a count of things: "Mia has 3 apples. Mia gets 2 more
apples. How many apples does Mia have now?". Two-step problems add a second change. Numbers stay
small (1-5 to start with, changes of 1-4, answers 0-12), so a 135M instruction model answers a fair
share of them in free text, and the rewards within a tree differ. The prompt is the question alone,
as a chat message. A response is graded by its last number, as free-form answers are (GSM8K-style).
Steps are lines (`"\\n"`), which is how the model breaks its answers.

Train and test problems are told apart by a CRC32 hash of the question, as in the arithmetic task.
"""
from __future__ import annotations

import random
import re
import zlib
from collections.abc import Iterator

from ibtpo_fast.data import PromptRow

DATA_SOURCE = "word_problems"
STEP_DELIMITER = "\n"
MAX_NEW_TOKENS = 96
_TEST_BUCKETS = 5  # one question in five belongs to the test split
_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Ella")
_THINGS = ("apples", "pencils", "stickers", "books", "marbles", "cookies", "cards", "shells")


def _count(n: int, things: str) -> str:
    return f"{n} {things[:-1] if n == 1 else things}"


def _problem(rng: random.Random) -> tuple[str, int]:
    """(question, answer) of one problem: a start, one or two changes that never go below zero, a question."""
    who, what = rng.choice(_NAMES), rng.choice(_THINGS)
    start = count = rng.randint(1, 5)
    story = []
    for _ in range(rng.randint(1, 2)):
        change = rng.randint(1, 4)
        if change > count or rng.random() < 0.5:
            story.append(f"{who} gets {change} more.")
            count += change
        else:
            story.append(f"{who} gives away {_count(change, what)}.")
            count -= change
    return f"{who} has {_count(start, what)}. {' '.join(story)} How many {what} does {who} have now?", count


def _is_test(question: str) -> bool:
    return zlib.crc32(question.encode()) % _TEST_BUCKETS == 0


def iter_problems(split: str, seed: int = 0) -> Iterator[tuple[str, int]]:
    """Distinct (question, answer) pairs of `split` ("train" or "test"), in a fixed order per seed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng, seen = random.Random(seed), set()
    while True:
        question, answer = _problem(rng)
        if question not in seen and _is_test(question) == (split == "test"):
            seen.add(question)
            yield question, answer


def prompt_rows(split: str, n: int, seed: int = 0) -> list[PromptRow]:
    """The first n problems of a split as chat prompts, their answers as ground truth."""
    problems = iter_problems(split, seed)
    return [PromptRow([{"role": "user", "content": q}], str(a), DATA_SOURCE, {}, i)
            for i, (q, a) in zip(range(n), problems)]


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 when the response's last number is the answer, else 0.0 (verl's compute_score contract)."""
    numbers = re.findall(r"\d+", solution_str)
    return float(bool(numbers) and numbers[-1] == str(ground_truth).strip())
