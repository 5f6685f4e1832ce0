import json
import math

import numpy as np
import pytest

from ibtpo_fast.runlog import RunLogger, plot_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_log_writes_valid_jsonl_with_nan_as_null(tmp_path, capsys):
    with RunLogger(tmp_path / "run", total_steps=3, progress="off") as log:
        log.log(1, {"critic/score/mean": 0.25, "actor/entropy": float("nan"), "perf/tokens_per_s": np.float32(1e3)})
        log.log(2, {"critic/score/mean": 0.5, "val-core/math/acc/mean@4": 0.75, "tree/trajectories": 12, "x": float("inf")})
        log.print("hello")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]  # strict JSON: NaN would not parse as a null
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]
    assert recs[0] == {"step": 1, "critic/score/mean": 0.25, "actor/entropy": None, "perf/tokens_per_s": 1000.0}
    assert recs[1]["tree/trajectories"] == 12 and recs[1]["x"] is None
    out = capsys.readouterr()
    assert "step 2/3" in out.out and "acc=0.750" in out.out and "hello" in out.out
    assert out.err == ""  # no bar without a terminal


def test_progress_bar_on(tmp_path, capsys):
    with RunLogger(tmp_path, total_steps=4, progress="on") as log:
        log.log(1, {"critic/score/mean": 0.5, "actor/entropy": 1.25, "perf/tokens_per_s": 321.0})
        log.print("message")
    out = capsys.readouterr()
    assert "reward=0.500" in out.err and "entropy=1.250" in out.err and "tok/s=321" in out.err
    assert "message" in out.out


def test_non_scalar_metric_rejected(tmp_path):
    with RunLogger(tmp_path, total_steps=1, progress="off") as log:
        with pytest.raises(TypeError, match="'bad'"):
            log.log(1, {"bad": [1, 2]})


def test_resume_keeps_history_up_to_start_step(tmp_path):
    with RunLogger(tmp_path, total_steps=5, progress="off") as log:
        for step in range(1, 5):
            log.log(step, {"critic/score/mean": step / 10})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "critic/sc')  # crash mid-write
    with RunLogger(tmp_path, total_steps=5, progress="off", start_step=2) as log:
        log.log(3, {"critic/score/mean": 0.9})
    assert [(r["step"], r["critic/score/mean"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 0.1), (2, 0.2), (3, 0.9)]
    RunLogger(tmp_path, total_steps=5, progress="off").close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_optional_backends_missing_give_clear_error(tmp_path):
    for flag, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(ImportError, match=f"pip install {package}"):
                RunLogger(tmp_path, total_steps=1, progress="off", **{flag: True})


def test_read_metrics_truncated_and_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": null}\n{"step": 3, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": None}]
    path.write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_plot_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with RunLogger(tmp_path, total_steps=20, progress="off") as log:
        for step in range(1, 21):
            m = {"critic/score/mean": step / 20, "actor/entropy": math.exp(-step / 10), "ib/score_mean": 0.1 * step,
                 "ib/cov_eta": float("nan") if step == 3 else -0.01 * step, "tree/generated_tokens": 100 * step,
                 "tree/trajectories": 12}
            if step % 5 == 0:
                m["val-core/math/acc/mean@4"] = step / 25
                m["val-core/gsm8k/acc/mean@4"] = step / 30
            log.log(step, m)
    written = plot_metrics(path, tmp_path / "plots")
    # tree/eff_rate was never logged: no eff_rate.png
    assert sorted(p.name for p in written) == ["accuracy.png", "entropy.png", "ib_score.png", "tokens.png"]
    for p in written:
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "plots" / "eff_rate.png").exists()
