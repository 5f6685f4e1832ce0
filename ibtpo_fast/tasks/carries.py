"""Column addition with carries: a bundled task whose early steps decide the end.

A problem is the sum of two numbers of 2 to 5 digits (each pair of lengths equally common). Its
prompt is an instruction line, then the question, e.g. "Q: 4738+2965=?\\n". The solution adds one
column a line from the right, the shorter number padded with zeros and the carry added in, then
assembles the answer from the columns' last digits:

    8+5=13
    3+6+1=10
    7+9+1=17
    4+2+1=7
    A:7703

A column's carry decides the next column's line and the answer needs every column's digit, so a
slip in an early column is carried to the end: unlike chained arithmetic, where each step's
mistake shows in the next line's operand, a dropped carry only shows in the column after it.
Train and test problems are told apart by a CRC32 hash of the question, as in `arithmetic`.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from ibtpo_fast.tasks.arithmetic import ANSWER_PREFIX, STEP_DELIMITER, Problem, split_of

DATA_SOURCE = "carries"
DIFFICULTY = "columns"  # what accuracy is broken down by in the tiny model's metadata
INSTRUCTION = "Add them column by column from the right, carrying as you go. End with A: and the answer.\n"
_QUESTION = re.compile(r"Q: (\d+)\+(\d+)=\?")


@dataclass(frozen=True)
class CarriesConfig:
    min_digits: int = 2
    max_digits: int = 5
    seed: int = 0
    instruction: str = INSTRUCTION

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


def _exact(column: int, digits: tuple[int, int], carry: int) -> tuple[int, int]:
    return sum(digits) + carry, carry


def solve(a: int, b: int, slip: Callable[[int, tuple[int, int], int], tuple[int, int]] = _exact) -> tuple[list[str], str]:
    """Column lines and the answer of a + b. `slip(column, digits, carry)` gives the (sum, carry) a
    column is written with; later columns carry what was written, as a solver that slipped would."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    lines, digits, carry = [], [], 0
    for column, (x, y) in enumerate(zip(xs, ys)):
        total, shown = slip(column, (int(x), int(y)), carry)
        lines.append(f"{x}+{y}" + ("+1" if shown else "") + f"={total}")
        digits.append(str(total % 10))
        carry = total // 10
    answer = (str(carry) if carry else "") + "".join(reversed(digits))
    return lines, str(int(answer))


def format_solution(lines: list[str], answer: str) -> str:
    return STEP_DELIMITER.join(lines + [f"{ANSWER_PREFIX}{answer}"])


def parse_prompt(prompt: str) -> tuple[int, int]:
    match = _QUESTION.search(prompt)
    if match is None:
        raise ValueError(f"not a carries question: {prompt!r}")
    return int(match.group(1)), int(match.group(2))


def difficulty(p: Problem) -> int:
    """Columns of the sum."""
    return max(len(str(n)) for n in parse_prompt(p.prompt))


def response_budget(cfg: CarriesConfig) -> int:
    """The longest solution ("9+9+1=19\\n" a column, then "A:" and one more digit) plus its stop token,
    rounded up to a multiple of 32."""
    longest = cfg.max_digits * 9 + len(ANSWER_PREFIX) + cfg.max_digits + 1
    return 32 * -(-(longest + 1) // 32)


def slipped_solution(p: Problem, rng: random.Random, rate: float) -> str:
    """`p`'s solution with each column, with probability `rate`, written with its carry dropped (when
    it has one) or its sum off by one."""

    def slip(column: int, digits: tuple[int, int], carry: int) -> tuple[int, int]:
        if rng.random() >= rate:
            return sum(digits) + carry, carry
        if carry and rng.random() < 0.5:
            return sum(digits), 0
        total = sum(digits) + carry + rng.choice((-1, 1))
        return (total if total >= 0 else 1), carry

    return format_solution(*solve(*parse_prompt(p.prompt), slip=slip))


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def iter_problems(split: str, cfg: CarriesConfig = CarriesConfig()) -> Iterator[Problem]:
    """Endless deterministic stream of `split` problems (may repeat)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= cfg.min_digits <= cfg.max_digits:
        raise ValueError(f"invalid config {cfg}")
    rng = random.Random(f"carries:{cfg.seed}:{split}")
    while True:
        a = _number(rng, rng.randint(cfg.min_digits, cfg.max_digits))
        b = _number(rng, rng.randint(cfg.min_digits, cfg.max_digits))
        question = f"Q: {a}+{b}=?"
        if split_of(question) == split:
            lines, answer = solve(a, b)
            yield Problem(f"{cfg.instruction}{question}\n", answer, format_solution(lines, answer))


def make_split(split: str, n: int, cfg: CarriesConfig = CarriesConfig()) -> list[Problem]:
    """The first `n` distinct problems of the `split` stream."""
    seen: dict[str, Problem] = {}
    stream = iter_problems(split, cfg)
    while len(seen) < n:
        p = next(stream)
        seen.setdefault(p.prompt, p)
    return list(seen.values())
