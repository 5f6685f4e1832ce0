"""Multi-step integer arithmetic: a small reasoning task with one computation per step.

A problem is an expression over `+`, `-`, `*` with the usual precedence. Its prompt is an
instruction line, as RL datasets prepend to every question, then the question, e.g.
"12+7*3-5=?\\n". The solution evaluates one operation per line (products first, left to right,
then sums left to right) and ends with the answer line:

    7*3=21
    12+21=33
    33-5=28
    A:28

Every intermediate result lies in [0, max_result]: expressions that would go negative or grow
past the cap are redrawn, so a tiny character-level model never has to write a minus sign in a
result or handle long numbers. Long expressions leave the range more often, so redrawing the whole
problem makes them rare; `balance_ops` redraws at the drawn length instead, so every length from
`num_ops_min` to `num_ops_max` is equally common. The defaults (3-5 operations, operands 1..9,
results up to 99) are sized for the bundled tiny model.

Train and test problems are told apart by a CRC32 hash of the question, so the splits are
disjoint for every seed and instruction, and identical on every machine.
"""
from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

DATA_SOURCE = "arithmetic"
DIFFICULTY = "ops"  # what accuracy is broken down by in the tiny model's metadata
SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)  # typical carry and off-by-one slips of a written result
STEP_DELIMITER = "\n"
ANSWER_PREFIX = "A:"
_TEST_BUCKETS = 5  # one question in five belongs to the test split
_OPS = "+-*"
# Shared by every prompt of a batch, as a real dataset's instruction is: the part of a prefix that
# a prefix cache serves from memory. No digits, operators or "=", so it never reads as a question.
INSTRUCTION = "Solve it one operation per line, products first, then left to right. End with A: and the answer.\n"


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty knobs and the seed of the problem stream."""

    num_ops_min: int = 3
    num_ops_max: int = 5
    max_operand: int = 9
    max_result: int = 99
    seed: int = 0
    instruction: str = INSTRUCTION
    balance_ops: bool = False  # every number of operations equally common (else long ones are rarer)

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Problem:
    prompt: str  # instruction, then the question "expr=?\n"
    answer: str  # the final number, as text
    solution: str  # step lines then "A:<answer>", no trailing newline


def _exact(value: int) -> int:
    return value


def solve(
    operands: list[int], ops: list[str], slip: Callable[[int], int] = _exact
) -> tuple[list[str], int]:
    """Step lines ("a*b=c") and the value of the expression, products first.

    `slip` maps each computed result to the one written down; later steps build on what was
    written, as a solver that slipped would.
    """
    nums, pending, steps = [operands[0]], [], []
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            a = nums[-1]
            nums[-1] = slip(a * b)
            steps.append(f"{a}*{b}={nums[-1]}")
        else:
            nums.append(b)
            pending.append(op)
    acc = nums[0]
    for op, b in zip(pending, nums[1:]):
        new = slip(acc + b if op == "+" else acc - b)
        steps.append(f"{acc}{op}{b}={new}")
        acc = new
    return steps, acc


def question_of(prompt: str) -> str:
    """The question line "expr=?" of a prompt, without its instruction."""
    return prompt.rstrip("\n").rsplit("\n", 1)[-1]


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """Operands and operators of a prompt's question "expr=?"."""
    tokens = re.findall(r"\d+|[+\-*]", question_of(prompt).split("=", 1)[0])
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def format_solution(steps: list[str], value: int) -> str:
    return STEP_DELIMITER.join(steps + [f"{ANSWER_PREFIX}{value}"])


def difficulty(p: Problem) -> int:
    """Operations in the problem."""
    return len(parse_prompt(p.prompt)[1])


def slipped_solution(p: Problem, rng: random.Random, rate: float) -> str:
    """`p`'s solution with each step result off by a little with probability `rate`."""

    def slip(value: int) -> int:
        if rng.random() >= rate:
            return value
        d = rng.choice(SLIP_DELTAS)
        return value + d if value + d >= 0 else value - d

    steps, value = solve(*parse_prompt(p.prompt), slip=slip)
    return format_solution(steps, value) if min(step_results(steps)) >= 0 else p.solution


def response_budget(cfg: ArithmeticConfig) -> int:
    """Tokens a response may take: the longest solution plus its stop token (one character per token),
    rounded up to a multiple of 32 so that a model sampling a little past the answer is not cut short."""
    width = len(str(cfg.max_result))
    longest = cfg.num_ops_max * (3 * width + 3) + len(ANSWER_PREFIX) + width  # "99+99=99\n" per step, then "A:99"
    return 32 * -(-(longest + 1) // 32)


def step_results(steps: list[str]) -> list[int]:
    return [int(s.rsplit("=", 1)[1]) for s in steps]


def _draw(rng: random.Random, cfg: ArithmeticConfig, n_ops: int) -> Problem | None:
    """One random problem of `n_ops` operations, or None when an intermediate result leaves [0, max_result]."""
    operands = [rng.randint(1, cfg.max_operand) for _ in range(n_ops + 1)]
    ops = [rng.choice(_OPS) for _ in range(n_ops)]
    steps, value = solve(operands, ops)
    if any(r < 0 or r > cfg.max_result for r in step_results(steps)):
        return None
    expr = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + str(operands[-1])
    return Problem(f"{cfg.instruction}{expr}=?\n", str(value), format_solution(steps, value))


def split_of(prompt: str) -> str:
    """The split ("train" or "test") a prompt belongs to; fixed by its question alone."""
    return "test" if zlib.crc32(question_of(prompt).encode()) % _TEST_BUCKETS == 0 else "train"


def iter_problems(split: str, cfg: ArithmeticConfig = ArithmeticConfig()) -> Iterator[Problem]:
    """Endless deterministic stream of `split` problems (may repeat)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= cfg.num_ops_min <= cfg.num_ops_max or cfg.max_operand < 1:
        raise ValueError(f"invalid config {cfg}")
    if re.search(r"[\d+\-*=]", cfg.instruction) or (cfg.instruction and not cfg.instruction.endswith("\n")):
        raise ValueError(f"instruction must end with a newline and hold no digits, operators or '=': {cfg.instruction!r}")
    rng = random.Random(f"arithmetic:{cfg.seed}:{split}")
    while True:
        n_ops = rng.randint(cfg.num_ops_min, cfg.num_ops_max)
        p = _draw(rng, cfg, n_ops)
        while cfg.balance_ops and p is None:
            p = _draw(rng, cfg, n_ops)
        if p is not None and split_of(p.prompt) == split:
            yield p


def make_split(split: str, n: int, cfg: ArithmeticConfig = ArithmeticConfig()) -> list[Problem]:
    """The first `n` distinct problems of the `split` stream."""
    seen: dict[str, Problem] = {}
    stream = iter_problems(split, cfg)
    for _ in range(1000 * n + 10_000):  # gives up when the config has too few distinct problems
        if len(seen) == n:
            return list(seen.values())
        p = next(stream)
        seen.setdefault(p.prompt, p)
    raise ValueError(f"config {cfg} has fewer than {n} distinct {split} problems")


def extract_answer(text: str) -> str | None:
    """Text after the last "A:", up to the first newline or special token; None if absent."""
    i = text.rfind(ANSWER_PREFIX)
    if i < 0:
        return None
    rest = text[i + len(ANSWER_PREFIX) :]
    return rest.split("\n", 1)[0].split("<", 1)[0].strip()


def compute_score(
    data_source: str, solution_str: Any, ground_truth: Any, extra_info: Any = None
) -> float:
    """Exact-match reward in verl's `compute_score` signature: 1.0 or 0.0, never raises."""
    try:
        answer = extract_answer(str(solution_str)) if solution_str is not None else None
        return float(answer is not None and answer != "" and answer == str(ground_truth).strip())
    except Exception:  # reward must survive any generated text
        return 0.0
