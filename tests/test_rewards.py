import logging
import textwrap

import numpy as np
import pytest
import reward_fns

from ibtpo_fast.rewards import RewardScorer, load_reward_fn, math_verify_score


def score(scorer, sols, gts):
    n = len(sols)
    return scorer(["src"] * n, sols, gts, [{"i": i} for i in range(n)])


def test_load_module_spec():
    assert load_reward_fn("reward_fns:exact") is reward_fns.exact
    assert load_reward_fn("ibtpo_fast.tasks.arithmetic:compute_score")("s", "A: 3", "3") == 1.0


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        load_reward_fn("reward_fns")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_reward_fn("no_such_mod:f")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        load_reward_fn("reward_fns:missing")
    with pytest.raises(ValueError, match="no such file"):
        load_reward_fn(f"{tmp_path}/absent.py:f")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('bad module')\n")
    with pytest.raises(ValueError, match="bad module"):
        load_reward_fn(f"{broken}:f")


def test_inline_scores_and_counts_failures(caplog):
    sols = ["1", "boom", "2", "nan", "text", "dict", "nodict", "boom"]
    gts = ["1", "x", "3", "x", "x", "x", "x", "x"]
    with caplog.at_level(logging.WARNING, logger="ibtpo_fast.rewards"):
        with RewardScorer(reward_fns.tricky) as scorer:
            out = score(scorer, sols, gts)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1, 0, 0, 0, 0, 0.5, 0, 0])
    assert scorer.stats() == {"reward/errors": 5, "reward/timeouts": 0}
    # one warning per exception type, naming the first failing item
    runtime = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(runtime) == 1 and "item 1" in runtime[0].getMessage()


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        RewardScorer(reward_fns.exact)(["a"], ["1", "2"], ["1", "2"], [None, None])


def test_workers_timeout_errors_and_reuse():
    with RewardScorer(reward_fns.tricky, timeout_s=1.0, workers=1) as scorer:
        out = score(scorer, ["1", "hang", "2", "boom", "nan", "4"], ["1", "x", "2", "x", "x", "5"])
        np.testing.assert_array_equal(out, [1, 0, 1, 0, 0, 0])
        assert scorer.stats() == {"reward/errors": 2, "reward/timeouts": 1}
        # the hung worker was replaced: later calls still work
        np.testing.assert_array_equal(score(scorer, ["5", "dict"], ["5", "x"]), [1, 0.5])
        assert scorer.stats() == {"reward/errors": 2, "reward/timeouts": 1}


def test_workers_load_file_reward_fn(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent("""
        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return {"score": float(solution_str == ground_truth) + extra_info["bonus"]}
    """))
    fn = load_reward_fn(f"{path}:compute_score")
    with RewardScorer(fn, workers=2) as scorer:
        out = scorer(["s"] * 3, ["a", "b", "c"], ["a", "x", "c"], [{"bonus": 0.25}] * 3)
    np.testing.assert_array_equal(out, [1.25, 0.25, 1.25])


def test_workers_reject_unpicklable_fn():
    with RewardScorer(lambda *a: 1.0, workers=1) as scorer:
        with pytest.raises(ValueError, match="module-level"):
            score(scorer, ["1"], ["1"])


def test_math_verify_score():
    pytest.importorskip("math_verify")
    assert math_verify_score("math", "so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_verify_score("math", "The answer is 42.", "42") == 1.0
    assert math_verify_score("math", "I think 41", "42") == 0.0
    assert math_verify_score("math", "", "42") == 0.0


def test_default_math_reward_fails_up_front_without_math_verify(monkeypatch):
    import importlib.util

    from ibtpo_fast.rewards import default_math_reward

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ImportError, match="pip install 'ibtpo_fast\\[math\\]'"):
        default_math_reward()
