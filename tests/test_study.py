"""The study command end to end on a 2-step, 2-seed run, and its statistics."""
import json
import warnings

import numpy as np
import pytest

from ibtpo_fast import study

SMOKE = ["train.steps=2", "train.eval_every=1", "data.batch_size=2", "data.val_size=4", "train.eval_k=2"]


def test_two_presets_two_seeds(tmp_path):
    out = tmp_path / "study"
    assert study.main(["--presets", "ibtpo,grpo", "--seeds", "2", "--out", str(out), "--jobs", "2", "--", *SMOKE]) == 0
    text = (out / "results.md").read_text()
    assert "| ibtpo | 2 |" in text and "| grpo | 2 |" in text and "Paired differences from `grpo`" in text
    for png in ("accuracy_vs_tokens.png", "accuracy_vs_time.png", "training_dynamics.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["ibtpo"]] == [2, 2]
    stamp = (out / "runs" / "grpo-seed1" / "metrics.jsonl").stat().st_mtime_ns
    assert study.main(["--presets", "ibtpo,grpo", "--seeds", "2", "--out", str(out), "--", *SMOKE]) == 0
    assert (out / "runs" / "grpo-seed1" / "metrics.jsonl").stat().st_mtime_ns == stamp  # finished runs are not rerun


def test_paired_interval_and_token_interpolation():
    m, lo, hi = study.paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert m == pytest.approx(0.2) and lo == pytest.approx(0.2 - 4.303 * 0.1 / np.sqrt(3)) and hi > m
    run = study.Run("p", 0, [{"step": 0, "val-core/x/acc/mean@2": 0.2},
                             {"step": 1, "tree/generated_tokens": 10.0, "val-core/x/acc/mean@2": 0.6}], batch_size=2)
    assert study.at_tokens(run, "val-core/x/acc/mean@2", 10.0) == pytest.approx(0.4)  # half way to 20 tokens


def test_bad_presets_overrides_and_failed_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--presets", "nope"])
    with pytest.raises(SystemExit):  # fits ibtpo, not grpo: refused before any run starts
        study.main(["--presets", "ibtpo,grpo", "--out", str(tmp_path), "--", "rollout.tree=2,3,1,1"])
    assert not (tmp_path / "runs").exists()
    missing = ["data.task=file", f"data.train_files={tmp_path / 'absent.jsonl'}", "data.reward_fn=reward_fns:exact"]
    assert study.main(["--presets", "grpo", "--seeds", "1", "--out", str(tmp_path), "--", *missing]) == 1
    assert "grpo seed 0 failed" in capsys.readouterr().err


def test_branching_table_sampling_only(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # TorchEngine gives entropies: no surprisal fallback
        assert study.main(["--sampling", "3", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "sampling.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "branching" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(study.SAMPLING_ARMS)
    assert [r.split(" | ")[1] for r in rows] == ["8.0", "12.0", "12.0", "12.0", "12.0"]  # the specs' trajectories
    assert all(0 <= float(r.split(" | ")[6].rstrip(" |")) < 1 for r in rows)  # the local advantage's relative size
